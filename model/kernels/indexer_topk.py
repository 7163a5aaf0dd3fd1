"""Triton lightning-indexer scoring with the visibility mask fused, and chunked top-k selection.

Reference: `model.indexer.Indexer.score` (which materialises [B, S, n_I, T]) then `select_topk`. The kernel
keeps the per-head products in registers: one program scores a block of queries against a block of
entries, looping over the indexer heads, and writes -inf where an entry is not visible to the query
(slots first .. first + nvis - 1). Queries are processed in chunks so that memory stays linear in S.
"""

import torch
import triton
import triton.language as tl

from .runtime import cdiv, interpreting
from .sparse_attn import check_device

SCORE_BUDGET = 1 << 26  # fp32 scores held at once (per chunk of queries)
PREC = "ieee" if interpreting() else "tf32"  # products on the GPU: TF32 tensor cores (selection only)


@triton.jit
def _score_kernel(q_ptr, w_ptr, k_ptr, first_ptr, nvis_ptr, out_ptr,
                  S, T, NI, CI, t0, n_t, scale,
                  BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    """out[b, s, t - t0] = scale * sum_h w[b, s, h] relu(q[b, s, h] . k[b, t]) where visible, else -inf."""
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = t0 + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    mmask = offs_m < S
    tmask = offs_t < t0 + n_t
    first = tl.load(first_ptr + b * S + offs_m, mask=mmask, other=0)
    nvis = tl.load(nvis_ptr + b * S + offs_m, mask=mmask, other=0)
    vis = (offs_t[None, :] >= first[:, None]) & (offs_t[None, :] < (first + nvis)[:, None])
    acc = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
    if tl.sum(vis.to(tl.int32)) > 0:
        cmask = offs_c[None, :] < CI
        k = tl.load(k_ptr + (b * T + offs_t)[:, None] * CI + offs_c[None, :], mask=tmask[:, None] & cmask,
                    other=0.0).to(tl.float32)
        for h in range(NI):
            row = (b * S + offs_m) * NI + h
            q = tl.load(q_ptr + row[:, None] * CI + offs_c[None, :], mask=mmask[:, None] & cmask, other=0.0)
            w = tl.load(w_ptr + row, mask=mmask, other=0.0)
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision=PREC)
            acc += tl.maximum(s, 0.0) * w[:, None]
    out = tl.where(vis, acc * scale, float("-inf"))
    ptrs = out_ptr + (b * S + offs_m)[:, None] * n_t + (offs_t - t0)[None, :]
    tl.store(ptrs, out, mask=mmask[:, None] & tmask[None, :])


def index_scores(q_BSHC, w_BSH, keys_BTC, first_BS, nvis_BS, t0: int = 0, t1: int | None = None):
    """Masked index scores [B, S, t1 - t0] fp32 of entries t0 .. t1-1 (-inf where not visible)."""
    b, s, ni, ci = q_BSHC.shape
    t = keys_BTC.shape[1]
    t1 = t if t1 is None else t1
    out = torch.empty(b, s, t1 - t0, dtype=torch.float32, device=q_BSHC.device)
    block_m, block_t = (16, 16) if interpreting() else (64, 64)
    grid = (cdiv(s, block_m), cdiv(t1 - t0, block_t), b)
    if out.numel():
        _score_kernel[grid](q_BSHC.contiguous(), w_BSH.float().contiguous(), keys_BTC.contiguous(),
                            first_BS.to(torch.int32).contiguous(), nvis_BS.to(torch.int32).contiguous(), out,
                            s, t, ni, ci, t0, t1 - t0, ci**-0.5, BLOCK_M=block_m, BLOCK_T=block_t,
                            BLOCK_C=max(16, triton.next_power_of_2(ci)), PREC=PREC,
                            num_warps=1 if interpreting() else 4)
    return out


def index_topk(q_BSHC, w_BSH, keys_BTC, first_BS, nvis_BS, k: int, chunk: int = 0) -> torch.Tensor:
    """Top-k visible entries per query -> slots [B, S, min(k, T)] int32, -1 where fewer are visible.

    Queries go in chunks (`chunk` of them, or as many as keep SCORE_BUDGET scores); each chunk scores only
    the entry span its queries can see.
    """
    check_device(q_BSHC, keys_BTC)
    b, s = q_BSHC.shape[:2]
    t = keys_BTC.shape[1]
    width = min(k, t)
    idx = torch.full((b, s, width), -1, dtype=torch.int32, device=q_BSHC.device)
    if width == 0 or s == 0:
        return idx
    step = chunk if chunk > 0 else max(1, SCORE_BUDGET // max(b * t, 1))
    for lo in range(0, s, step):
        hi = min(lo + step, s)
        first, nvis = first_BS[:, lo:hi], nvis_BS[:, lo:hi]
        # One chunk of every query: score the whole entry range (masked per query) without reading the
        # span back to the host, which would stall the launch queue. Smaller chunks skip what none sees.
        t0, t1 = (0, t) if hi - lo == s else (int(first.min().item()), int((first + nvis).max().item()))
        if t1 <= t0:
            continue
        scores = index_scores(q_BSHC[:, lo:hi], w_BSH[:, lo:hi], keys_BTC, first, nvis, t0, t1)
        kk = min(width, t1 - t0)
        val, sel = scores.topk(kk, dim=-1)
        idx[:, lo:hi, :kk] = torch.where(val > float("-inf"), sel + t0, -1).to(torch.int32)
    return idx
