"""Partial, interleaved RoPE on the trailing `rope_head_dim` channels, with optional static YaRN."""

import math

import torch


def inv_freq(params: dict, rope_dim: int) -> torch.Tensor:
    """Inverse frequencies [rope_dim/2] (fp32) for one `rope_parameters` entry ("default" or "yarn")."""
    base = float(params["rope_theta"])
    exponent = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    extrapolation = 1.0 / (base**exponent)
    if params.get("rope_type", "default") != "yarn":
        return extrapolation
    factor = float(params["factor"])
    original = float(params["original_max_position_embeddings"])
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (high) frequency, 0: interpolate by `factor`
    interpolation = 1.0 / (factor * base**exponent)
    return interpolation * (1 - keep) + extrapolation * keep


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [*positions.shape, rope_dim/2] for integer positions."""
    angles = positions[..., None].float() * freqs.to(device=positions.device, dtype=torch.float32)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate adjacent channel pairs of the last `2*cos.shape[-1]` channels of x (rest untouched).

    cos/sin broadcast against x[..., :half]; `inverse` rotates by the negative angle (output de-rotation).
    """
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:]
    pairs = rope.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos.float(), (-sin if inverse else sin).float()
    rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)
