"""MoE routing, balance loss and expert loads; model-level properties (grads, init, casting, mHC)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from v4_test_helpers import randomize_ours_, small_model_config

from model import ModelConfig, Transformer
from model.balance import expert_load, sequence_balance_loss
from model.mhc import sinkhorn
from model.moe import Experts, Gate, Routing, swiglu
from model.rope import apply_rope

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
TINY = Path(__file__).resolve().parents[2] / "configs" / "model" / "v4-tiny.yaml"


def tiny_config(**overrides) -> ModelConfig:
    d = OmegaConf.to_container(OmegaConf.load(TINY))
    d.update(overrides)
    return ModelConfig.from_dict(d)


def test_balance_loss_by_hand():
    # 2 sequences x 2 tokens, E = 3, k = 1
    scores = torch.tensor([[1.0, 1.0, 2.0], [3.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 2.0, 2.0]])
    picks = torch.tensor([[2], [0], [1], [1]])
    loss = sequence_balance_loss(Routing(picks, scores, True), batch=2, n_experts=3, top_k=1)
    # seq 0: f = 3/2 * [1, 0, 1]; P = mean([.25,.25,.5], [.75,0,.25]) = [.5, .125, .375] -> 1.5 * .875
    # seq 1: f = 3/2 * [0, 2, 0]; P = mean([1/3]*3, [0,.5,.5]) = [1/6, 5/12, 5/12] -> 3 * 5/12
    assert loss.item() == pytest.approx((1.5 * 0.875 + 3 * 5 / 12) / 2)
    assert expert_load(Routing(picks, scores, True), 3).tolist() == [1.0, 2.0, 1.0]


def test_model_balance_loss_and_loads():
    cfg = tiny_config(balance_loss_alpha=0.5)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    out = model(ids)
    n_learned = cfg.mlp_layer_types.count("moe") + cfg.num_nextn_predict_layers
    assert out.expert_loads.shape == (n_learned, cfg.n_routed_experts)
    assert torch.equal(out.expert_loads.sum(1), torch.full((n_learned,), 2.0 * 40 * cfg.num_experts_per_tok))
    assert out.indexer_loss is not None and len(out.mtp_logits) == 1  # v4-tiny has CSA layers
    assert Transformer(tiny_config(indexer_loss_mode="off"))(ids).indexer_loss is None
    with_hash = Transformer(tiny_config(balance_loss_alpha=0.5, balance_loss_on_hash_layers=True))
    with_hash.load_state_dict(model.state_dict())
    assert with_hash(ids).balance_loss > out.balance_loss > 0
    out.balance_loss.backward()
    assert model.layers[-1].ffn.gate.weight.grad.abs().sum() > 0


def test_gate_bias_selects_but_does_not_weight():
    cfg = tiny_config()
    gate = Gate(cfg, is_hash=False)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(16, cfg.hidden_size)
    w0, i0, scores = gate(x, None)
    gate.bias[5] = 100.0
    w1, i1, _ = gate(x, None)
    assert (i1 == 5).any(-1).all() and not (i0 == 5).all()
    expected = scores.gather(1, i1) / scores.gather(1, i1).sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(w1, expected)
    assert torch.allclose(scores, F.softplus(x @ gate.weight.T).sqrt())

    hash_gate = Gate(cfg, is_hash=True)
    hash_gate.tid2eid.copy_(torch.randint(0, cfg.n_routed_experts, hash_gate.tid2eid.shape))
    ids = torch.randint(0, cfg.vocab_size, (16,))
    assert torch.equal(hash_gate(x, ids)[1], hash_gate.tid2eid[ids])


def test_expert_loop_matches_dense_reference():
    experts = Experts(5, 12, 7, limit=0.5)
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w)
    x = torch.randn(30, 12)
    idx = torch.rand(30, 5).topk(2, dim=-1).indices
    weights = torch.rand(30, 2)
    dense = torch.stack([swiglu(x, experts.w1[e], experts.w3[e], experts.w2[e], 0.5) for e in range(5)], 1)
    ref = (dense.gather(1, idx[..., None].expand(-1, -1, 12)) * weights[..., None]).sum(1)
    torch.testing.assert_close(experts(x, idx, weights), ref)


def test_gradients_reach_every_trained_parameter():
    cfg = tiny_config()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    out = model(ids)
    (out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean() + out.balance_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # top-k selection is discrete: the indexer learns only from the indexer loss (issue 3)
    assert no_grad and all(".attn.indexer." in n for n in no_grad)


def test_init_is_deterministic_and_follows_the_spec():
    cfg = tiny_config()
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(seed=3)
    torch.manual_seed(123)
    b.init_weights(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    sd = a.state_dict()
    assert torch.all(sd["layers.0.hc_attn.scale"] == 0.01) and torch.all(sd["hc_head.base"] == 0)
    assert sd["layers.0.hc_attn.fn"].std().item() == pytest.approx(0.02, rel=0.1)
    table = sd["layers.0.ffn.gate.tid2eid"]
    assert table.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in table.tolist())
    assert not torch.equal(table, sd["layers.1.ffn.gate.tid2eid"])
    assert torch.all(sd["layers.2.ffn.gate.bias"] == 0) and torch.all(sd["layers.2.attn.attn_sink"] == 0)


def test_init_behaves_like_a_pre_norm_network():
    """With alpha = 0 the streams stay identical and x_{l+1} = x_l + F(RMSNorm(x_l)) (spec §11.6)."""
    cfg = tiny_config(hc_scale_init=0.0, num_hidden_layers=1, layer_types=[S], mlp_layer_types=["moe"])
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.embed.weight.mul_(50)  # so that RMSNorm's eps is negligible (the equivalence holds up to eps)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    block = model.layers[0]
    x = model.embed(ids)
    h = x + block.attn(block.attn_norm(x), _context(model, ids))
    h = h + block.ffn(block.ffn_norm(h), ids)[0]
    expected = model.head(model.norm(h))
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)


def _context(model, ids):
    from model.context import ForwardContext
    from model.layout import SeqLayout

    return ForwardContext(model.config, SeqLayout.build(*ids.shape, ids.device, None), torch.float32)


def test_bf16_cast_keeps_fp32_islands():
    model = Transformer(tiny_config()).cast_(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    fp32 = ["layers.0.hc_attn.fn", "layers.2.attn.attn_sink", "layers.2.attn.compressor.ape", "norm.weight",
            "layers.2.attn.kv_norm.weight", "mtp.0.enorm.weight", "hc_head.scale",
            "layers.2.attn.q_norm.weight"]
    bf16 = ["layers.2.attn.wq_a.weight", "head.weight", "embed.weight", "layers.2.ffn.experts.w1",
            "layers.2.attn.compressor.wkv.weight", "layers.2.ffn.gate.weight", "mtp.0.e_proj.weight"]
    assert all(dtypes[n] == torch.float32 for n in fp32) and all(dtypes[n] == torch.bfloat16 for n in bf16)
    assert model.layers[2].ffn.gate.bias.dtype == torch.float32
    out = model(torch.randint(0, 4096, (1, 40)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_sinkhorn_and_rope_inverse():
    m = sinkhorn(torch.randn(6, 4, 4), iters=20, eps=1e-6)
    torch.testing.assert_close(m.sum(-2), torch.ones(6, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.sum(-1), torch.ones(6, 4), atol=1e-2, rtol=0)
    x = torch.randn(3, 5, 16)
    angles = torch.randn(3, 5, 4)
    y = apply_rope(x, angles.cos(), angles.sin())
    assert torch.equal(y[..., :8], x[..., :8]) and not torch.allclose(y, x)
    torch.testing.assert_close(apply_rope(y, angles.cos(), angles.sin(), inverse=True), x)


def test_randomised_model_is_deterministic_for_a_batch_row():
    model = Transformer(small_model_config([C, H])).eval()
    randomize_ours_(model, 0)
    ids = torch.randint(0, 97, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[1], model(ids[1:2]).logits[0], rtol=0, atol=1e-5)


def test_mhc_keeps_the_residual_streams_in_fp32_under_bf16_autocast():
    """The stream collapse and write-back are exact fp32 products of fp32 streams even inside a bf16 autocast
    (a matmul under autocast once rounded every sublayer's residual streams to bf16)."""
    from model.mhc import hc_post, weighted_sum

    g = torch.Generator().manual_seed(0)
    streams = torch.randn(2, 5, 4, 64, generator=g) * 3
    w, res = torch.rand(2, 5, 4, generator=g), torch.rand(2, 5, 4, 4, generator=g)
    post, y = torch.rand(2, 5, 4, generator=g), torch.randn(2, 5, 64, generator=g).bfloat16()
    want_sum = (w.double().unsqueeze(-1) * streams.double()).sum(2)
    want_post = post.double().unsqueeze(-1) * y.double().unsqueeze(-2) + torch.einsum(
        "bsjk,bsjd->bskd", res.double(), streams.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_sum, got_post = weighted_sum(w, streams), hc_post(y, streams, post, res)
    assert got_sum.dtype == got_post.dtype == torch.float32
    torch.testing.assert_close(got_sum.double(), want_sum, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_post.double(), want_post, rtol=1e-6, atol=1e-5)
