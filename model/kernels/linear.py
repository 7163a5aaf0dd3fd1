"""FP8 linear layer y = x W^T as an autograd function: forward, input gradient and weight gradient all
run as FP8 products with fp32 accumulation.

Block-wise recipe (DeepSeek): x and dy are quantised in 1x128 groups along the contraction axis of each
product (K for the forward, N for the input gradient, tokens for the weight gradient), W in 128x128 blocks
(its transpose reuses the same blocks). Only FP8 tensors are saved for backward: x^T (groups along the
tokens) and W^T. Rowwise recipe: one scale per row / column through ``torch._scaled_mm`` (rowwise.py).
"""

import torch

from .backends import get_ops
from .recipe import Fp8Recipe
from .rowwise import rowwise_linear


class _BlockwiseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, recipe):
        ops = get_ops(recipe.backend)
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        xq, sx, xtq, sxt = ops.quantize_act_dual(x2, pow2=recipe.pow2_scales)
        wq, sw, wtq = ops.quantize_weight(w.detach(), pow2=recipe.pow2_scales)
        y = ops.gemm(xq, sx, wq, sw, out_dtype=x.dtype)
        ctx.save_for_backward(xtq, sxt, wtq, sw)
        ctx.recipe, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = recipe, x.shape, x.dtype, w.dtype
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xtq, sxt, wtq, sw = ctx.saved_tensors
        ops = get_ops(ctx.recipe.backend)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dyq, sdy, dytq, sdyt = ops.quantize_act_dual(dy2, pow2=ctx.recipe.pow2_scales)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ops.gemm(dyq, sdy, wtq, sw.t().contiguous(), out_dtype=ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = ops.gemm(dytq, sdyt, xtq, sxt, out_dtype=torch.float32, b_block=False).to(ctx.w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, recipe: Fp8Recipe | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T in FP8 with gradients for x and w (w may be the fp32 master weight)."""
    recipe = recipe or Fp8Recipe()
    if recipe.name == "fp8_rowwise":
        return rowwise_linear(x, w, recipe.pow2_scales)
    return _BlockwiseLinear.apply(x, w, recipe)
