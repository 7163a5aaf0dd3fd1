"""The FP8 module swap (train/fp8.py) on v4-tiny with the plain-PyTorch FP8 reference backend.

Tolerances. E4M3 keeps 3 mantissa bits (unit roundoff 2^-4), so every FP8 product carries a few percent of
relative error (BF16's is 2^-9). Measured on v4-tiny at init (seed 0, B=2, S=32): loss within 0.06% of
fp32 (at init the loss sits near ln V, so it is not sensitive: the logits and gradients are the real test),
logits within 15-17% relative L2 error (BF16 autocast: 4.7%), cosine of the whole gradient 0.97-0.98
(BF16: 0.999), every swapped weight's gradient cosine >= 0.81. The bounds below leave about 2x room;
a wrong layout or transposition gives an error of order 1 and a cosine near 0. Exactness: inputs that are
small integers are exact in E4M3 with power-of-two scales, so there the FP8 products equal fp32 exactly.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import train.fp8 as fp8
from model import ModelConfig, Transformer
from model.attention import Attention
from model.errors import ConfigError
from model.hf import load_hf, save_hf
from model.kernels.fp8 import Fp8Recipe
from model.kernels.mxfp4 import mxfp4_fake_quant
from model.moe import Experts, SharedExpert
from train.config import validate
from train.pretrain import run

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
EXACT = Fp8Recipe("fp8", pow2_scales=True, backend="reference")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny CPU matmuls are ~100x faster on one thread on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed: int = 0) -> Transformer:
    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs/model/v4-tiny.yaml").read_text()))
    torch.manual_seed(seed)
    return Transformer(cfg)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ints(gen, *shape) -> torch.Tensor:
    return torch.randint(-8, 9, shape, generator=gen).float()


def loss_and_grads(model, ids):
    """The training objective's parts (next-token CE, MTP CE, balance and indexer losses), backward."""
    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    total = loss + sum(F.cross_entropy(lg[:, :-2].flatten(0, 1).float(), ids[:, 2:].flatten())
                       for lg in out.mtp_logits)
    total = total + sum(x for x in (out.balance_loss, out.indexer_loss) if x is not None)
    total.backward()
    return loss.item(), out.logits.detach()


@pytest.fixture(scope="module")
def fp32_run():
    torch.set_num_threads(1)
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    loss, logits = loss_and_grads(model, ids)
    return model, ids, loss, logits


def test_swap_keeps_parameters_names_and_excluded_modules():
    model = tiny_model()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    keys, types = list(model.state_dict()), {n: type(m) for n, m in model.named_modules()}
    fp8.convert(model, "fp8")
    assert list(model.state_dict()) == keys
    for name, p in model.named_parameters():  # the same Parameter objects, untouched values
        assert p is before[name][0] and torch.equal(p, before[name][1]), name
    swapped = fp8.fp8_modules(model)
    for name, module in model.named_modules():
        kind = types[name]
        expected = (kind is nn.Linear and name.rsplit(".", 1)[-1] != "head") or kind in (
            Attention, Experts, SharedExpert)
        assert (name in swapped) == expected, name
        if name not in swapped:  # embed, head, gate, norms, mHC, compressor/indexer containers, ...
            assert type(module) is kind, name
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    assert swapped["layers.2.attn.indexer.weights_proj"] == "Fp8Linear"
    assert swapped["layers.3.attn.compressor.wgate"] == "Fp8Linear"
    assert swapped["mtp.0.ffn.experts"] == "Fp8Experts"
    assert not any(".gate" == n[-5:] or "norm" in n.rsplit(".", 1)[-1] or ".hc_" in n for n in swapped)


@pytest.mark.parametrize("precision", fp8.PRECISIONS)
def test_fp8_forward_backward_close_to_fp32(fp32_run, precision):
    ref, ids, ref_loss, ref_logits = fp32_run
    model = fp8.convert(copy.deepcopy(ref), precision)
    model.zero_grad(set_to_none=True)
    assert fp8.default_backend(model) == "reference"
    loss, logits = loss_and_grads(model, ids)
    assert abs(loss - ref_loss) / ref_loss < 5e-3
    assert 1e-3 < rel(logits, ref_logits) < 0.3  # > 0: the FP8 products really ran
    params = dict(model.named_parameters())
    with_grad = [n for n, p in ref.named_parameters() if p.grad is not None]
    assert len(with_grad) == len(params)  # the objective reaches every parameter ...
    for name in with_grad:  # ... and so does its FP8 gradient
        assert params[name].grad is not None and torch.isfinite(params[name].grad).all(), name
    flat = [torch.cat([p.grad.flatten() for _, p in m.named_parameters()]) for m in (ref, model)]
    assert F.cosine_similarity(*flat, dim=0) > 0.95
    swapped = fp8.fp8_modules(model)
    for name, p in ref.named_parameters():
        if name.rsplit(".", 2 if name.endswith(".weight") else 1)[0] in swapped:
            assert F.cosine_similarity(p.grad.flatten(), params[name].grad.flatten(), dim=0) > 0.6, name


def test_under_bf16_autocast_outputs_bf16_and_fp32_grads(fp32_run):
    ref, ids, ref_loss, _ = fp32_run
    model = fp8.convert(copy.deepcopy(ref), "fp8")
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
        h = model.layers[0].attn.wq_a(torch.randn(3, model.config.hidden_size))
    assert h.dtype == torch.bfloat16
    F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    assert model.layers[3].ffn.experts.w1.grad.dtype == torch.float32


def test_linear_and_grouped_wo_a_are_exact_on_fp8_representable_inputs():
    gen = torch.Generator().manual_seed(2)
    attn = tiny_model().layers[2].attn
    with torch.no_grad():
        for lin in (attn.wo_a, attn.wq_b):
            lin.weight.copy_(ints(gen, *lin.weight.shape))
    swapped = fp8.convert(copy.deepcopy(attn), "fp8")
    for m in swapped.modules():
        if hasattr(m, "fp8_recipe"):
            m.fp8_recipe = EXACT
    for fn, fn8, shape in ((attn.grouped_out, swapped.grouped_out, (2, 5, attn.n_heads, attn.head_dim)),
                           (attn.wq_b, swapped.wq_b, (2, 5, attn.wq_b.in_features))):
        x = ints(gen, *shape).requires_grad_()
        x8 = x.detach().clone().requires_grad_()
        y, y8 = fn(x), fn8(x8)
        dy = ints(gen, *y.shape)
        y.backward(dy)
        y8.backward(dy)
        assert torch.equal(y, y8) and torch.equal(x.grad, x8.grad)
    assert torch.equal(attn.wo_a.weight.grad, swapped.wo_a.weight.grad)
    assert torch.equal(attn.wq_b.weight.grad, swapped.wq_b.weight.grad)


@pytest.mark.parametrize("precision", fp8.PRECISIONS)
def test_fp8_experts_match_the_loop_reference(precision):
    torch.manual_seed(3)
    experts = tiny_model().layers[3].ffn.experts
    n, k, e = 96, 2, experts.w1.shape[0]
    x = torch.randn(n, experts.w1.shape[2], requires_grad=True)
    idx, wts = torch.rand(n, e).topk(k, dim=-1).indices, torch.rand(n, k)
    swapped = fp8.convert(copy.deepcopy(experts), precision)
    if precision == "fp8+fp4_experts":  # the reference sees the MXFP4 weights; gradients pass straight
        with torch.no_grad():
            for w in (experts.w1, experts.w2, experts.w3):
                w.copy_(mxfp4_fake_quant(w))
    x8 = x.detach().clone().requires_grad_()
    y, y8 = experts(x, idx, wts, impl="loop"), swapped(x8, idx, wts)
    dy = torch.randn_like(y)
    y.backward(dy)
    y8.backward(dy)
    assert 1e-3 < rel(y8, y) < 0.1 and rel(x8.grad, x.grad) < 0.1
    for name in ("w1", "w2", "w3"):
        assert rel(getattr(swapped, name).grad, getattr(experts, name).grad) < 0.15, name


def test_unknown_precision_names_the_key():
    with pytest.raises(ConfigError, match="precision.name"):
        fp8.convert(tiny_model(), "fp4")


def test_hf_export_of_a_swapped_model_loads_into_a_plain_one(tmp_path):
    model = fp8.convert(tiny_model(), "fp8_rowwise")
    save_hf(model, tmp_path / "hf")
    back = load_hf(tmp_path / "hf")
    assert type(back.layers[0].attn.wq_a) is nn.Linear
    state = model.state_dict()
    for name, t in back.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_pretrain_stage_runs_fp8_and_writes_plain_checkpoints(compose_cfg, tmp_path):
    cfg = validate(compose_cfg(*TINY, "precision=fp8", "trainer.max_steps=3", "trainer.eval_every=0",
                               "checkpoint.every=0"))
    summary = run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    from train import checkpoint

    plain = Transformer(ModelConfig.from_dict(dict(cfg.model)))
    checkpoint.load(Path(summary["checkpoint"]), plain)  # a model that was never swapped reads it
