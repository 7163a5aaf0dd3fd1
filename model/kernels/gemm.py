"""Triton block-scaled FP8 GEMM: C[M, N] = A[M, K] B[N, K]^T with per-128-K-step scales.

Both operands are K-major (the layout FP8 tensor-core instructions want). A has one fp32 scale per 1x128
group along K; B has one per 128x128 block (forward, input gradient) or one per 1x128 group along K
(weight gradient, where both operands are quantised along the token axis). Every 128-wide K step is
multiplied in FP8 and promoted to an fp32 accumulator with its scales (the DeepSeek recipe).
"""

import torch
import triton
import triton.language as tl

from model.errors import MoeforgeError

from .runtime import GROUP, cdiv, check_kernel_inputs, interpreting


@triton.jit
def scaled_step(acc, a, b, sa, sb, SB_SCALAR: tl.constexpr):
    """acc + (a @ b^T) * scales; sb is a scalar (one 128x128 block) or a vector over N."""
    p = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
    if SB_SCALAR:
        return acc + p * (sa * sb)[:, None]
    return acc + p * (sa[:, None] * sb[None, :])


@triton.jit
def load_step(a_ptrs, b_ptrs, rk, K, kb, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """Step ``kb``'s A and B tiles (pointers already advanced to it)."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        a = tl.load(a_ptrs, mask=rk[None, :] < K - kb * BK, other=0.0)
        b = tl.load(b_ptrs, mask=rk[None, :] < K - kb * BK, other=0.0)
    return a, b


@triton.jit
def promote(acc, p, sa, sb, SB_SCALAR: tl.constexpr):
    """acc + p * scales of one K step (sb a scalar or a vector over N)."""
    if SB_SCALAR:
        acc = acc + p * (sa * sb)[:, None]
    else:
        acc = acc + p * (sa[:, None] * sb[None, :])
    return acc


@triton.jit
def carried_loop(acc, a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, s_sak, s_sbk, K, BK: tl.constexpr,
                 SB_SCALAR: tl.constexpr, EVEN_K: tl.constexpr, WS: tl.constexpr):
    """K loop with the product carried one iteration: step kb's dot is issued into a fresh accumulator
    before step kb-1's product is promoted, so an asynchronous wgmma may overlap the promotion."""
    rk = tl.arange(0, BK)
    nk = tl.cdiv(K, BK)
    a, b = load_step(a_ptrs, b_ptrs, rk, K, 0, BK, EVEN_K)
    p = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
    sa = tl.load(sa_ptrs)
    sb = tl.load(sb_ptrs)
    for kb in tl.range(1, nk, warp_specialize=WS):
        a, b = load_step(a_ptrs + kb * BK, b_ptrs + kb * BK, rk, K, kb, BK, EVEN_K)
        q = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        acc = promote(acc, p, sa, sb, SB_SCALAR)
        p = q
        sa = tl.load(sa_ptrs + kb * s_sak)
        sb = tl.load(sb_ptrs + kb * s_sbk)
    return promote(acc, p, sa, sb, SB_SCALAR)


@triton.jit
def mainloop(a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, s_sak, s_sbk, K,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SB_SCALAR: tl.constexpr,
             EVEN_K: tl.constexpr, SPLIT: tl.constexpr, WS: tl.constexpr = False,
             CARRY: tl.constexpr = False):
    """The K loop shared by the dense and the grouped kernel: returns the fp32 accumulator.
    SPLIT=2 issues two FP8 products before promoting either; WS asks Triton to warp-specialise the loop;
    CARRY issues step k+1's product before promoting step k's (carried across iterations)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if CARRY:
        acc = carried_loop(acc, a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, s_sak, s_sbk, K, BK, SB_SCALAR, EVEN_K, WS)
    else:
        acc = split_loop(acc, a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, s_sak, s_sbk, K, BK, SB_SCALAR, EVEN_K, SPLIT,
                         WS)
    return acc


@triton.jit
def split_loop(acc, a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, s_sak, s_sbk, K, BK: tl.constexpr,
               SB_SCALAR: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr, WS: tl.constexpr):
    """K loop promoting each step's product (SPLIT=1) or each pair of products (SPLIT=2) as it comes."""
    rk = tl.arange(0, BK)
    nk = tl.cdiv(K, BK)
    for kb in tl.range(0, nk, SPLIT, warp_specialize=WS):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - kb * BK, other=0.0)
            b = tl.load(b_ptrs, mask=rk[None, :] < K - kb * BK, other=0.0)
        if SPLIT == 2:
            a1 = tl.load(a_ptrs + BK)
            b1 = tl.load(b_ptrs + BK)
            p0 = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
            p1 = tl.dot(a1, tl.trans(b1), out_dtype=tl.float32)
            sa0 = tl.load(sa_ptrs + kb * s_sak)
            sa1 = tl.load(sa_ptrs + (kb + 1) * s_sak)
            sb0 = tl.load(sb_ptrs + kb * s_sbk)
            sb1 = tl.load(sb_ptrs + (kb + 1) * s_sbk)
            if SB_SCALAR:
                acc = acc + p0 * (sa0 * sb0)[:, None]
                acc = acc + p1 * (sa1 * sb1)[:, None]
            else:
                acc = acc + p0 * (sa0[:, None] * sb0[None, :])
                acc = acc + p1 * (sa1[:, None] * sb1[None, :])
        else:
            sa = tl.load(sa_ptrs + kb * s_sak)
            acc = scaled_step(acc, a, b, sa, tl.load(sb_ptrs + kb * s_sbk), SB_SCALAR)
        a_ptrs += BK * SPLIT
        b_ptrs += BK * SPLIT
    return acc


@triton.jit
def b_scale_ptrs(sb_ptr, pid_n, rn, s_sbn, B_BLOCK: tl.constexpr, BN: tl.constexpr):
    """Pointers to B's scales for this N tile: a scalar when one 128x128 block covers it."""
    if B_BLOCK and BN <= 128:
        return sb_ptr + ((pid_n * BN) // 128) * s_sbn
    elif B_BLOCK:
        return sb_ptr + (rn // 128) * s_sbn
    else:
        return sb_ptr + rn * s_sbn


@triton.jit
def _gemm_tile(tile, a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K,
               s_am, s_bn, s_cm, s_sam, s_sak, s_sbn, s_sbk,
               B_BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr, WS: tl.constexpr,
               CARRY: tl.constexpr):
    """Compute and store output tile number ``tile`` (grouped ordering for L2 reuse)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (tile // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % size_m
    pid_n = (tile % width) // size_m
    rm = (pid_m * BM + tl.arange(0, BM)) % M
    rn = (pid_n * BN + tl.arange(0, BN)) % N
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * s_am + rk[None, :]
    b_ptrs = b_ptr + rn[:, None].to(tl.int64) * s_bn + rk[None, :]
    sb_ptrs = b_scale_ptrs(sb_ptr, pid_n, rn, s_sbn, B_BLOCK, BN)
    acc = mainloop(a_ptrs, b_ptrs, sa_ptr + rm * s_sam, sb_ptrs, s_sak, s_sbk, K, BM, BN, BK,
                   B_BLOCK and BN <= 128, EVEN_K, SPLIT, WS, CARRY)
    cm = pid_m * BM + tl.arange(0, BM)
    cn = pid_n * BN + tl.arange(0, BN)
    c_ptrs = c_ptr + cm[:, None].to(tl.int64) * s_cm + cn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(cm[:, None] < M) & (cn[None, :] < N))


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K,
                     s_am, s_bn, s_cm, s_sam, s_sak, s_sbn, s_sbk,
                     B_BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                     PERSISTENT: tl.constexpr, WS: tl.constexpr, CARRY: tl.constexpr):
    """One tile per program, or (PERSISTENT) a fixed grid of programs striding over all tiles."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm_tile(tile, a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, s_am, s_bn, s_cm, s_sam, s_sak,
                       s_sbn, s_sbk, B_BLOCK, BM, BN, BK, GROUP_M, EVEN_K, SPLIT, WS, CARRY)
    else:
        _gemm_tile(tl.program_id(0), a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, s_am, s_bn, s_cm,
                   s_sam, s_sak, s_sbn, s_sbk, B_BLOCK, BM, BN, BK, GROUP_M, EVEN_K, SPLIT, WS, CARRY)


# Default launch configuration (H200 measurements in docs/benchmarks.md); interpreter uses small tiles.
# GLUON: hand 128x128-block products of at least GLUON_MIN_GFLOP on sm_90 to the Gluon kernel
# (gemm_gluon.py). On an H100 (bench/results/fp8-run4-h100.json) it was 1.24x the Triton kernel at 8192^3
# but 0.12x at 8192x512x1024 (8.6 GFLOP) and 0.8-1.03x at 34 GFLOP, ahead from 69 GFLOP: a fixed cost of
# about 0.15 ms a call, which small products do not hide.
CONFIG = {"BM": 128, "BN": 128, "GROUP_M": 8, "SPLIT": 1, "num_warps": 8, "num_stages": 4, "PERSISTENT": 0,
          "WS": 0, "CARRY": 0, "GLUON": 1, "GLUON_MIN_GFLOP": 64, "GLUON_GROUPED": 0}
# GLUON_GROUPED: the same for fp8_grouped_gemm (grouped_gluon.py). Off until the kernel has run on a GPU: it
# compiles for sm_90a without spills, but its GPU tests and speed are not yet measured (docs/benchmarks.md).


def wants_gluon(cfg: dict, a: torch.Tensor, flop: int) -> bool:
    """Whether ``cfg`` sends a product of ``flop`` on ``a``'s device to a Gluon kernel (GLUON above); the
    kernel's own ``*_supported`` check decides the rest."""
    return bool(cfg["GLUON"]) and flop >= cfg["GLUON_MIN_GFLOP"] * 1e9 and a.is_cuda and not interpreting()


def _num_programs(tiles: int, persistent: int, device: torch.device) -> int:
    """Grid size: one program per tile, or ``persistent`` programs per SM."""
    if not persistent:
        return tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return min(tiles, persistent * sms)


def _check(a, sa, b, sb, b_block):
    check_kernel_inputs(a, sa, b, sb)
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise MoeforgeError(f"fp8_gemm wants float8_e4m3fn operands, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or a.stride(1) != 1 or b.stride(1) != 1:
        raise MoeforgeError(f"fp8_gemm wants K-major a [M, K] and b [N, K], got {tuple(a.shape)} and "
                            f"{tuple(b.shape)} with strides {a.stride()} and {b.stride()}")
    want_sb = (cdiv(n, GROUP), cdiv(k, GROUP)) if b_block else (n, cdiv(k, GROUP))
    if tuple(sa.shape) != (m, cdiv(k, GROUP)) or tuple(sb.shape) != want_sb:
        raise MoeforgeError(f"fp8_gemm scale shapes {tuple(sa.shape)}, {tuple(sb.shape)} do not match "
                            f"a {tuple(a.shape)}, b {tuple(b.shape)} (b_block={b_block})")


def fp8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, *,
             out_dtype: torch.dtype = torch.bfloat16, b_block: bool = True, config: dict | None = None):
    """a [M, K] e4m3 with sa [M, K/128] times b [N, K] e4m3 with sb [N/128, K/128] (``b_block``) or
    [N, K/128] -> [M, N] in ``out_dtype``, accumulated in fp32. With ``GLUON`` set (``config`` or CONFIG),
    block-scaled products of at least ``GLUON_MIN_GFLOP`` on an sm_90 GPU run the Gluon kernel where
    ``gemm_gluon.gluon_supported``;
    everything else (row-scaled B, other GPUs, the interpreter) runs the Triton kernel below."""
    _check(a, sa, b, sb, b_block)
    m, k = a.shape
    n = b.shape[0]
    cfg = dict(CONFIG, **(config or {}))
    if b_block and wants_gluon(cfg, a, 2 * m * n * k):
        from . import gemm_gluon

        if gemm_gluon.gluon_supported(a, b, out_dtype):
            return gemm_gluon.fp8_gemm_gluon(a, sa, b, sb, out_dtype=out_dtype)
    even_k = k % GROUP == 0
    nk = cdiv(k, GROUP)
    split = cfg["SPLIT"] if even_k and nk % cfg["SPLIT"] == 0 else 1
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    grid = (_num_programs(cdiv(m, cfg["BM"]) * cdiv(n, cfg["BN"]), cfg["PERSISTENT"], a.device),)
    _fp8_gemm_kernel[grid](
        a, b, c, sa, sb, m, n, k, a.stride(0), b.stride(0), c.stride(0), *sa.stride(), *sb.stride(),
        B_BLOCK=b_block, BM=cfg["BM"], BN=cfg["BN"], BK=GROUP, GROUP_M=cfg["GROUP_M"], EVEN_K=even_k,
        SPLIT=split, PERSISTENT=bool(cfg["PERSISTENT"]), WS=bool(cfg["WS"]), CARRY=bool(cfg["CARRY"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c
