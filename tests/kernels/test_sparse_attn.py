"""Triton sparse attention (interpreter on CPU) vs the PyTorch gather reference: outputs and gradients on
packed sequences with several documents, including the first windows before any compressed entry exists."""

import pytest
import torch

from model.errors import MoeforgeError
from model.indexer import select_topk
from model.kernels.sparse_attn import sparse_attention
from model.layout import SeqLayout
from model.sparse_attention import attend, gather_keys, range_index, window_index
from tests.kernels.helpers import DEVICE, pick, randn, rel

# (batch, seq, heads, head width, window, rate, top-k)
SHAPE = pick((2, 40, 3, 32, 8, 4, 3), (2, 2048, 16, 512, 128, 4, 64))
DTYPE, TOL = pick((torch.float32, 1e-5), (torch.bfloat16, 2e-2))
MANY_HEADS = pick((1, 16, 36, 16, 4, 4, 2), (1, 1024, 64, 512, 128, 128, 0))  # several head blocks


def layout(batch: int, seq: int) -> SeqLayout:
    """Row 0: three documents (one shorter than the window), row 1: one document."""
    doc = torch.zeros(batch, seq, dtype=torch.long, device=DEVICE)
    doc[0, seq // 8:] = 1
    doc[0, seq // 2 + 3:] = 2
    return SeqLayout.build(batch, seq, torch.device(DEVICE), doc)


def case(mode: str, seed: int, shape=SHAPE):
    """Inputs, the kernel's entry arguments and the reference's (index, ok) pair for the entries."""
    b, s, h, c, window, rate, topk = shape
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


CASES = [("csa", SHAPE), ("hca", SHAPE), ("sliding", SHAPE), ("hca", MANY_HEADS)]


@pytest.mark.parametrize("mode,shape", CASES)
def test_kernel_matches_reference_outputs_and_gradients(mode, shape):
    """fp32 in the interpreter; bf16 on a GPU (the fast path) against fp32 math on the same values."""
    tensors, pos, window, kwargs, pair = case(mode, 10, shape)
    rounded = [t.to(DTYPE).float() if t is not None and t.dim() > 1 else t for t in tensors]
    refs = [t.clone().requires_grad_(True) if t is not None else None for t in rounded]
    leaves = [t.to(DTYPE if t.dim() > 1 else t.dtype).requires_grad_(True) if t is not None else None
              for t in rounded]
    q, kv, sink, comp = leaves
    out = sparse_attention(q, kv, sink, pos, window, q.shape[-1] ** -0.5, comp_BTC=comp, **kwargs)
    want = reference(*refs, pos, window, pair)
    assert out.dtype == DTYPE and rel(out, want) < TOL
    grad = randn(99, *out.shape)
    torch.autograd.backward(out, grad.to(DTYPE))
    torch.autograd.backward(want, grad.to(DTYPE).float())
    for got, ref in zip(leaves, refs):
        if got is not None:
            assert got.grad is not None and rel(got.grad, ref.grad) < TOL


def test_early_queries_see_only_window_and_sink():
    """Before a document's first entry completes, CSA and HCA equal sliding-only attention."""
    (q, kv, sink, comp), pos, window, kwargs, _ = case("hca", seed=20)
    q, kv, comp = q.to(DTYPE), kv.to(DTYPE), comp.to(DTYPE)
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


def test_user_errors_name_the_setting(monkeypatch):
    q, kv, pos = torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 16), torch.zeros(1, 2, dtype=torch.long)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MoeforgeError, match="model.attn_impl"):
        sparse_attention(q, kv, torch.zeros(1), pos, 4, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(MoeforgeError, match="idx or first/nvis"):
        sparse_attention(q.to(DEVICE), kv.to(DEVICE), torch.zeros(1, device=DEVICE), pos.to(DEVICE), 4, 1.0,
                         comp_BTC=kv.to(DEVICE))


def test_backward_row_dots_in_chunks_equal_one_pass():
    from model.kernels.sparse_attn import _row_dots

    a, b = randn(40, 2, 9, 3, 5).to(DTYPE), randn(41, 2, 9, 3, 5).to(DTYPE)
    want = (a.float() * b.float()).sum(-1)
    assert torch.equal(_row_dots(a, b, budget=64), want)  # 2 queries per chunk, a short last chunk
