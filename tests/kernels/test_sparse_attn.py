"""Triton sparse attention (interpreter on CPU) vs the PyTorch gather reference: outputs and gradients on
packed sequences with several documents, including the first windows before any compressed entry exists."""

import pytest
import torch

from model.indexer import select_topk
from model.kernels.sparse_attn import sparse_attention
from model.layout import SeqLayout
from model.sparse_attention import attend, gather_keys, range_index, window_index
from tests.kernels.helpers import DEVICE, GPU, pick, randn, rel

# (batch, seq, heads, head width, window, rate, top-k)
SHAPE = pick((2, 40, 3, 32, 8, 4, 3), (2, 2048, 16, 512, 128, 4, 64))


def layout(batch: int, seq: int) -> SeqLayout:
    """Row 0: three documents (one shorter than the window), row 1: one document."""
    doc = torch.zeros(batch, seq, dtype=torch.long, device=DEVICE)
    doc[0, seq // 8:] = 1
    doc[0, seq // 2 + 3:] = 2
    return SeqLayout.build(batch, seq, torch.device(DEVICE), doc)


def case(mode: str, seed: int):
    """Inputs, the kernel's entry arguments and the reference's (index, ok) pair for the entries."""
    b, s, h, c, window, rate, topk = SHAPE
    lay = layout(b, s)
    ent = lay.entries(rate)
    q = randn(seed, b, s, h, c)
    kv = randn(seed + 1, b, s, c)
    sink = randn(seed + 2, h)
    comp = randn(seed + 3, b, ent.count, c) if mode != "sliding" else None
    kwargs, pair = {}, None
    if mode == "csa":
        idx, ok = select_topk(randn(seed + 4, b, s, ent.count), ent.visible_BST, topk)
        kwargs = {"idx_BSK": torch.where(ok, idx, -1)}
        pair = (idx, ok)
    elif mode == "hca":
        kwargs = {"first_BS": ent.first_BS, "nvis_BS": ent.nvis_BS}
        pair = range_index(ent.first_BS, ent.nvis_BS, ent.count)
    return (q, kv, sink, comp), lay.positions_BS, window, kwargs, pair


def reference(q, kv, sink, comp, pos, window, pair):
    s = q.shape[1]
    pairs, sources = [window_index(torch.arange(s, device=q.device), pos, window)], [kv]
    if comp is not None:
        pairs.append(pair)
        sources.append(comp)
    keys, ok = gather_keys(sources, pairs)
    return attend(q, keys, ok, sink, q.shape[-1] ** -0.5)[0]


@pytest.mark.parametrize("mode", ["csa", "hca", "sliding"])
def test_kernel_matches_reference_outputs_and_gradients(mode):
    tensors, pos, window, kwargs, pair = case(mode, seed=10)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    refs = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    q, kv, sink, comp = leaves
    out = sparse_attention(q, kv, sink, pos, window, q.shape[-1] ** -0.5, comp_BTC=comp, **kwargs)
    want = reference(*refs, pos, window, pair)
    tol = 2e-3 if GPU else 1e-5
    assert rel(out, want) < tol
    grad = randn(99, *out.shape)
    torch.autograd.backward(out, grad)
    torch.autograd.backward(want, grad)
    for got, ref in zip(leaves, refs):
        if got is not None:
            assert got.grad is not None and rel(got.grad, ref.grad) < tol


def test_early_queries_see_only_window_and_sink():
    """Before a document's first entry completes, CSA and HCA equal sliding-only attention."""
    (q, kv, sink, comp), pos, window, kwargs, _ = case("hca", seed=20)
    rate = SHAPE[5]
    early = pos < rate - 1
    hca = sparse_attention(q, kv, sink, pos, window, 0.5, comp_BTC=comp, **kwargs)
    none = sparse_attention(q, kv, sink, pos, window, 0.5)
    assert early.sum() > 2 and torch.equal(hca[early], none[early])
    assert not torch.allclose(hca[~early], none[~early])


def test_bf16_inputs_close_to_fp32():
    """bf16 in, bf16 out: within bf16 rounding of the fp32 reference on the same (rounded) inputs."""
    (q, kv, sink, comp), pos, window, kwargs, pair = case("csa", seed=30)
    lo = [t.to(torch.bfloat16) for t in (q, kv, comp)]
    out = sparse_attention(lo[0], lo[1], sink, pos, window, q.shape[-1] ** -0.5, comp_BTC=lo[2], **kwargs)
    want = reference(lo[0].float(), lo[1].float(), sink, lo[2].float(), pos, window, pair)
    assert out.dtype == torch.bfloat16 and rel(out, want) < 1e-2
