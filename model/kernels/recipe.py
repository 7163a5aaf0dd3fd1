"""FP8 training recipes: which quantisation the swapped linear and expert layers use."""

from dataclasses import dataclass

from model.errors import ConfigError

from .backends import BACKENDS

RECIPES = ("fp8", "fp8_rowwise")


@dataclass(frozen=True)
class Fp8Recipe:
    """name: "fp8" = block-wise (1x128 activations, 128x128 weights, our Triton kernels) or "fp8_rowwise" =
    per-token x per-channel scales through torch._scaled_mm; pow2_scales: round scales up to powers of two
    (ue8m0); backend: "triton" or "reference" (plain PyTorch, for CPUs) for the block-wise recipe."""

    name: str = "fp8"
    pow2_scales: bool = False
    backend: str = "triton"

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ConfigError("precision", f"unknown FP8 recipe {self.name!r}; choose one of {RECIPES}")
        if self.backend not in BACKENDS:
            raise ConfigError("precision.backend", f"unknown FP8 backend {self.backend!r}; choose {BACKENDS}")
