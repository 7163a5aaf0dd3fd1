"""Muon: per-expert and per-block orthogonalisation, update RMS, decoupled decay, momentum, shard refusal."""

import math

import pytest
import torch
from torch import nn

from model.errors import MoeforgeError
from optim.batched import orthogonalize_many
from optim.muon import Muon, orthogonalized_update
from optim.newton_schulz import hybrid_schedule, newton_schulz

COEFFS = hybrid_schedule()


def one_step(w0: torch.Tensor, grad: torch.Tensor, **kw) -> torch.Tensor:
    p = nn.Parameter(w0.clone())
    opt = Muon([p], **kw)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def test_first_step_matches_formula():
    """Step 1: M = G, U = mu M + G = (1 + mu) G, O = NS(U) sqrt(max(n, m)) 0.18, W <- W(1 - lr wd) - lr O."""
    torch.manual_seed(0)
    w, g = torch.randn(12, 20), torch.randn(12, 20)
    lr, wd = 0.01, 0.1
    out = one_step(w, g, lr=lr, weight_decay=wd)
    expected = w * (1 - lr * wd) - lr * newton_schulz(1.95 * g, COEFFS) * math.sqrt(20) * 0.18
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_momentum_two_steps_by_hand():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(8, 6))
    g1, g2 = torch.randn(8, 6), torch.randn(8, 6)
    opt = Muon([p], lr=0.1, weight_decay=0.0, momentum=0.9)
    w = p.detach().clone()
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    m2 = 0.9 * g1 + g2
    o1 = newton_schulz(1.9 * g1, COEFFS) * math.sqrt(8) * 0.18
    o2 = newton_schulz(0.9 * m2 + g2, COEFFS) * math.sqrt(8) * 0.18
    torch.testing.assert_close(p.detach(), w - 0.1 * o1 - 0.1 * o2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m2)


@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (32, 8), (1, 24), (13, 7)])
def test_update_rms_is_0_18(shape):
    torch.manual_seed(2)
    o = orthogonalized_update(torch.randn(shape), None, 0.18, COEFFS, torch.float32)
    rms = o.pow(2).mean().sqrt().item()
    assert abs(rms - 0.18) < 0.18 * 0.01, rms


def test_weight_decay_is_decoupled():
    """With a zero gradient the update is exactly W(1 - lr wd); the decay never enters the momentum."""
    torch.manual_seed(3)
    w = torch.randn(6, 10)
    out = one_step(w, torch.zeros(6, 10), lr=0.5, weight_decay=0.1)
    torch.testing.assert_close(out, w * (1 - 0.05))
    g = torch.randn(6, 10)
    d_wd = one_step(w, g, lr=0.5, weight_decay=0.1) - one_step(w, g, lr=0.5, weight_decay=0.0)
    torch.testing.assert_close(d_wd, -0.05 * w, atol=1e-6, rtol=1e-5)


def test_experts_orthogonalised_independently():
    torch.manual_seed(4)
    w, g = torch.randn(4, 10, 6), torch.randn(4, 10, 6)
    g[2] *= 1e3  # a stacked-then-normalised implementation would drown the other experts
    out = one_step(w, g, lr=0.1, weight_decay=0.1)
    for e in range(4):
        alone = one_step(w[e], g[e], lr=0.1, weight_decay=0.1)
        torch.testing.assert_close(out[e], alone, atol=1e-6, rtol=1e-5)
    g2 = g.clone()
    g2[1] = torch.randn(10, 6)
    out2 = one_step(w, g2, lr=0.1, weight_decay=0.1)
    changed = [(out2[e] != out[e]).any().item() for e in range(4)]
    assert changed == [False, True, False, False]


@pytest.mark.parametrize("splits", [(4, 4, 16), (3, 3), (5, 2, 1)])
def test_row_blocks_orthogonalised_separately(splits):
    torch.manual_seed(5)
    rows = sum(splits)
    u = torch.randn(2, rows, 12)  # a stack too: blocks split along dim -2 of every matrix
    out = orthogonalized_update(u, splits, 0.18, COEFFS, torch.float32)
    for blk_in, blk_out in zip(u.split(splits, -2), out.split(splits, -2)):
        ref = newton_schulz(blk_in, COEFFS) * math.sqrt(max(blk_in.shape[-2], 12)) * 0.18
        torch.testing.assert_close(blk_out, ref, atol=1e-6, rtol=1e-5)
    whole = orthogonalized_update(u, None, 0.18, COEFFS, torch.float32)
    assert not torch.allclose(out, whole, atol=1e-3)


def test_bad_split_and_vector_refused():
    with pytest.raises(MoeforgeError, match="row_splits"):
        orthogonalized_update(torch.randn(6, 4), (2, 2), 0.18, COEFFS, torch.float32)
    with pytest.raises(MoeforgeError, match="needs a matrix"):
        Muon([nn.Parameter(torch.randn(5))])


def test_refuses_sharded_dtensor(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        with pytest.raises(MoeforgeError, match="shard"):
            Muon([{"params": [sharded], "names": ["layers.0.attn.wq_a.weight"]}])
        replicated = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Replicate()]))
        opt = Muon([replicated], lr=0.1)
        replicated.grad = distribute_tensor(torch.randn(8, 4), mesh, [Replicate()])
        before = replicated.to_local().clone()
        opt.step()
        assert not torch.equal(before, replicated.to_local())
    finally:
        dist.destroy_process_group()


def test_batched_fast_path_matches_reference():
    """orthogonalize_many (buckets of same-shape blocks across parameters) vs the per-matrix loop."""
    torch.manual_seed(6)
    specs = [
        (torch.randn(24, 32), (4, 4, 16), 0.18, COEFFS, torch.float32),
        (torch.randn(24, 32), (4, 4, 16), 0.18, COEFFS, torch.float32),
        (torch.randn(4, 5, 8), None, 0.18, COEFFS, torch.float32),
        (torch.randn(5, 8), None, 0.3, COEFFS, torch.float32),  # shares a bucket with the experts
        (torch.randn(6, 4), (3, 3), 0.18, COEFFS, torch.float32),
        (torch.randn(3, 9), None, 0.18, hybrid_schedule(5, 0), torch.float32),
    ]
    for limit in (1 << 27, 100):  # one batch per shape, or chunks of a few matrices
        for spec, out in zip(specs, orthogonalize_many(specs, max_batch_numel=limit)):
            torch.testing.assert_close(out, orthogonalized_update(*spec), atol=1e-5, rtol=1e-5)


def test_muon_batched_and_reference_steps_agree():
    torch.manual_seed(7)
    shapes = [(24, 32), (24, 32), (4, 5, 8), (6, 4)]
    ws = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    results = []
    for batched in (True, False):
        ps = [nn.Parameter(w.clone()) for w in ws]
        groups = [{"params": ps[:2], "row_splits": (4, 4, 16)}, {"params": ps[2:3]},
                  {"params": ps[3:], "row_splits": (3, 3)}]
        opt = Muon(groups, lr=0.05, batched=batched)
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in ps])
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
