"""Hybrid Newton-Schulz orthogonalisation (DeepSeek-V4 Muon): 8 fast steps, then 2 that pin sigma at 1."""

from __future__ import annotations

import torch

KELLER_COEFFS = (3.4445, -4.7750, 2.0315)
PIN_COEFFS = (2.0, -1.5, 0.5)


def hybrid_schedule(fast_steps: int = 8, pin_steps: int = 2) -> tuple[tuple[float, float, float], ...]:
    """The per-step (a, b, c) list: `fast_steps` Keller steps followed by `pin_steps` (2, -1.5, 0.5) steps."""
    return (KELLER_COEFFS,) * fast_steps + (PIN_COEFFS,) * pin_steps


def newton_schulz(
    g: torch.Tensor,
    coeffs: tuple[tuple[float, float, float], ...] | None = None,
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate the polar factor U V^T of every matrix in `g` (shape [..., rows, cols]).

    Each matrix is normalised by its own Frobenius norm, tall matrices are transposed so that the
    smaller Gram matrix X X^T is formed, and X <- a X + (b A + c A A) X with A = X X^T is applied per
    step. Leading dimensions are a batch (e.g. stacked experts). The result has g's dtype.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    coeffs = hybrid_schedule() if coeffs is None else coeffs
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # a batch of matrices: the scalings fold into the GEMMs (baddbmm)
    for a, b, c in coeffs:
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly X
    x = x.reshape(shape)
    if tall:
        x = x.mT
    return x.to(g.dtype)
