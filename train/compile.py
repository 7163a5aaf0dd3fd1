"""`trainer.compile`: `torch.compile` applied from outside the model, to the parts where it pays.

  none    eager everywhere.
  mhc     the mHC mixing (norm, projection, sigmoids, Sinkhorn, the stream collapse; forward and backward
          each fused by Inductor), the write-back into the streams, the final collapse and every RMSNorm:
          dozens of small element-wise kernels per sublayer become a few.

The compiled functions are module-level (`model.mhc.hc_pre`, ...) and shared by every instance, so one
compilation serves every layer of a shape (compiling each module's bound method would recompile per
instance). Numerics: the same operations in the same dtypes; Inductor may reorder fp32 reductions.
"""

from __future__ import annotations

import torch
from torch import nn

from model.mhc import HyperConnection, HyperHead, hc_collapse, hc_post, hc_pre
from model.norm import RMSNorm, weighted_rms_norm

CHOICES = ("none", "mhc")


def compile_model(model: nn.Module, what: str) -> nn.Module:
    """Compile the `what` parts of `model` in place (`what` in CHOICES, checked by train.config)."""
    if what == "mhc":
        pre, post, collapse, norm = (torch.compile(f, dynamic=False)
                                     for f in (hc_pre, hc_post, hc_collapse, weighted_rms_norm))
        for m in model.modules():
            if isinstance(m, HyperConnection):
                m.pre_fn, m.post_fn = pre, post
            elif isinstance(m, HyperHead):
                m.collapse_fn = collapse
            elif isinstance(m, RMSNorm):
                m.norm_fn = norm
    return model
