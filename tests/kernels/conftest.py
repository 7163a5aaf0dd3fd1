"""Kernel tests run the Triton kernels through the interpreter on CPU (tiny shapes) and natively on a
CUDA device (full shapes). TRITON_INTERPRET must be set before the kernel modules are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
