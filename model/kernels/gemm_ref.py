"""PyTorch references for the block-scaled FP8 GEMMs, emulating the kernels' arithmetic.

C = sum over 128-wide K steps of (A_q[:, step] @ B_q[:, step]^T) * scale_a * scale_b, where every partial
product is formed in fp32 from exact fp8 values and added to an fp32 accumulator.
"""

import torch

from .grouping import tile_rows_ref
from .runtime import GROUP, cdiv


def _b_scale(sb: torch.Tensor, n: int, kb: int, b_block: bool) -> torch.Tensor:
    col = sb[:, kb]
    return col.repeat_interleave(GROUP)[:n] if b_block else col


def fp8_gemm_ref(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, *,
                 out_dtype: torch.dtype = torch.bfloat16, b_block: bool = True) -> torch.Tensor:
    """a [M, K] e4m3 with sa [M, K/128]; b [N, K] e4m3 with sb [N/128, K/128] (b_block) or [N, K/128]."""
    m, k = a.shape
    n = b.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for kb in range(cdiv(k, GROUP)):
        ks = slice(kb * GROUP, min(k, (kb + 1) * GROUP))
        part = a[:, ks].float() @ b[:, ks].float().t()
        acc += part * (sa[:, kb, None] * _b_scale(sb, n, kb, b_block)[None, :])
    return acc.to(out_dtype)


def fp8_grouped_gemm_ref(a, sa, b, sb, offs, *, out_dtype=torch.bfloat16):
    """Rows of a [M, K] sorted by expert (cumulative ends ``offs``) times b[e] [N, K] (128x128 blocks)."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = fp8_gemm_ref(a[start:end], sa[start:end], b[e], sb[e], out_dtype=out_dtype)
        start = max(start, end)
    return out


def fp8_kgrouped_gemm_ref(at, sat, bt, sbt, offs, *, out_dtype=torch.float32):
    """Weight gradient per expert: out[e] = at[:, seg_e] @ bt[:, seg_e]^T, contraction over the tokens of
    expert e in 128-token tiles; at [N, M], bt [K, M] with per-tile scales [N or K, max_tiles]."""
    e_count = offs.numel()
    out = torch.zeros(e_count, at.shape[0], bt.shape[0], dtype=torch.float32, device=at.device)
    for t, (e, r0, r1) in enumerate(tile_rows_ref(offs)):
        part = at[:, r0:r1].float() @ bt[:, r0:r1].float().t()
        out[e] += part * (sat[:, t, None] * sbt[None, :, t])
    return out.to(out_dtype)
