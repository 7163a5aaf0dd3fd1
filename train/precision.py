"""Device choice and numerics: `precision=auto|fp32|bf16|fp8|fp8_rowwise` -> an autocast context."""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

from model.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`trainer.device`: auto = the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", f"{name} requested but CUDA is not available")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """auto = bf16 on CUDA, fp32 on CPU; every other value stands as given."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(precision: str, device: torch.device):
    """The forward's autocast context: bf16 for bf16 and the fp8 modes (their matmuls cast themselves)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def apply_fp8(model: nn.Module, precision: str) -> nn.Module:
    """Swap in FP8 linears for precision=fp8|fp8_rowwise (train/fp8.py `convert(model, recipe)`)."""
    if not precision.startswith("fp8"):
        return model
    try:
        fp8 = importlib.import_module("train.fp8")
    except ModuleNotFoundError as e:
        raise ConfigError("precision.name", f"{precision} needs train/fp8.py, which is not available") from e
    return fp8.convert(model, precision)
