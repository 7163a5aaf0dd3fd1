"""Triton block-scaled FP8 grouped GEMMs for MoE experts; token counts stay on the device.

* ``fp8_grouped_gemm``: rows of A [M, K] sorted by expert (cumulative ends ``offs``), each segment times
  its expert's B[e] [N, K] (128x128 blocks). Forward (B = W1/W3/W2) and input gradient (B = W^T).
* ``fp8_kgrouped_gemm``: the weight gradient, out[e] = A^T[:, seg_e] @ B^T[:, seg_e]^T with both operands
  quantised in 1x128 groups along the tokens of one expert (``quant.quantize_act_segments``).
Empty experts are allowed: they own no tile, and their weight gradient is zero.
"""

import torch
import triton
import triton.language as tl

from model.errors import MoeforgeError

from .gemm import CONFIG, b_scale_ptrs, mainloop, wants_gluon
from .grouping import block_e, check_offsets, max_tiles, segment_tile, tile_ends
from .runtime import GROUP, cdiv, check_kernel_inputs


@triton.jit
def _fp8_grouped_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, offs_ptr, tend_ptr, N, K, E,
                        s_am, s_be, s_bn, s_cm, s_sam, s_sak, s_sbe, s_sbn, s_sbk,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_E: tl.constexpr,
                        EVEN_K: tl.constexpr, SPLIT: tl.constexpr, WS: tl.constexpr):
    pid_n = tl.program_id(0)
    e, row0, row_end = segment_tile(tl.program_id(1), offs_ptr, tend_ptr, E, BLOCK_E, BM)
    if row_end > row0:
        rm = tl.minimum(row0 + tl.arange(0, BM), row_end - 1)
        rn = (pid_n * BN + tl.arange(0, BN)) % N
        rk = tl.arange(0, BK)
        e64 = e.to(tl.int64)
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * s_am + rk[None, :]
        b_ptrs = b_ptr + e64 * s_be + rn[:, None].to(tl.int64) * s_bn + rk[None, :]
        sb_ptrs = b_scale_ptrs(sb_ptr + e64 * s_sbe, pid_n, rn, s_sbn, True, BN)
        acc = mainloop(a_ptrs, b_ptrs, sa_ptr + rm * s_sam, sb_ptrs, s_sak, s_sbk, K, BM, BN, BK, BN <= 128,
                       EVEN_K, SPLIT, WS)
        cm = row0 + tl.arange(0, BM)
        cn = pid_n * BN + tl.arange(0, BN)
        c_ptrs = c_ptr + cm[:, None].to(tl.int64) * s_cm + cn[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(cm[:, None] < row_end) & (cn[None, :] < N))


@triton.jit
def _fp8_kgrouped_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, offs_ptr, tend_ptr, N, K,
                         s_an, s_bk, s_ce, s_cn, s_san, s_sat, s_sbk, s_sbt,
                         BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_k = tl.cdiv(K, BK)
    pid_n = pid // num_k
    pid_k = pid % num_k
    t0 = tl.where(e > 0, tl.load(tend_ptr + e - 1, mask=e > 0, other=0), 0)
    t1 = tl.load(tend_ptr + e)
    seg_start = tl.where(e > 0, tl.load(offs_ptr + e - 1, mask=e > 0, other=0), 0)
    seg_end = tl.load(offs_ptr + e)
    rn = (pid_n * BN + tl.arange(0, BN)) % N
    rk = (pid_k * BK + tl.arange(0, BK)) % K
    rt = tl.arange(0, BT)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for t in range(t0, t1):
        cols = seg_start + (t - t0) * BT + rt
        live = cols[None, :] < seg_end
        a = tl.load(a_ptr + rn[:, None].to(tl.int64) * s_an + cols[None, :], mask=live, other=0.0)
        b = tl.load(b_ptr + rk[:, None].to(tl.int64) * s_bk + cols[None, :], mask=live, other=0.0)
        sa = tl.load(sa_ptr + rn * s_san + t * s_sat)
        sb = tl.load(sb_ptr + rk * s_sbk + t * s_sbt)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32) * (sa[:, None] * sb[None, :])
    cn = pid_n * BN + tl.arange(0, BN)
    ck = pid_k * BK + tl.arange(0, BK)
    c_ptrs = c_ptr + e.to(tl.int64) * s_ce + cn[:, None].to(tl.int64) * s_cn + ck[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(cn[:, None] < N) & (ck[None, :] < K))


def _check_fp8(*ts):
    for t in ts:
        if t.dtype != torch.float8_e4m3fn or t.stride(-1) != 1:
            raise MoeforgeError(f"grouped FP8 GEMM wants contiguous float8_e4m3fn operands, got {t.dtype} "
                                f"with strides {t.stride()}")


def check_grouped(a, sa, b, sb, offs):
    """The operand checks of ``fp8_grouped_gemm`` (shared with the Gluon kernel)."""
    check_kernel_inputs(a, sa, b, sb, offs)
    _check_fp8(a, b)
    check_offsets(offs, a.shape[0])
    if a.dim() != 2 or b.dim() != 3 or b.shape[2] != a.shape[1] or offs.numel() != b.shape[0]:
        raise MoeforgeError(f"grouped GEMM shapes do not fit: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                            f"{offs.numel()} offsets")


def fp8_grouped_gemm(a, sa, b, sb, offs, *, out_dtype=torch.bfloat16, config=None):
    """a [M, K] e4m3 (sa [M, K/128]), b [E, N, K] e4m3 (sb [E, N/128, K/128]), offs [E] int32 cumulative
    row ends -> [M, N]; rows past offs[-1] are left as zeros. With ``GLUON`` and ``GLUON_GROUPED`` set
    (``config`` or gemm.CONFIG, ``GLUON`` shared with ``fp8_gemm``), products of at least
    ``GLUON_MIN_GFLOP`` (2 M N K, M = all rows: known without reading ``offs``) on an sm_90 GPU run the
    Gluon kernel (grouped_gluon.py) where ``grouped_gluon_supported``; everything else (other GPUs, the
    interpreter) runs the Triton kernel."""
    check_grouped(a, sa, b, sb, offs)
    m, k = a.shape
    n_exp, n, _ = b.shape
    cfg = dict(CONFIG, **(config or {}))
    if cfg["GLUON_GROUPED"] and m > 0 and wants_gluon(cfg, a, 2 * m * n * k):
        from . import grouped_gluon

        if grouped_gluon.grouped_gluon_supported(a, b, out_dtype):
            return grouped_gluon.fp8_grouped_gemm_gluon(a, sa, b, sb, offs, out_dtype=out_dtype)
    even_k = k % GROUP == 0
    split = cfg["SPLIT"] if even_k and cdiv(k, GROUP) % cfg["SPLIT"] == 0 else 1
    c = torch.zeros((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    grid = (cdiv(n, cfg["BN"]), max_tiles(m, n_exp))
    _fp8_grouped_kernel[grid](
        a, b, c, sa, sb, offs, tile_ends(offs), n, k, n_exp,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0), *sa.stride(), *sb.stride(),
        BM=GROUP, BN=cfg["BN"], BK=GROUP, BLOCK_E=block_e(n_exp), EVEN_K=even_k, SPLIT=split,
        WS=bool(cfg["WS"]), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c


def fp8_kgrouped_gemm(at, sat, bt, sbt, offs, *, out_dtype=torch.float32, config=None):
    """at [N, M] and bt [K, M] e4m3 with per-tile scales [N, T] and [K, T] (T = max_tiles(M, E)) ->
    [E, N, K]: per expert, the product contracted over that expert's tokens."""
    check_kernel_inputs(at, sat, bt, sbt, offs)
    _check_fp8(at, bt)
    n, m = at.shape
    k = bt.shape[0]
    n_exp = offs.numel()
    check_offsets(offs, m)
    if bt.shape[1] != m or sat.shape != (n, max_tiles(m, n_exp)) or sbt.shape != (k, max_tiles(m, n_exp)):
        raise MoeforgeError(f"k-grouped GEMM shapes do not fit: at {tuple(at.shape)}, bt {tuple(bt.shape)}, "
                            f"scales {tuple(sat.shape)}, {tuple(sbt.shape)}")
    cfg = dict(CONFIG, **(config or {}))
    c = torch.empty((n_exp, n, k), dtype=out_dtype, device=at.device)
    grid = (cdiv(n, cfg["BM"]) * cdiv(k, cfg["BN"]), n_exp)
    _fp8_kgrouped_kernel[grid](
        at, bt, c, sat, sbt, offs, tile_ends(offs), n, k,
        at.stride(0), bt.stride(0), c.stride(0), c.stride(1), *sat.stride(), *sbt.stride(),
        BN=cfg["BM"], BK=cfg["BN"], BT=GROUP, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c
