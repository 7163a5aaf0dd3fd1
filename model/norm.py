"""RMSNorm (weighted, fp32 weight) and the unweighted variant used by the query norm and mHC."""

import torch
from torch import nn


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm over the last dim; the statistic is computed in fp32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def weighted_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / rms(x), computed in fp32 and cast back to the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in fp32 and cast back to the input dtype (`norm_fn`, which a trainer
    may replace on an instance by a compiled one)."""

    norm_fn = staticmethod(weighted_rms_norm)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)
