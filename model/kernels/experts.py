"""FP8 grouped linear for MoE experts: y[seg_e] = x[seg_e] @ w[e]^T for token-sorted x.

``offs`` [E] int32 holds the cumulative end row of every expert (``torch._grouped_mm`` convention); it
stays on the device for the block-wise recipe. Gradients flow to x and to the stacked w [E, N, K].
"""

import torch

from .backends import get_ops
from .recipe import Fp8Recipe
from .rowwise import quantize_rowwise, scaled_mm, scaled_mm_ref


class _BlockwiseGrouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, recipe):
        ops, pow2 = get_ops(recipe.backend), recipe.pow2_scales
        xq, sx = ops.quantize_act(x, pow2=pow2)
        wq, sw, wtq = ops.quantize_weight(w.detach(), pow2=pow2)
        y = ops.grouped_gemm(xq, sx, wq, sw, offs, out_dtype=x.dtype)
        xtq, sxt = ops.quantize_act_segments(x, offs, pow2=pow2)
        ctx.save_for_backward(xtq, sxt, wtq, sw, offs)
        ctx.recipe, ctx.x_dtype, ctx.w_dtype = recipe, x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xtq, sxt, wtq, sw, offs = ctx.saved_tensors
        ops, pow2 = get_ops(ctx.recipe.backend), ctx.recipe.pow2_scales
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq, sdy = ops.quantize_act(dy, pow2=pow2)
            swt = sw.transpose(1, 2).contiguous()
            dx = ops.grouped_gemm(dyq, sdy, wtq, swt, offs, out_dtype=ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dytq, sdyt = ops.quantize_act_segments(dy, offs, pow2=pow2)
            dw = ops.kgrouped_gemm(dytq, sdyt, xtq, sxt, offs, out_dtype=torch.float32).to(ctx.w_dtype)
        return dx, dw, None, None


def _segments(offs):
    start = 0
    for e, end in enumerate(offs.tolist()):
        yield e, start, end
        start = max(start, end)


def _rowwise_grouped_mm(x, w, offs, pow2, out_dtype):
    """x [M, K] @ w[e]^T per segment with per-row scales; cuBLAS/CUTLASS grouped kernel where present."""
    e, n, k = w.shape
    xq, sx = quantize_rowwise(x, pow2)
    wq, sw = quantize_rowwise(w.reshape(e * n, k), pow2)
    wq = wq.view(e, n, k)
    if x.is_cuda and hasattr(torch, "_scaled_grouped_mm"):
        y = torch._scaled_grouped_mm(xq, wq.transpose(1, 2), sx.view(-1), sw.view(e, n), offs=offs,
                                     out_dtype=torch.bfloat16)
        live = torch.arange(x.shape[0], device=x.device)[:, None] < offs[-1]  # rows past the last expert
        return torch.where(live, y, 0).to(out_dtype)
    y = x.new_zeros(x.shape[0], n, dtype=out_dtype)
    for g, s0, s1 in _segments(offs):
        if s1 > s0:
            mm = scaled_mm if x.is_cuda else scaled_mm_ref
            y[s0:s1] = mm(xq[s0:s1], sx[s0:s1], wq[g], sw[g * n:(g + 1) * n]).to(out_dtype)
    return y


def _weight_grad_hp(dy, x, offs, n_exp):
    """BF16/fp32 weight gradient [E, N, K] (the rowwise recipe keeps it in high precision)."""
    if dy.is_cuda and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(dy.t().to(torch.bfloat16), x.to(torch.bfloat16), offs=offs)
    dw = dy.new_zeros(n_exp, dy.shape[1], x.shape[1], dtype=torch.float32)
    for g, s0, s1 in _segments(offs):
        dw[g] = dy[s0:s1].float().t() @ x[s0:s1].float()
    return dw


class _RowwiseGrouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, pow2):
        ctx.save_for_backward(x, w, offs)
        ctx.pow2 = pow2
        return _rowwise_grouped_mm(x, w.detach(), offs, pow2, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            wt = w.detach().transpose(1, 2).contiguous()
            dx = _rowwise_grouped_mm(dy.contiguous(), wt, offs, ctx.pow2, x.dtype)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad_hp(dy, x, offs, w.shape[0]).to(w.dtype)
        return dx, dw, None, None


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                       recipe: Fp8Recipe | None = None) -> torch.Tensor:
    """x [M, K] sorted by expert, w [E, N, K], offs [E] int32 cumulative ends -> [M, N] (rows past
    offs[-1] are zero)."""
    recipe = recipe or Fp8Recipe()
    if recipe.name == "fp8_rowwise":
        return _RowwiseGrouped.apply(x, w, offs, recipe.pow2_scales)
    return _BlockwiseGrouped.apply(x, w, offs, recipe)
