"""MXFP4 quantisation-aware training of expert weights (DeepSeek-V4 post-training).

The fp32 master weight is rounded to MXFP4 (E2M1 values, one power-of-two scale per 1x32 group along K),
kept as fp32 values, and fed to the FP8 path with power-of-two block scales, where the cast to E4M3 is
lossless as long as each 128x128 block's dynamic range fits (``fp8_lossless``). The backward pass is a
straight-through estimator: the gradient of the fake-quantised weight goes to the master unchanged.
"""

import torch

from model.errors import MoeforgeError

from .quant_ref import dequantize_blocks, quantize_blocks_ref

MX_GROUP = 32
E2M1_MAX = 6.0


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round to the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (nearest-even, saturating at 6), in fp32."""
    a = y.abs().clamp(max=E2M1_MAX)
    step = torch.exp2(torch.floor(torch.log2(a.clamp_min(1.0))) - 1.0)  # 0.5 below 2, then 1, 2
    return torch.sign(y) * torch.round(a / step) * step


def mxfp4_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """w [..., K] (K a multiple of 32) -> fp32 values on the MXFP4 grid with e8m0 scales per 1x32 group:
    scale = 2^(floor(log2(amax)) - 2), so that amax / scale lies in [4, 8) and saturates at 6 (OCP MX)."""
    if w.shape[-1] % MX_GROUP:
        raise MoeforgeError(f"MXFP4 needs the last weight dimension to be a multiple of {MX_GROUP}, got "
                            f"{tuple(w.shape)}")
    g = w.detach().float().reshape(*w.shape[:-1], -1, MX_GROUP)
    amax = g.abs().amax(dim=-1, keepdim=True).clamp_min(2.0 ** -126)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2.0)
    return (round_e2m1(g / scale) * scale).reshape(w.shape)


class _Mxfp4STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return mxfp4_fake_quant(w).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def mxfp4_qat(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantised weight for the forward pass, identity gradient to the master ``w``."""
    return _Mxfp4STE.apply(w)


def fp8_lossless(w_fq: torch.Tensor) -> bool:
    """True when the MXFP4 values survive 128x128 E4M3 quantisation with power-of-two scales exactly."""
    mats = w_fq.reshape(-1, *w_fq.shape[-2:]) if w_fq.dim() > 2 else w_fq[None]
    for m in mats:
        q, s = quantize_blocks_ref(m, pow2=True)
        if not torch.equal(dequantize_blocks(q, s), m.float()):
            return False
    return True
