"""Public FP8 surface (benchmarks, the train/fp8.py module swap): Triton kernels and autograd layers.

quantize_act(x, pow2=False, transpose=False)       -> (q e4m3, scale) in 1x128 groups (rows or x^T rows)
quantize_act_dual(x, pow2=False, up=None, limit=0)  -> (q, scale, q_t, scale_t); optional fused SwiGLU
quantize_weight(w, pow2=False, transpose=True)     -> (q, 128x128 block scales, q_t) for [N, K] / [E, N, K]
fp8_gemm(a, sa, b, sb, out_dtype, b_block=True)     -> a @ b^T, fp32 accumulation, per-128-K-step scales
fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype)     -> per-expert a[seg_e] @ b[e]^T
fp8_linear(x, w, recipe) / fp8_grouped_linear(x, w, offs, recipe): autograd layers (both recipes)
"""

from .experts import fp8_grouped_linear
from .gemm import fp8_gemm
from .grouped_gemm import fp8_grouped_gemm, fp8_kgrouped_gemm
from .linear import fp8_linear
from .mxfp4 import mxfp4_qat
from .quant import quantize_act, quantize_act_dual, quantize_act_segments, quantize_weight
from .recipe import Fp8Recipe

__all__ = [
    "Fp8Recipe", "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_linear", "fp8_kgrouped_gemm", "fp8_linear",
    "mxfp4_qat", "quantize_act", "quantize_act_dual", "quantize_act_segments", "quantize_weight",
]
