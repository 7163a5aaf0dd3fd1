"""Triton E4M3 quantisation: 1x128 rows, 1x128 columns (the transposed copy), 128x128 blocks.

One kernel reads a tile once and writes every layout asked for (rows and transposed columns for
activations and gradients, the block-scaled weight and its transpose), optionally computing SwiGLU on the
fly. The arithmetic is that of ``quant_ref`` (bit-identical, but for the sign of zero on the GPU); see there.
"""

import torch
import triton
import triton.language as tl

from .grouping import block_e, check_offsets, max_tiles, segment_tile, tile_ends
from .runtime import GROUP, cdiv, check_kernel_inputs


@triton.jit
def round_e4m3(y):
    """Values of y rounded to E4M3 (nearest-even, saturating), still in fp32.

    Done with exponent arithmetic so that the interpreter and the GPU agree with torch's cast (the
    interpreter's own cast truncates). On the H200 (Triton 3.6) the result equals torch's cast except that a
    negative value rounding to zero may come out as +0.0. Two other formulations (the hardware cast, a
    bitwise sign copy) miscompiled in the 128x128 block path there: see docs/benchmarks.md.
    """
    a = tl.minimum(tl.abs(y), 448.0)
    pbits = a.to(tl.int32, bitcast=True) & 0x7F800000
    pbits = tl.maximum(pbits, 121 << 23)  # 2^-6: E4M3 subnormals have step 2^-9
    inv_q = ((254 << 23) - pbits).to(tl.float32, bitcast=True) * 8.0  # 1 / (2^e / 8), exact
    q = pbits.to(tl.float32, bitcast=True) * 0.125
    r = (a * inv_q + 12582912.0) - 12582912.0  # round to integer, nearest-even (|a * inv_q| <= 16)
    r = r * q
    return tl.where(y < 0, -r, r)


@triton.jit
def scale_of(amax, POW2: tl.constexpr):
    """(scale, 1/scale) from a group's amax, as quant_ref.scale_from_amax."""
    s = tl.div_rn(tl.maximum(amax, 1e-12), 448.0)
    if POW2:
        s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s, tl.div_rn(s * 0.0 + 1.0, s)


@triton.jit
def _quant_kernel(x_ptr, u_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, offs_ptr, tile_end_ptr,
                  M, K, E, limit,
                  sx_b, sx_m, sx_k, su_m, su_k,
                  sq_b, sq_m, ss_b, ss_m, ss_k, sqt_b, sqt_k, sst_b, sst_k, sst_m,
                  ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKS: tl.constexpr, BLOCKS_T: tl.constexpr,
                  SWIGLU: tl.constexpr, SEGMENTED: tl.constexpr, POW2: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if SEGMENTED:
        _e, row0, row_end = segment_tile(pid_m, offs_ptr, tile_end_ptr, E, BLOCK_E, BM)
    else:
        row0 = pid_m * BM
        row_end = tl.minimum(row0 + BM, M)
    rm = row0 + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    mask = (rm[:, None] < row_end) & (rk[None, :] < K)
    rm64 = rm.to(tl.int64)
    x = tl.load(x_ptr + b * sx_b + rm64[:, None] * sx_m + rk[None, :] * sx_k, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if SWIGLU:
        u = tl.load(u_ptr + rm64[:, None] * su_m + rk[None, :] * su_k, mask=mask, other=0.0).to(tl.float32)
        if limit > 0:
            x = tl.minimum(x, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        x = x / (1.0 + tl.exp(-x)) * u
    ax = tl.abs(x)
    if ROWS:  # one scale per row of the tile (1x128 along K)
        s, inv = scale_of(tl.max(ax, axis=1), POW2)
        q = round_e4m3(x * inv[:, None]).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + b * sq_b + rm64[:, None] * sq_m + rk[None, :], q, mask=mask)
        tl.store(s_ptr + b * ss_b + rm64 * ss_m + pid_k * ss_k, s, mask=rm < row_end)
    if COLS:  # one scale per column of the tile (1x128 along M), written transposed
        s, inv = scale_of(tl.max(ax, axis=0), POW2)
        q = round_e4m3(x * inv[None, :]).to(qt_ptr.dtype.element_ty)
        tl.store(qt_ptr + b * sqt_b + rk[None, :].to(tl.int64) * sqt_k + rm64[:, None], q, mask=mask)
        live = (rk < K) & (rk * 0 + row0 < row_end)  # no scale for a tile past the last segment
        tl.store(st_ptr + b * sst_b + rk.to(tl.int64) * sst_k + pid_m * sst_m, s, mask=live)
    if BLOCKS:  # one scale for the whole 128x128 tile; optionally its transpose too
        s, inv = scale_of(tl.max(tl.max(ax, axis=1), axis=0), POW2)
        q = round_e4m3(x * inv).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + b * sq_b + rm64[:, None] * sq_m + rk[None, :], q, mask=mask)
        tl.store(s_ptr + b * ss_b + pid_m * ss_m + pid_k * ss_k, s)
        if BLOCKS_T:
            tl.store(qt_ptr + b * sqt_b + rk[None, :].to(tl.int64) * sqt_k + rm64[:, None], q, mask=mask)



FP8 = torch.float8_e4m3fn


def _strides(t, batched, last=False):
    """(batch, row[, column]) strides of an optional output; zeros for an absent one."""
    if t is None:
        return (0, 0, 0) if last else (0, 0)
    out = ((t.stride(0) if batched and t.dim() == 3 else 0), t.stride(-2))
    return (*out, t.stride(-1)) if last else out


def _scales(rows: int, groups: int, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """fp32 scales [rows, groups], groups fastest. (Rows-fastest storage, which makes a tile's scales one
    contiguous load, measured slower in the GEMM: docs/benchmarks.md, run 2.)"""
    make = torch.zeros if zero else torch.empty
    return make((rows, groups), dtype=torch.float32, device=like.device)


def _launch(x, grid, *, up=None, q=None, s=None, qt=None, st=None, offs=None, tends=None, e=1,
            rows=False, cols=False, blocks=False, limit=0.0, pow2=False, bm=GROUP, bk=GROUP):
    dummy = x.new_empty(1)
    b3 = x.dim() == 3
    m, k = x.shape[-2:]
    _quant_kernel[grid](
        x, *(t if t is not None else dummy for t in (up, q, s, qt, st, offs, tends)),
        m, k, e, float(limit),
        x.stride(0) if b3 else 0, x.stride(-2), x.stride(-1),
        up.stride(0) if up is not None else 0, up.stride(1) if up is not None else 0,
        *_strides(q, b3), *_strides(s, b3, True), *_strides(qt, b3), *_strides(st, b3, True),
        ROWS=rows, COLS=cols, BLOCKS=blocks, BLOCKS_T=blocks and qt is not None, SWIGLU=up is not None,
        SEGMENTED=offs is not None, POW2=pow2, BM=bm, BK=bk, BLOCK_E=block_e(e),
        num_warps=8 if bm * bk >= GROUP * GROUP else 4,
    )


def quantize_act(x: torch.Tensor, *, pow2: bool = False, transpose: bool = False):
    """x [M, K] -> (q [M, K] e4m3, scale [M, K/128]); with ``transpose`` (q_t [K, M], scale [K, M/128])."""
    check_kernel_inputs(x)
    m, k = x.shape
    if transpose:
        qt = x.new_empty((k, m), dtype=FP8)
        st = _scales(k, cdiv(m, GROUP), x)
        _launch(x, (cdiv(m, GROUP), cdiv(k, 64), 1), qt=qt, st=st, cols=True, pow2=pow2, bk=64)
        return qt, st
    q = x.new_empty((m, k), dtype=FP8)
    s = _scales(m, cdiv(k, GROUP), x)
    _launch(x, (cdiv(m, 32), cdiv(k, GROUP), 1), q=q, s=s, rows=True, pow2=pow2, bm=32)
    return q, s


def quantize_act_dual(x: torch.Tensor, *, pow2: bool = False, up: torch.Tensor | None = None,
                      limit: float = 0.0):
    """One read of x [M, K] -> (q, scale) in 1x128 rows and (q_t [K, M], scale_t) in 1x128 columns.

    With ``up``, x is the SwiGLU gate and the quantised tensor is silu(min(x, limit)) * clamp(up, +-limit)
    (no clamping when limit is 0).
    """
    check_kernel_inputs(x)
    m, k = x.shape
    q = x.new_empty((m, k), dtype=FP8)
    s = _scales(m, cdiv(k, GROUP), x)
    qt = x.new_empty((k, m), dtype=FP8)
    st = _scales(k, cdiv(m, GROUP), x)
    _launch(x, (cdiv(m, GROUP), cdiv(k, GROUP), 1), up=up, q=q, s=s, qt=qt, st=st, rows=True, cols=True,
            limit=limit, pow2=pow2)
    return q, s, qt, st


def quantize_act_segments(x: torch.Tensor, offs: torch.Tensor, *, pow2: bool = False):
    """x [M, K] token-sorted by expert -> (q_t [K, M], scale_t [K, max_tiles]): 1x128 column groups that
    never cross an expert boundary; column t of scale_t belongs to tile t of ``grouping``."""
    check_kernel_inputs(x, offs)
    m, k = x.shape
    check_offsets(offs, m)
    e = offs.numel()
    nt = max_tiles(m, e)
    qt = torch.zeros((k, m), dtype=FP8, device=x.device)
    st = _scales(k, nt, x, zero=True)
    _launch(x, (nt, cdiv(k, 64), 1), qt=qt, st=st, offs=offs, tends=tile_ends(offs), e=e, cols=True,
            pow2=pow2, bk=64)
    return qt, st


def quantize_weight(w: torch.Tensor, *, pow2: bool = False, transpose: bool = True):
    """w [N, K] or stacked [E, N, K] -> (q, scale [.., N/128, K/128], q_t [.., K, N] or None)."""
    check_kernel_inputs(w)
    n, k = w.shape[-2:]
    lead = w.shape[:-2]
    nb = w.shape[0] if w.dim() == 3 else 1
    q = w.new_empty((*lead, n, k), dtype=FP8)
    s = w.new_empty((*lead, cdiv(n, GROUP), cdiv(k, GROUP)), dtype=torch.float32)
    qt = w.new_empty((*lead, k, n), dtype=FP8) if transpose else None
    _launch(w, (cdiv(n, GROUP), cdiv(k, GROUP), nb), q=q, s=s, qt=qt, blocks=True, pow2=pow2)
    return q, s, qt
