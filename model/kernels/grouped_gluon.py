"""Hopper (sm_90) block-scaled FP8 grouped GEMM in Gluon: the contract of ``grouped_gemm.fp8_grouped_gemm``
(rows of A [M, K] sorted by expert, cumulative ends ``offs`` [E]; out[seg_e] = A[seg_e] B[e]^T with B
[E, N, K] in 128x128 blocks), on the carried-product K loop of ``gemm_gluon`` (its ``_mma_loop``).

Tile map (no host synchronisation): program (pid_n, t) owns output columns pid_n * 128 ... and tile t of
the expert-by-expert numbering of ``grouping`` (expert e's segment cut into ceil(count_e / 128) row tiles).
Each program reads the E offsets, counts tiles per expert and scans them (``_segment_tile``); the grid has
``grouping.max_tiles(M, E)`` tile rows, an upper bound, and the programs past the last tile zero the rows
after ``offs[-1]`` (at most that many tiles: see ``tests/kernels/test_grouped_gluon_map.py``), so the output
needs no memset.

A tile's 128 rows may run past its expert's end: TMA loads them anyway (into rows of the next expert, or
zeros past M), their A scales load as 0, and the epilogue stores only rows < the segment end, through
registers with a row mask (a TMA store would write the next expert's rows). B is one [E * N, K]
descriptor; expert e's tile starts at row e * N + pid_n * 128 (rows past N belong to expert e + 1 and land
in columns the store masks off).
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from model.errors import MoeforgeError

from .gemm_gluon import (
    BN,
    OUT_DTYPES,
    _issue_load,
    _mma_loop,
    _ring,
    _ws_producer,
    _ws_ring,
    gluon_triton_ok,
    smem_layout,
)
from .grouping import max_tiles
from .runtime import GROUP, cdiv

# 128-row tiles (the tile map's), STAGES-deep TMA ring; WS: two consumer warpgroups and a TMA warp
CONFIG = {"STAGES": 4, "CARRY": 1, "WS": 0, "CONSUMER_REGS": 232, "PRODUCER_REGS": 40}
BM = GROUP


@gluon.jit
def _add(x, y):
    return x + y


@gluon.jit
def _segment_tile(t, offs_ptr, M, E, BM: gl.constexpr, BLOCK_E: gl.constexpr, num_warps: gl.constexpr):
    """Tile t's (expert, first row, end row, True); past the last tile: (E - 1, r0, r1, False) with the rows
    r0 <= r < r1 after offs[-1] that this program zeroes instead (empty when there are none left)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    idx = gl.arange(0, BLOCK_E, layout=layout)
    live = idx < E
    ends = gl.load(offs_ptr + idx, mask=live, other=0)
    starts = gl.load(offs_ptr + idx - 1, mask=live & (idx > 0), other=0)
    tiles = gl.where(live, (gl.maximum(ends - starts, 0) + BM - 1) // BM, 0)
    tile_end = gl.associative_scan(tiles, 0, _add)
    e = gl.sum((live & (tile_end <= t)).to(gl.int32), axis=0)  # = E past the last tile
    first = gl.sum(gl.where(idx < e, tiles, 0), axis=0)
    seg_start = gl.sum(gl.where(idx == e, starts, 0), axis=0)
    seg_end = gl.sum(gl.where(idx == e, ends, 0), axis=0)
    last = gl.sum(gl.where(idx == E - 1, ends, 0), axis=0)
    row0 = gl.where(e < E, seg_start + (t - first) * BM, last + (t - first) * BM)
    row_end = gl.where(e < E, gl.minimum(seg_end, row0 + BM), gl.minimum(M, row0 + BM))
    return gl.minimum(e, E - 1), row0, row_end, e < E


@gluon.jit
def _store_rows(val, c_ptr, row0, row_end, n0, N, s_cm, ROWS: gl.constexpr, BN: gl.constexpr,
                VEC: gl.constexpr, TPW_N: gl.constexpr, num_warps: gl.constexpr):
    """Store a ROWS x BN tile at (row0, n0), only rows < row_end and columns < N: through registers in a
    layout with VEC-element (16-byte) runs per thread along N."""
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])
    val = gl.convert_layout(val.to(c_ptr.dtype.element_ty), layout)
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    ptrs = c_ptr + rows.to(gl.int64)[:, None] * s_cm + cols[None, :]
    gl.store(ptrs, val, mask=(rows[:, None] < row_end) & (cols[None, :] < N))


@gluon.jit
def _zero_rows(c_ptr, row0, row_end, n0, N, s_cm, ROWS: gl.constexpr, BN: gl.constexpr, VEC: gl.constexpr,
               TPW_N: gl.constexpr, num_warps: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])
    _store_rows(gl.zeros([ROWS, BN], gl.float32, layout), c_ptr, row0, row_end, n0, N, s_cm, ROWS, BN, VEC,
                TPW_N, num_warps)


@gluon.jit
def _grouped_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, offs_ptr, M, N, K, E, s_cm, s_sam, s_sak, s_sbe,
                    s_sbn, s_sbk, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, CARRY: gl.constexpr,
                    VEC: gl.constexpr, TPW_N: gl.constexpr, num_warps: gl.constexpr):
    """One partition, BM / 16 warps loading and multiplying (the dense ``_fp8_gemm_gluon_kernel``)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    gl.static_assert(BN == 128, "one B scale block per N tile")
    gl.static_assert(BM == 16 * num_warps, "one m16 wgmma row block per warp")
    n0 = gl.program_id(0) * BN
    e, row0, row_end, tile = _segment_tile(gl.program_id(1), offs_ptr, M, E, BM, BLOCK_E, num_warps)

    a_bufs, b_bufs, bars = _ring(a_desc, b_desc, STAGES)
    if tile:
        b_row = e * N + n0
        nk = gl.cdiv(K, BK)
        for i in gl.static_range(STAGES):
            _issue_load(a_desc, b_desc, a_bufs, b_bufs, bars, i, nk, row0, b_row, BK, STAGES)
        sb_ptrs = sb_ptr + e.to(gl.int64) * s_sbe + (n0 // 128) * s_sbn
        acc = _mma_loop(a_desc, b_desc, a_bufs, b_bufs, bars, bars, sa_ptr, sb_ptrs, row_end, K, s_sam, s_sak,
                        s_sbk, row0, b_row, BM, BN, BK, STAGES, 1, 0, False, CARRY, num_warps)
        # both warpgroups are done reading the ring before the epilogue's layout conversion, whose shared
        # scratch may overlap it, writes there
        gl.thread_barrier()
        _store_rows(acc, c_ptr, row0, row_end, n0, N, s_cm, BM, BN, VEC, TPW_N, num_warps)
    else:
        _zero_rows(c_ptr, row0, row_end, n0, N, s_cm, BM, BN, VEC, TPW_N, num_warps)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _ws_consumer(PART: gl.constexpr, a_desc, b_desc, a_bufs, b_bufs, ready, empty, c_ptr, sa_ptr, sb_ptrs,
                 tile, row0, row_end, b_row, n0, N, K, s_cm, s_sam, s_sak, s_sbk, BN: gl.constexpr,
                 BK: gl.constexpr, STAGES: gl.constexpr, CARRY: gl.constexpr, VEC: gl.constexpr,
                 TPW_N: gl.constexpr):
    """One consumer warpgroup: rows PART * 64 ... + 63 of the tile."""
    r0 = row0 + PART * 64
    if tile:
        acc = _mma_loop(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptrs, row_end, K, s_sam,
                        s_sak, s_sbk, r0, b_row, 64, BN, BK, STAGES, 2, PART, True, CARRY, 4)
        _store_rows(acc, c_ptr, r0, row_end, n0, N, s_cm, 64, BN, VEC, TPW_N, 4)
    else:
        _zero_rows(c_ptr, r0, row_end, n0, N, s_cm, 64, BN, VEC, TPW_N, 4)


@gluon.jit
def _grouped_ws_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, offs_ptr, M, N, K, E, s_cm, s_sam, s_sak, s_sbe,
                       s_sbn, s_sbk, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, CARRY: gl.constexpr,
                       VEC: gl.constexpr, TPW_N: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Warp-specialised (the dense ``_fp8_gemm_gluon_ws_kernel``): two 64-row consumer warpgroups and a
    1-warp TMA producer, which streams no K step for a program past the last tile."""
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    gl.static_assert(a_desc.block_type.shape[0] == 64, "A is loaded in 64-row halves")
    gl.static_assert(BN == 128, "one B scale block per N tile")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    n0 = gl.program_id(0) * BN
    e, row0, row_end, tile = _segment_tile(gl.program_id(1), offs_ptr, M, E, 128, BLOCK_E, num_warps)
    b_row = e * N + n0
    k_live = gl.where(tile, K, 0)
    sb_ptrs = sb_ptr + e.to(gl.int64) * s_sbe + (n0 // 128) * s_sbn

    a_bufs, b_bufs, ready, empty = _ws_ring(a_desc, b_desc, STAGES)
    gl.warp_specialize([
        (_ws_consumer, (0, a_desc, b_desc, a_bufs, b_bufs, ready, empty, c_ptr, sa_ptr, sb_ptrs, tile,
                        row0, row_end, b_row, n0, N, K, s_cm, s_sam, s_sak, s_sbk, BN, BK, STAGES, CARRY, VEC,
                        TPW_N)),
        (_ws_consumer, (1, a_desc, b_desc, a_bufs, b_bufs, ready, empty, c_ptr, sa_ptr, sb_ptrs, tile,
                        row0, row_end, b_row, n0, N, K, s_cm, s_sam, s_sak, s_sbk, BN, BK, STAGES, CARRY, VEC,
                        TPW_N)),
        (_ws_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, k_live, row0, b_row, BK, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def segment_tile_ref(t: torch.Tensor, offs: torch.Tensor, m: int, block: int = BM):
    """``_segment_tile`` in PyTorch, for tile numbers t [T]: (expert, row0, row_end, is_tile), the same
    formulas (the CPU tests check them against ``grouping.tile_rows_ref`` and for a cover of all M rows)."""
    idx = torch.arange(offs.numel(), device=offs.device)
    ends = offs.long()
    starts = torch.where(idx > 0, ends.roll(1), 0)
    tiles = ((ends - starts).clamp_min(0) + block - 1) // block
    tile_end = torch.cumsum(tiles, 0)
    t = t.long()[:, None]
    e = (tile_end[None, :] <= t).sum(1)
    first = torch.where(idx[None, :] < e[:, None], tiles[None, :], 0).sum(1)
    live = e < offs.numel()
    e_safe = e.clamp_max(offs.numel() - 1)
    row0 = torch.where(live, starts[e_safe], ends[-1]) + (t[:, 0] - first) * block
    row_end = torch.where(live, torch.minimum(ends[e_safe], row0 + block), (row0 + block).clamp_max(m))
    return e_safe, row0, row_end, live


def grouped_gluon_supported(a: torch.Tensor, b: torch.Tensor,
                            out_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``fp8_grouped_gemm_gluon`` runs on these operands: sm_90 CUDA under the targeted triton,
    16-byte aligned rows and bases, b [E, N, K] viewable as [E * N, K]."""
    if not (a.is_cuda and b.is_cuda) or out_dtype not in OUT_DTYPES or a.dim() != 2 or b.dim() != 3:
        return False
    if not gluon_triton_ok():
        return False
    if torch.cuda.get_device_capability(a.device) != (9, 0):
        return False
    n_exp, n, k = b.shape
    return (a.shape[0] > 0 and n_exp > 0 and n > 0 and k > 0 and a.stride(1) == 1 and b.stride(2) == 1
            and a.stride(0) % 16 == 0 and b.stride(1) % 16 == 0 and b.stride(0) == n * b.stride(1)
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


def fp8_grouped_gemm_gluon(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                           offs: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16,
                           config: dict | None = None) -> torch.Tensor:
    """a [M, K] e4m3 (sa [M, K/128]), b [E, N, K] e4m3 (sb [E, N/128, K/128]), offs [E] int32 cumulative row
    ends -> [M, N] (rows past offs[-1] zero): the kernels above (``grouped_gluon_supported`` must hold)."""
    from .grouped_gemm import check_grouped

    check_grouped(a, sa, b, sb, offs)
    if not grouped_gluon_supported(a, b, out_dtype):
        raise MoeforgeError(f"fp8_grouped_gemm_gluon needs sm_90 CUDA tensors with 16-byte aligned rows and "
                            f"a bf16/fp16/fp32 output, got a {tuple(a.shape)} on {a.device}, "
                            f"b {tuple(b.shape)}, {out_dtype}")
    n_exp, n, k = b.shape
    nk = cdiv(k, GROUP)
    if tuple(sa.shape) != (a.shape[0], nk) or tuple(sb.shape) != (n_exp, cdiv(n, GROUP), nk):
        raise MoeforgeError(f"grouped GEMM scale shapes {tuple(sa.shape)}, {tuple(sb.shape)} do not match "
                            f"a {tuple(a.shape)}, b {tuple(b.shape)}")
    return _launch(a, sa, b, sb, offs, out_dtype, dict(CONFIG, **(config or {})))


def launch_params(out_dtype: torch.dtype, n_exp: int, ws: bool) -> dict:
    """Constexprs of the epilogue (16-byte runs per thread) and of the tile map (BLOCK_E >= E, >= one
    element per thread)."""
    vec = 16 // torch.empty((), dtype=out_dtype).element_size()
    warps = 4 if ws else BM // 16
    block_e = max(32 * warps, 1 << (n_exp - 1).bit_length())
    return {"VEC": vec, "TPW_N": min(32, BN // vec), "BLOCK_E": block_e}


def _launch(a, sa, b, sb, offs, out_dtype, cfg):
    m, k = a.shape
    n_exp, n, _ = b.shape
    ws = bool(cfg["WS"])
    a_rows = 64 if ws else BM
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    fp8 = torch.float8_e4m3fn
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [a_rows, GROUP], smem_layout(a_rows, GROUP, fp8))
    b_desc = TensorDescriptor(b, [n_exp * n, k], [b.stride(1), 1], [BN, GROUP], smem_layout(BN, GROUP, fp8))
    grid = (cdiv(n, BN), max_tiles(m, n_exp, BM))
    args = (a_desc, b_desc, c, sa, sb, offs, m, n, k, n_exp, c.stride(0), *sa.stride(), *sb.stride())
    consts = launch_params(out_dtype, n_exp, ws)
    if ws:
        _grouped_ws_kernel[grid](*args, STAGES=cfg["STAGES"], CARRY=bool(cfg["CARRY"]),
                                 CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"],
                                 num_warps=4, **consts)
    else:
        _grouped_kernel[grid](*args, STAGES=cfg["STAGES"], CARRY=bool(cfg["CARRY"]), num_warps=BM // 16,
                              **consts)
    return c


__all__ = ["CONFIG", "fp8_grouped_gemm_gluon", "grouped_gluon_supported", "segment_tile_ref"]
