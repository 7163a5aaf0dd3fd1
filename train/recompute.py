"""Activation checkpointing: recompute each block's forward during backward instead of storing it."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _recomputed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Wrap the forward of every block in `blocks` in place (parameter names do not change)."""
    for block in blocks:
        block.forward = functools.partial(_recomputed, block.forward)
