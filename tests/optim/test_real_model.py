"""The optimizer split and bias hook on the real v4-tiny model (skipped while model/ lacks Transformer)."""

from pathlib import Path

import pytest
import torch
import yaml

from optim import RoutingBiasUpdater, build_optimizer
from optim.rules import V4_RULES, assign_parameters

model_pkg = pytest.importorskip("model")
if not hasattr(model_pkg, "Transformer"):
    pytest.skip("model.Transformer not written yet", allow_module_level=True)

TINY = Path(__file__).resolve().parents[2] / "configs" / "model" / "v4-tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    cfg = model_pkg.ModelConfig.from_dict(yaml.safe_load(TINY.read_text()))
    torch.manual_seed(0)
    return cfg, model_pkg.Transformer(cfg)


def test_rules_on_real_names(tiny):
    cfg, model = tiny
    got = {a.name: a for a in assign_parameters(model, V4_RULES)}
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    layer_types = list(cfg.layer_types)
    for i, kind in enumerate(layer_types):
        assert got[f"layers.{i}.hc_attn.fn"].row_splits == (4, 4, 16)
        assert got[f"layers.{i}.hc_attn.base"].rule.optimizer == "adamw"
        assert got[f"layers.{i}.attn.wo_a.weight"].row_splits == (cfg.o_lora_rank,) * cfg.o_groups
        assert got[f"layers.{i}.attn.attn_sink"].rule.optimizer == "adamw"
        comp = got.get(f"layers.{i}.attn.compressor.wkv.weight")
        if kind == "compressed_sparse_attention":
            assert comp.row_splits == (cfg.head_dim, cfg.head_dim)
            assert got[f"layers.{i}.attn.compressor.ape"].rule.optimizer == "adamw"
        elif kind == "heavily_compressed_attention":
            assert comp.row_splits is None
    assert got["embed.weight"].rule.optimizer == got["head.weight"].rule.optimizer == "adamw"
    assert got["layers.0.ffn.experts.w1"].rule.optimizer == "muon"


def test_one_training_step_and_bias_update(tiny):
    _, model = tiny
    opt, table = build_optimizer(model, {"name": "muon", "lr": 1e-3})
    assert table.splitlines()[-1].startswith("total")
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:])
    extras = [out.balance_loss, out.indexer_loss]
    loss = loss + sum(x for x in extras if x is not None)
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.any():  # e.g. HCA gets no entries from 8 tokens: zero grad
            assert not torch.equal(p, before[n]), n
    updater = RoutingBiasUpdater(model, speed=0.001)
    assert out.expert_loads is not None and len(updater.buffers) == out.expert_loads.shape[0]
    biases = [b.clone() for _, b in updater.buffers]
    updater(out.expert_loads)
    for (_, b), b0 in zip(updater.buffers, biases):
        assert ((b - b0).abs() <= 0.001 + 1e-9).all() and not torch.equal(b, b0)
