"""Hopper (sm_90) block-scaled FP8 GEMM in Gluon: C[M, N] = A[M, K] B[N, K]^T, the contract of
``gemm.fp8_gemm(..., b_block=True)`` (A in 1x128 groups along K, B in 128x128 blocks, fp32 accumulation).

Why a second kernel: the Triton GEMM waits for every K step's wgmma before promoting its product into the
fp32 accumulator, so the tensor cores idle while the CUDA cores promote. Here each K step's product is
issued asynchronously into its own registers and the previous step's product is promoted while it runs:

    step k:  wait for A_k, B_k in shared memory (TMA, mbarrier per ring stage)
             P_k = wgmma(A_k, B_k^T)          (async, fresh accumulator: use_acc=False)
             wgmma_wait(1)                    (P_{k-1} is complete, P_k keeps the tensor cores busy)
             refill the ring stage P_{k-1} read with the tile of step k-1+STAGES (TMA)
             acc += P_{k-1} * sa_{k-1}[rows] * sb_{k-1}

The registers of a promoted product are handed to the next wgmma as its (ignored) accumulator input, so
three BM x BN fp32 tiles are live: the accumulator, the product being promoted, the one in flight. With
BM = 128, BN = 128 and 8 warps (two warpgroups, 64 rows each) that is 192 registers a thread (ptxas of
Triton 3.6 for sm_90a: 224 in all, no spills, and no "wgmma serialized" warning: see _carry_step).
Tile edges in M and N are handled by TMA (zero fill on load, clipping on store); K needs 16-byte rows.
"""

from functools import cache

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from model.errors import MoeforgeError

from .gemm import _check
from .runtime import GROUP, cdiv

# BM rows per CTA (BM / 16 warps, one warpgroup per 64 rows), BN = 128 (one B scale block), STAGES-deep
# TMA ring; CARRY = 0 waits for each product before promoting it (the Triton kernel's schedule).
CONFIG = {"BM": 128, "STAGES": 4, "GROUP_M": 8, "CARRY": 1, "WS": 0, "CONSUMER_REGS": 232,
          "PRODUCER_REGS": 40}
BN = 128
_TORCH_TO_GL = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32,
                torch.float8_e4m3fn: gl.float8e4nv}
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@gluon.jit
def _issue_load(a_desc, b_desc, a_bufs, b_bufs, bars, step, nk, off_m, off_n,
                BK: gl.constexpr, STAGES: gl.constexpr):
    """TMA the A and B tiles of K step ``step`` into ring stage step % STAGES (nothing past the last)."""
    s = step % STAGES
    live = step < nk
    bar = bars.index(s)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, live)
    tma.async_copy_global_to_shared(a_desc, [off_m, step * BK], bar, a_bufs.index(s), live)
    tma.async_copy_global_to_shared(b_desc, [off_n, step * BK], bar, b_bufs.index(s), live)


@gluon.jit
def _release(k, a_desc, b_desc, a_bufs, b_bufs, ready, empty, nk, off_m, off_n,
             BK: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr):
    """Step k-1's product is complete in this warpgroup: hand its ring stage back. Warp-specialised: arrive on
    the stage's empty barrier (one arrival per consumer warpgroup); else sync the CTA and refill it here."""
    if WS:
        mbarrier.arrive(empty.index((k - 1) % STAGES))
    else:
        gl.thread_barrier()
        _issue_load(a_desc, b_desc, a_bufs, b_bufs, ready, k - 1 + STAGES, nk, off_m, off_n, BK, STAGES)


@gluon.jit
def _carry_step(k, acc, pend, spare, scale, a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptrs, sb_ptrs,
                rmask, s_sak, s_sbk, nk, off_m, off_n, BK: gl.constexpr, STAGES: gl.constexpr,
                A_PARTS: gl.constexpr, PART: gl.constexpr, WS: gl.constexpr):
    """K step k >= 1: issue P_k into ``spare`` (a promoted product's registers), wait for P_{k-1}
    (``pend``), release its ring stage, promote it with ``scale`` (its rows' sa times sb). Returns the
    accumulator, P_k in flight, P_{k-1}'s registers (now free) and P_k's scale."""
    s = k % STAGES
    # P_k's scales: loaded now, used a step later, so their latency hides behind the wgmma
    sa_k = gl.load(sa_ptrs + k * s_sak, mask=rmask, other=0.0)
    sb_k = gl.load(sb_ptrs + k * s_sbk)
    mbarrier.wait(ready.index(s), (k // STAGES) & 1)
    nxt = warpgroup_mma(a_bufs.index(s * A_PARTS + PART), b_bufs.index(s).permute((1, 0)), spare,
                        use_acc=False, is_async=True)
    prod = warpgroup_mma_wait(1, deps=(pend,))
    _release(k, a_desc, b_desc, a_bufs, b_bufs, ready, empty, nk, off_m, off_n, BK, STAGES, WS)
    acc = acc + prod * scale[:, None]
    # a no-op wait (only P_k is outstanding) that takes the accumulator: it pins the promotion before the
    # next wgmma, which reuses prod's registers (else LLVM sinks the FMAs past it, copies the tile and
    # ptxas serialises every wgmma of the kernel)
    acc = warpgroup_mma_wait(1, deps=(acc,))
    return acc, nxt, prod, sa_k * sb_k


@gluon.jit
def _mma_loop(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptrs, M, K, s_sam, s_sak, s_sbk,
              off_m, off_n, ROWS: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
              A_PARTS: gl.constexpr, PART: gl.constexpr, WS: gl.constexpr, CARRY: gl.constexpr,
              num_warps: gl.constexpr):
    """The K loop of one consumer (ROWS rows of the tile from row off_m, B's rows from off_n; sb_ptrs: the
    tile's 128x128 B scales at K step 0; rows from M on get scale 0): returns its fp32 accumulator."""
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 32])
    rows = off_m + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma_layout))
    sa_ptrs = sa_ptr + rows * s_sam
    rmask = rows < M
    nk = gl.cdiv(K, BK)
    acc = gl.zeros([ROWS, BN], gl.float32, mma_layout)
    spare = gl.zeros([ROWS, BN], gl.float32, mma_layout)
    if CARRY:
        # step 0 goes in flight; then steps in pairs, so the two product register sets swap roles twice
        # per iteration and the loop carries each in its own registers (no copies of a tile in flight)
        mbarrier.wait(ready.index(0), 0)
        pend = warpgroup_mma(a_bufs.index(PART), b_bufs.index(0).permute((1, 0)),
                             gl.zeros([ROWS, BN], gl.float32, mma_layout), use_acc=False, is_async=True)
        scale = gl.load(sa_ptrs, mask=rmask, other=0.0) * gl.load(sb_ptrs)
        for k in range(1, nk - 1, 2):
            acc, pend2, spare2, scale = _carry_step(k, acc, pend, spare, scale, a_desc, b_desc, a_bufs,
                                                    b_bufs, ready, empty, sa_ptrs, sb_ptrs, rmask, s_sak,
                                                    s_sbk, nk, off_m, off_n, BK, STAGES, A_PARTS, PART, WS)
            acc, pend, spare, scale = _carry_step(k + 1, acc, pend2, spare2, scale, a_desc, b_desc, a_bufs,
                                                  b_bufs, ready, empty, sa_ptrs, sb_ptrs, rmask, s_sak, s_sbk,
                                                  nk, off_m, off_n, BK, STAGES, A_PARTS, PART, WS)
        if (nk - 1) % 2 == 1:
            acc, pend2, spare2, scale2 = _carry_step(nk - 1, acc, pend, spare, scale, a_desc, b_desc, a_bufs,
                                                     b_bufs, ready, empty, sa_ptrs, sb_ptrs, rmask, s_sak,
                                                     s_sbk, nk, off_m, off_n, BK, STAGES, A_PARTS, PART, WS)
            prod = warpgroup_mma_wait(0, deps=(pend2,))
            acc = acc + prod * scale2[:, None]
        else:
            prod = warpgroup_mma_wait(0, deps=(pend,))
            acc = acc + prod * scale[:, None]
    else:
        # the Triton kernel's schedule: wait for each product, then promote it
        for k in range(0, nk):
            s = k % STAGES
            scale = gl.load(sa_ptrs + k * s_sak, mask=rmask, other=0.0) * gl.load(sb_ptrs + k * s_sbk)
            mbarrier.wait(ready.index(s), (k // STAGES) & 1)
            pend = warpgroup_mma(a_bufs.index(s * A_PARTS + PART), b_bufs.index(s).permute((1, 0)), spare,
                                 use_acc=False, is_async=True)
            spare = warpgroup_mma_wait(0, deps=(pend,))
            _release(k + 1, a_desc, b_desc, a_bufs, b_bufs, ready, empty, nk, off_m, off_n, BK, STAGES, WS)
            acc = acc + spare * scale[:, None]
    return acc


@gluon.jit
def _store_tile(acc, c_desc, c_smem, off_m, off_n):
    c_smem.store(acc.to(c_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
    tma.store_wait(0)


@gluon.jit
def _tile_offsets(M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """Grouped tile order: GROUP_M row tiles in a row share the B tiles they stream through L2."""
    pid = gl.program_id(0)
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m * BM, pid_n * BN


@gluon.jit
def _ring(a_desc, b_desc, STAGES: gl.constexpr):
    """The one-partition kernels' shared-memory ring: STAGES A and B tiles, one barrier per stage."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    return a_bufs, b_bufs, bars


@gluon.jit
def _ws_ring(a_desc, b_desc, STAGES: gl.constexpr):
    """The warp-specialised kernels' ring: two 64-row A halves and one B tile per stage, "ready" barriers
    the producer's loads complete and "empty" ones both consumers arrive on."""
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES, 64, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    return a_bufs, b_bufs, ready, empty


@gluon.jit
def _fp8_gemm_gluon_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, M, N, K, s_sam, s_sak, s_sbn, s_sbk,
                           GROUP_M: gl.constexpr, STAGES: gl.constexpr, CARRY: gl.constexpr,
                           num_warps: gl.constexpr):
    """One partition: BM / 16 warps issue the TMA loads (STAGES steps ahead) and the wgmmas."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    gl.static_assert(BN == 128, "one B scale block per N tile")
    gl.static_assert(BM == 16 * num_warps, "one m16 wgmma row block per warp")
    off_m, off_n = _tile_offsets(M, N, BM, BN, GROUP_M)

    a_bufs, b_bufs, bars = _ring(a_desc, b_desc, STAGES)
    nk = gl.cdiv(K, BK)
    for i in gl.static_range(STAGES):
        _issue_load(a_desc, b_desc, a_bufs, b_bufs, bars, i, nk, off_m, off_n, BK, STAGES)

    acc = _mma_loop(a_desc, b_desc, a_bufs, b_bufs, bars, bars, sa_ptr, sb_ptr + (off_n // 128) * s_sbn, M, K,
                    s_sam, s_sak, s_sbk, off_m, off_n, BM, BN, BK, STAGES, 1, 0, False, CARRY, num_warps)
    # both warpgroups are out of the loop (their barrier waits and wgmma reads) before the barriers go and
    # the output tile's buffer (which may share the ring's shared memory) is written
    gl.thread_barrier()
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [BM, BN], c_desc.layout)
    _store_tile(acc, c_desc, c_smem, off_m, off_n)


@gluon.jit
def _ws_consumer(PART: gl.constexpr, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sa_ptr,
                 sb_ptr, M, K, s_sam, s_sak, s_sbn, s_sbk, off_m, off_n, BN: gl.constexpr, BK: gl.constexpr,
                 STAGES: gl.constexpr, CARRY: gl.constexpr):
    """One consumer warpgroup: rows PART * 64 ... + 63 of the tile."""
    row0 = off_m + PART * 64
    sb_ptrs = sb_ptr + (off_n // 128) * s_sbn
    acc = _mma_loop(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptrs, M, K, s_sam, s_sak, s_sbk,
                    row0, off_n, 64, BN, BK, STAGES, 2, PART, True, CARRY, 4)
    _store_tile(acc, c_desc, c_bufs.index(PART), row0, off_n)


@gluon.jit
def _ws_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, K, off_m, off_n, BK: gl.constexpr,
                 STAGES: gl.constexpr):
    """One warp streaming both 64-row halves of A and the B tile of every K step through the ring."""
    for k in range(0, gl.cdiv(K, BK)):
        s = k % STAGES
        mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [off_m, k * BK], bar, a_bufs.index(2 * s))
        tma.async_copy_global_to_shared(a_desc, [off_m + 64, k * BK], bar, a_bufs.index(2 * s + 1))
        tma.async_copy_global_to_shared(b_desc, [off_n, k * BK], bar, b_bufs.index(s))


@gluon.jit
def _fp8_gemm_gluon_ws_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, M, N, K, s_sam, s_sak, s_sbn, s_sbk,
                              GROUP_M: gl.constexpr, STAGES: gl.constexpr, CARRY: gl.constexpr,
                              CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                              num_warps: gl.constexpr):
    """Warp-specialised (DeepGEMM's layout): a 128 x 128 tile, two consumer warpgroups of 64 rows (the
    default partition and a 4-warp worker) and a 1-warp TMA producer; the ring's stages are handed back
    through "empty" barriers that both consumers arrive on."""
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    gl.static_assert(a_desc.block_type.shape[0] == 64, "A is loaded in 64-row halves")
    gl.static_assert(BN == 128, "one B scale block per N tile")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    off_m, off_n = _tile_offsets(M, N, 128, BN, GROUP_M)

    a_bufs, b_bufs, ready, empty = _ws_ring(a_desc, b_desc, STAGES)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, 64, BN], c_desc.layout)
    # (the argument tuples are spelled out: a tuple built by concatenation turns constexprs into tensors)
    gl.warp_specialize([
        (_ws_consumer, (0, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sa_ptr, sb_ptr, M, K,
                        s_sam, s_sak, s_sbn, s_sbk, off_m, off_n, BN, BK, STAGES, CARRY)),
        (_ws_consumer, (1, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, sa_ptr, sb_ptr, M, K,
                        s_sam, s_sak, s_sbn, s_sbk, off_m, off_n, BN, BK, STAGES, CARRY)),
        (_ws_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, K, off_m, off_n, BK, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# Gluon is experimental and its API moves between triton releases (3.7+ renamed the TMA copies and dropped
# gl.thread_barrier), so the Gluon kernels run only under the triton they were written and measured with;
# under any other the Triton kernels take their products.
GLUON_TRITON = (3, 6)


def gluon_triton_ok(version: str = triton.__version__) -> bool:
    """Whether this triton release is the one the Gluon kernels target (``GLUON_TRITON``)."""
    return tuple(int(x) for x in version.split(".")[:2]) == GLUON_TRITON


@cache
def smem_layout(rows: int, cols: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a TMA block (built once per block shape and dtype: part of the host cost
    of a call)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _TORCH_TO_GL[dtype])


def gluon_supported(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``fp8_gemm_gluon`` runs on these operands: sm_90 CUDA under the targeted triton, 16-byte
    aligned rows and bases."""
    if not (a.is_cuda and b.is_cuda) or out_dtype not in OUT_DTYPES or not gluon_triton_ok():
        return False
    if torch.cuda.get_device_capability(a.device) != (9, 0):
        return False
    m, k = a.shape
    n = b.shape[0]
    out_bytes = torch.empty((), dtype=out_dtype).element_size()
    return (m > 0 and n > 0 and k > 0 and a.stride(1) == 1 and b.stride(1) == 1 and a.stride(0) % 16 == 0
            and b.stride(0) % 16 == 0 and (n * out_bytes) % 16 == 0 and a.data_ptr() % 16 == 0
            and b.data_ptr() % 16 == 0)


def fp8_gemm_gluon(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, *,
                   out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """a [M, K] e4m3 with sa [M, K/128] times b [N, K] e4m3 with 128x128 block scales sb [N/128, K/128]
    -> [M, N] in ``out_dtype``: the Hopper kernel above (``gluon_supported`` must hold)."""
    _check(a, sa, b, sb, True)
    if not gluon_supported(a, b, out_dtype):
        raise MoeforgeError(f"fp8_gemm_gluon needs sm_90 CUDA tensors with 16-byte aligned rows and a "
                            f"bf16/fp16/fp32 output, got a {tuple(a.shape)} on {a.device}, "
                            f"b {tuple(b.shape)}, {out_dtype}")
    return _launch(a, sa, b, sb, out_dtype, dict(CONFIG, **(config or {})))


def _launch(a, sa, b, sb, out_dtype, cfg):
    m, k = a.shape
    n = b.shape[0]
    ws = bool(cfg["WS"])
    bm = 128 if ws else cfg["BM"]
    a_rows = 64 if ws else bm  # the warp-specialised kernel loads A in 64-row halves, one per consumer
    c_rows = 64 if ws else bm
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    fp8 = torch.float8_e4m3fn
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [a_rows, GROUP], smem_layout(a_rows, GROUP, fp8))
    b_desc = TensorDescriptor(b, [n, k], [b.stride(0), 1], [BN, GROUP], smem_layout(BN, GROUP, fp8))
    c_desc = TensorDescriptor(c, [m, n], [n, 1], [c_rows, BN], smem_layout(c_rows, BN, out_dtype))
    grid = (cdiv(m, bm) * cdiv(n, BN),)
    args = (a_desc, b_desc, c_desc, sa, sb, m, n, k, *sa.stride(), *sb.stride())
    if ws:
        _fp8_gemm_gluon_ws_kernel[grid](*args, GROUP_M=cfg["GROUP_M"], STAGES=cfg["STAGES"],
                                        CARRY=bool(cfg["CARRY"]), CONSUMER_REGS=cfg["CONSUMER_REGS"],
                                        PRODUCER_REGS=cfg["PRODUCER_REGS"], num_warps=4)
    else:
        _fp8_gemm_gluon_kernel[grid](*args, GROUP_M=cfg["GROUP_M"], STAGES=cfg["STAGES"],
                                     CARRY=bool(cfg["CARRY"]), num_warps=bm // 16)
    return c


__all__ = ["CONFIG", "fp8_gemm_gluon", "gluon_supported"]
