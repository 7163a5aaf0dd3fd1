"""FP8 training by module swap, applied from outside the model (`precision=fp8|fp8_rowwise|fp8+fp4_experts`).

`convert(model, precision)` changes the class of the matmul-bearing modules to FP8 subclasses that keep the
very same parameter objects, so parameter names, the state_dict, checkpoints, HF export and optimizer
groups do not change. In FP8: every `nn.Linear` but the output head (attention wq_a/wq_b/wkv/wo_b,
compressor and indexer projections, shared-expert w1/w2/w3, MTP e_proj/h_proj), the block-diagonal `wo_a`
(one grouped product over its o_groups blocks) and the routed experts' three grouped products. Unchanged
(BF16 under autocast, or FP32): embedding, head, router gate, norms, mHC and the attention core.

precision=fp8: block-wise (1x128 activations, 128x128 weights, fp32 scales, Triton kernels on CUDA);
fp8_rowwise: per-row scales through torch._scaled_mm, power-of-two scales (torchao's "rowwise");
fp8+fp4_experts: fp8 plus MXFP4 quantisation-aware routed experts (straight-through estimator), whose
FP8 products use power-of-two block scales so that the MXFP4 values pass through E4M3 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention
from model.errors import ConfigError
from model.kernels.fp8 import Fp8Recipe, fp8_grouped_linear, fp8_linear, mxfp4_qat
from model.moe import Experts, SharedExpert

PRECISIONS = ("fp8", "fp8_rowwise", "fp8+fp4_experts")
HIGH_PRECISION = ("head",)  # nn.Linear names (last component) that stay out of FP8


@dataclass(frozen=True)
class Fp8Plan:
    """Recipes of one precision: `linear` for dense products, `experts` for the routed experts."""

    linear: Fp8Recipe
    experts: Fp8Recipe
    fp4_experts: bool = False


def plan_for(precision: str, backend: str) -> Fp8Plan:
    """The recipes of `precision` (one of PRECISIONS) on `backend` ("triton" or "reference")."""
    if precision == "fp8":
        r = Fp8Recipe("fp8", pow2_scales=False, backend=backend)
        return Fp8Plan(r, r)
    if precision == "fp8_rowwise":
        r = Fp8Recipe("fp8_rowwise", pow2_scales=True, backend=backend)
        return Fp8Plan(r, r)
    if precision == "fp8+fp4_experts":
        return Fp8Plan(Fp8Recipe("fp8", pow2_scales=False, backend=backend),
                       Fp8Recipe("fp8", pow2_scales=True, backend=backend), fp4_experts=True)
    raise ConfigError("precision.name", f"{precision!r} is not an FP8 precision; choose one of {PRECISIONS}")


def low_precision(fn, x: torch.Tensor, *args):
    """fn(x, *args) with autocast's input cast applied to x and autocast off inside: the FP8 products choose
    their own dtypes (fp32 accumulation, output in x's dtype)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return fn(x, *args)
    x = x.to(torch.get_autocast_dtype(dev))
    with torch.autocast(dev, enabled=False):
        return fn(x, *args)


def swiglu_products(mm, x: torch.Tensor, w1, w3, w2, limit: float) -> torch.Tensor:
    """w2(silu(min(w1 x, limit)) * clamp(w3 x)) with `mm(x, w)` for each product; w1 and w3 run as one."""
    gate, up = mm(x, torch.cat([w1, w3], dim=-2)).chunk(2, dim=-1)
    return mm(F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit), w2)


class Fp8Linear(nn.Linear):
    """nn.Linear whose product runs in FP8 (same `weight`; `fp8_recipe` set by `convert`)."""

    fp8_recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = low_precision(fp8_linear, x, self.weight, self.fp8_recipe)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Fp8SharedExpert(SharedExpert):
    """Shared expert with its three products in FP8."""

    fp8_recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def run(x):
            mm = lambda a, w: fp8_linear(a, w, self.fp8_recipe)  # noqa: E731
            return swiglu_products(mm, x, self.w1.weight, self.w3.weight, self.w2.weight, self.limit)

        return low_precision(run, x)


class Fp8Experts(Experts):
    """Routed experts whose grouped products run in FP8 (MXFP4 QAT weights when `fp4_qat`)."""

    fp8_recipe: Fp8Recipe
    fp4_qat: bool = False

    def grouped_usable(self, rows: torch.Tensor) -> bool:
        return True

    def grouped(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = self.w1, self.w3, self.w2
        if self.fp4_qat:
            w1, w3, w2 = mxfp4_qat(w1), mxfp4_qat(w3), mxfp4_qat(w2)

        def run(x):
            mm = lambda a, w: fp8_grouped_linear(a.contiguous(), w, offs, self.fp8_recipe)  # noqa: E731
            return swiglu_products(mm, x, w1, w3, w2, self.limit)

        return low_precision(run, rows)


class Fp8Attention(Attention):
    """Attention whose block-diagonal `wo_a` runs as one FP8 grouped product (the core is unchanged)."""

    fp8_recipe: Fp8Recipe

    def grouped_out(self, o_BSHC: torch.Tensor) -> torch.Tensor:
        b, s = o_BSHC.shape[:2]
        g, n = self.groups, b * s
        x_GNI = o_BSHC.reshape(n, g, -1).transpose(0, 1)
        w_GOI = self.wo_a.weight.view(g, -1, x_GNI.shape[-1])
        offs = torch.arange(1, g + 1, device=o_BSHC.device, dtype=torch.int32) * n

        def run(x):
            return fp8_grouped_linear(x.reshape(g * n, -1).contiguous(), w_GOI, offs, self.fp8_recipe)

        y = low_precision(run, x_GNI)
        return y.view(g, b, s, -1).permute(1, 2, 0, 3).flatten(2)


SWAPS = ((nn.Linear, Fp8Linear), (SharedExpert, Fp8SharedExpert), (Experts, Fp8Experts),
         (Attention, Fp8Attention))


def default_backend(model: nn.Module) -> str:
    """Triton kernels where the parameters live on CUDA, the plain PyTorch reference elsewhere."""
    p = next(model.parameters(), None)
    return "triton" if p is not None and p.is_cuda else "reference"


def convert(model: nn.Module, precision: str, backend: str | None = None) -> nn.Module:
    """Swap `model`'s modules to FP8 in place (see the module docstring) and return it. `backend`: "triton"
    or "reference"; default: `default_backend(model)`. `fp8_modules(model)` lists what changed."""
    plan = plan_for(precision, backend or default_backend(model))
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HIGH_PRECISION:
            continue
        for base, fp8_cls in SWAPS:
            if type(module) is base:
                module.__class__ = fp8_cls
                module.fp8_recipe = plan.experts if base is Experts else plan.linear
                if base is Experts:
                    module.fp4_qat = plan.fp4_experts
    return model


def fp8_modules(model: nn.Module) -> dict[str, str]:
    """{module name: FP8 class name} of every swapped module."""
    fp8 = tuple(c for _, c in SWAPS)
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, fp8)}
