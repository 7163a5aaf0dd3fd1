"""The two routed-expert paths: `torch._grouped_mm` (grouped) against the per-expert loop (reference), and the
choice between them (grouped for bf16 rows, e.g. under a bf16 autocast; the loop for fp32)."""

import pytest
import torch
from v4_test_helpers import small_model_config

from model import Transformer
from model.moe import Experts, autocast_rows, expert_counts, grouped_mm_supported

CPU_BF16 = grouped_mm_supported("cpu", torch.bfloat16)


def experts_and_batch(n=6, dim=32, inter=16, tokens=90, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts = Experts(n, dim, inter, limit=1.5)
    with torch.no_grad():
        for w in (experts.w1, experts.w2, experts.w3):
            w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    x = torch.randn(tokens, dim, generator=gen)
    idx = torch.rand(tokens, n, generator=gen).topk(k, dim=-1).indices
    idx[: tokens // 3, 0] = 0  # a crowded expert ...
    idx[idx == n - 1] = (idx[idx == n - 1] + 1) % (n - 1)  # ... and an empty one
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % (n - 1), idx[:, 1])
    weights = torch.rand(tokens, k, generator=gen)
    return experts, x, idx, weights


def run(experts, x, idx, weights, impl=None):
    """Output and the gradients of x and of the three stacked weights for one path."""
    experts.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = experts(xi, idx, weights, impl=impl)
    (y.float().square().sum() + y.float().sum()).backward()
    return [y.detach().float(), xi.grad.float()] + [w.grad.float().clone() for w in experts.parameters()]


def test_expert_counts_match_bincount_and_stay_on_device():
    idx = torch.tensor([3, 0, 3, 3, 1, 0])
    counts = expert_counts(idx, 5)
    assert counts.dtype == torch.long and counts.tolist() == torch.bincount(idx, minlength=5).tolist()


def test_grouped_equals_loop_in_fp32():
    if not grouped_mm_supported("cpu", torch.float32):
        pytest.skip("torch._grouped_mm does not run fp32 on this CPU build")
    experts, x, idx, weights = experts_and_batch()
    assert int(expert_counts(idx.reshape(-1), 6)[-1]) == 0  # the empty expert is exercised
    ref = run(experts, x, idx, weights, impl="loop")
    got = run(experts, x, idx, weights, impl="grouped")
    assert ref[0].abs().max() > 0.1 and all(g.abs().max() > 0 for g in ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fp32_rows_take_the_loop(monkeypatch):
    experts, x, idx, weights = experts_and_batch()
    assert not experts.grouped_usable(x)
    monkeypatch.setattr(experts, "grouped", _must_not_run("grouped"))
    experts(x, idx, weights)


def test_autocast_rows_cast_only_under_autocast():
    x = torch.randn(4, 8)
    assert autocast_rows(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_rows(x).dtype == torch.bfloat16
        assert autocast_rows(torch.arange(3)).dtype == torch.long


def test_probe_agrees_with_the_op():
    x = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    try:
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([3, 7, 10], dtype=torch.int32))
        y.backward(torch.randn_like(y))
        runs = True
    except (AttributeError, RuntimeError, NotImplementedError):
        runs = False
    assert CPU_BF16 == runs


def test_bf16_autocast_picks_grouped_where_the_op_runs(monkeypatch):
    experts, x, idx, weights = experts_and_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(experts, x, idx, weights, impl="loop")
        assert experts.grouped_usable(autocast_rows(x)) == CPU_BF16
        with monkeypatch.context() as m:  # the default path must be the grouped one (or the loop without it)
            m.setattr(experts, "loop" if CPU_BF16 else "grouped", _must_not_run("the other path"))
            got = run(experts, x, idx, weights)
    assert ref[0].abs().max() > 0.1
    for a, b in zip(got, ref):  # both run bf16 products (fp32 accumulation): equal to bf16 rounding
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
    unaligned, x12, idx12, w12 = experts_and_batch(dim=12)  # 12 bf16 values = 24 bytes: not 16-aligned
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not unaligned.grouped_usable(autocast_rows(x12))


@pytest.mark.skipif(not CPU_BF16, reason="torch._grouped_mm does not run bf16 on this CPU build")
def test_bf16_training_step_of_a_model_uses_grouped(monkeypatch):
    layers = ["sliding_attention", "compressed_sparse_attention"]
    model = Transformer(small_model_config(layers, hidden_size=32, moe_intermediate_size=16))
    monkeypatch.setattr(Experts, "loop", _must_not_run("Experts.loop"))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    sum(t.float().logsumexp(-1).mean() for t in [out.logits, *out.mtp_logits]).backward()
    assert all(m.w1.grad is not None and m.w1.grad.abs().sum() > 0 for m in model.modules()
               if isinstance(m, Experts))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_moe_layer_has_no_host_sync_on_cuda():
    """Router, grouped experts, shared expert and the expert loads, forward and backward, under a bf16
    autocast: CUDA's sync debug mode turns any device-to-host synchronisation into an error."""
    from model.balance import expert_load
    from model.moe import MoE

    cfg = small_model_config(["sliding_attention"] * 2, hidden_size=64, moe_intermediate_size=32)
    layer = MoE(cfg, "moe").cuda()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 40, 64, device="cuda", requires_grad=True)

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, routing = layer(x, None)
        loads = expert_load(routing, cfg.n_routed_experts)
        y.float().square().mean().backward()
        return y, loads

    run()  # the grouped_mm probe and lazy CUDA initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, loads = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert layer.experts.grouped_usable(torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16))
    assert torch.isfinite(y.float()).all() and layer.experts.w1.grad.abs().sum() > 0
    assert loads.sum().item() == 2 * 40 * cfg.num_experts_per_tok


def _must_not_run(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was chosen")

    return fail
