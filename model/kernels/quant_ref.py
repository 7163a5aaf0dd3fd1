"""PyTorch references for E4M3 quantisation: 1x128 activation groups, 128x128 weight blocks.

Arithmetic (the Triton kernels do exactly the same, so results are bit-identical):
amax is the max |x| of a group (floored at 1e-12); scale = amax / 448, or with ``pow2`` the next power of
two at or above it (ue8m0); q = round-to-nearest-even(clamp(x * (1 / scale), -448, 448)) as E4M3.
The dequantised value is q * scale.
"""

import torch

from .runtime import E4M3_MAX, GROUP, cdiv

AMAX_FLOOR = 1e-12


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (s positive, normal fp32), by exponent arithmetic."""
    bits = s.float().contiguous().view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def scale_from_amax(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """amax / 448 correctly rounded (tensor / tensor: CUDA turns a division by a Python scalar into a
    multiplication by its reciprocal, which can differ in the last bit)."""
    a = amax.float().clamp_min(AMAX_FLOOR)
    s = a / torch.full_like(a, E4M3_MAX)
    return pow2_ceil(s) if pow2 else s


def inverse(s: torch.Tensor) -> torch.Tensor:
    """1 / s, correctly rounded on every device."""
    return torch.ones_like(s) / s


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to E4M3 (nearest-even), saturating at +-448."""
    return y.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def quantize_rows_ref(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale [M, ceil(K/128)] fp32): one scale per 1x128 group along K."""
    m, k = x.shape
    g = cdiv(k, GROUP)
    xp = _pad_to(x.float(), m, g * GROUP).view(m, g, GROUP)
    scale = scale_from_amax(xp.abs().amax(dim=2), pow2)
    q = to_e4m3(xp * inverse(scale)[:, :, None])
    return q.view(m, g * GROUP)[:, :k].contiguous(), scale


def quantize_cols_ref(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q_t [K, M] e4m3, scale [K, ceil(M/128)]): x^T quantised in 1x128 groups along M."""
    return quantize_rows_ref(x.t(), pow2)


def quantize_blocks_ref(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] e4m3, scale [ceil(N/128), ceil(K/128)]): one scale per 128x128 block."""
    n, k = w.shape
    gn, gk = cdiv(n, GROUP), cdiv(k, GROUP)
    wp = _pad_to(w.float(), gn * GROUP, gk * GROUP).view(gn, GROUP, gk, GROUP)
    scale = scale_from_amax(wp.abs().amax(dim=(1, 3)), pow2)
    q = to_e4m3(wp * inverse(scale)[:, None, :, None])
    return q.view(gn * GROUP, gk * GROUP)[:n, :k].contiguous(), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_rows_ref in fp32."""
    k = q.shape[1]
    return (q.float() * scale.repeat_interleave(GROUP, dim=1)[:, :k]).contiguous()


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_blocks_ref in fp32."""
    n, k = q.shape
    s = scale.repeat_interleave(GROUP, dim=0).repeat_interleave(GROUP, dim=1)[:n, :k]
    return q.float() * s


def quantize_segments_ref(x: torch.Tensor, offs: torch.Tensor, pow2: bool = False):
    """x [M, K] sorted by expert -> (q_t [K, M], scale [K, max_tiles]) with 1x128 groups along M that
    restart at every expert boundary (tile t of ``grouping`` owns column t of the scales)."""
    from .grouping import max_tiles, tile_rows_ref

    m, k = x.shape
    qt = torch.zeros(k, m, dtype=torch.float8_e4m3fn, device=x.device)
    st = torch.zeros(k, max_tiles(m, offs.numel()), dtype=torch.float32, device=x.device)
    for t, (_e, r0, r1) in enumerate(tile_rows_ref(offs)):
        q, s = quantize_rows_ref(x[r0:r1].t(), pow2)
        qt[:, r0:r1] = q
        st[:, t] = s[:, 0]
    return qt, st


def swiglu_ref(g: torch.Tensor, u: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(min(g, limit)) * clamp(u, -limit, limit) in fp32 (no clamp when limit is 0)."""
    g, u = g.float(), u.float()
    if limit > 0:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return torch.nn.functional.silu(g) * u


def quantize_act_dual_ref(x: torch.Tensor, *, pow2: bool = False, up: torch.Tensor | None = None,
                          limit: float = 0.0):
    """Reference of quant.quantize_act_dual: (q, scale) by rows and (q_t, scale_t) by columns."""
    if up is not None:
        x = swiglu_ref(x, up, limit)
    return (*quantize_rows_ref(x, pow2), *quantize_cols_ref(x, pow2))


def quantize_weight_ref(w: torch.Tensor, *, pow2: bool = False, transpose: bool = True):
    """Reference of quant.quantize_weight for [N, K] or stacked [E, N, K] weights."""
    if w.dim() == 3:
        parts = [quantize_blocks_ref(we, pow2) for we in w]
        q = torch.stack([p[0] for p in parts])
        s = torch.stack([p[1] for p in parts])
    else:
        q, s = quantize_blocks_ref(w, pow2)
    return q, s, q.transpose(-1, -2).contiguous() if transpose else None
