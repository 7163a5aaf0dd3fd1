"""Where the Triton kernels may run: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

import os

import torch

from model.errors import MoeforgeError

E4M3_MAX = 448.0
GROUP = 128  # quantisation group: 1x128 activation tiles, 128x128 weight blocks


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_inputs(*tensors: torch.Tensor) -> None:
    """Raise a MoeforgeError when a Triton kernel cannot run on these tensors."""
    for t in tensors:
        if not t.is_cuda and not interpreting():
            raise MoeforgeError(
                f"FP8 Triton kernels need CUDA tensors (got a tensor on {t.device}); on CPU set "
                "TRITON_INTERPRET=1 before importing triton, or use precision=bf16/fp32"
            )


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
