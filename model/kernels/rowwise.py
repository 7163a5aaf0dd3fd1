"""The fp8_rowwise recipe: one scale per row of each operand, products through ``torch._scaled_mm``.

Forward: x per token, W per output channel. Input gradient: dy per token, W^T per input channel. Weight
gradient: dy^T per output channel, x^T per input channel (both along the tokens). Expert layers use
``torch._scaled_grouped_mm`` on CUDA when the installed torch has it (forward and input gradient) and the
BF16 ``torch._grouped_mm`` for the weight gradient; elsewhere a per-expert loop of the same products.
"""

import torch

from .quant_ref import inverse, scale_from_amax, to_e4m3


def quantize_rowwise(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (q [R, C] row-major e4m3, scale [R, 1] fp32), scale = amax(row) / 448."""
    scale = scale_from_amax(x.detach().abs().amax(dim=1, keepdim=True), pow2)
    return to_e4m3(x.float() * inverse(scale)).contiguous(), scale


def scaled_mm(aq, sa, bq, sb, out_dtype=torch.bfloat16):
    """aq [M, K] (scale [M, 1]) @ bq [N, K]^T (scale [N, 1]) -> [M, N] via torch._scaled_mm."""
    return torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.t(), out_dtype=out_dtype)


def scaled_mm_ref(aq, sa, bq, sb, out_dtype=torch.bfloat16):
    """Reference of scaled_mm: dequantise and multiply in fp32."""
    return ((aq.float() * sa) @ (bq.float() * sb).t()).to(out_dtype)


def _product(a, b, pow2, out_dtype):
    """a [M, K] @ b [N, K]^T with both operands quantised per row (along K); bf16 out, then cast."""
    (aq, sa), (bq, sb) = quantize_rowwise(a, pow2), quantize_rowwise(b, pow2)
    return scaled_mm(aq, sa, bq, sb, torch.bfloat16).to(out_dtype)


class _RowwiseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, pow2):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, w)
        ctx.pow2, ctx.x_shape = pow2, x.shape
        return _product(x2, w.detach(), pow2, x.dtype).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _product(dy2, w.detach().t(), ctx.pow2, dy.dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = _product(dy2.t(), x2.t(), ctx.pow2, w.dtype)
        return dx, dw, None


def rowwise_linear(x: torch.Tensor, w: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T with row-wise FP8 scales in all three products."""
    return _RowwiseLinear.apply(x, w, pow2)
