"""`trainer.compile`: `torch.compile` applied from outside the model, to the parts where it pays.

  none    eager everywhere.
  mhc     the mHC mixing (norm, projection, sigmoids, Sinkhorn, the stream collapse; forward and backward
          each fused by Inductor), the write-back into the streams, the final collapse and every RMSNorm:
          dozens of small element-wise kernels per sublayer become a few.
  blocks  mhc, plus the element-wise glue around each block's GEMMs: the attention's query/KV projection
          (norms, RoPE and the concatenation it writes), its output de-rotation and grouped `wo_a`, the
          compressors' pooling, the indexer's queries, the router and the shared expert. The attention
          kernels, the indexer top-k and the routed experts' grouped GEMMs stay as they are (their own
          kernels, or data-dependent shapes).

The compiled functions are shared by every instance (module-level functions, or a class's method
compiled once and bound to each module), so one compilation serves every layer of a shape; compiling
each module's bound method would recompile per instance. Numerics: the same operations in the same
dtypes; Inductor may reorder fp32 reductions.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from model.attention import Attention
from model.compressor import Compressor
from model.indexer import Indexer
from model.mhc import HyperConnection, HyperHead, hc_collapse, hc_post, hc_pre
from model.moe import Gate, SharedExpert
from model.norm import RMSNorm, weighted_rms_norm

CHOICES = ("none", "mhc", "blocks")
# (class, method) pairs `blocks` compiles: pure tensor functions, no host synchronisation inside.
BLOCK_METHODS = ((Attention, "project"), (Attention, "output"), (Compressor, "pool"), (Indexer, "queries"),
                 (Gate, "forward"), (SharedExpert, "forward"))


def _compiled(f):
    return torch.compile(f, dynamic=False)


def compile_model(model: nn.Module, what: str) -> nn.Module:
    """Compile the `what` parts of `model` in place (`what` in CHOICES, checked by train.config)."""
    if what in ("mhc", "blocks"):
        pre, post, collapse, norm = (_compiled(f) for f in (hc_pre, hc_post, hc_collapse, weighted_rms_norm))
        for m in model.modules():
            if isinstance(m, HyperConnection):
                m.pre_fn, m.post_fn = pre, post
            elif isinstance(m, HyperHead):
                m.collapse_fn = collapse
            elif isinstance(m, RMSNorm):
                m.norm_fn = norm
    if what == "blocks":
        compiled: dict = {}  # one compilation per function (a subclass's override is its own function)
        for m in model.modules():
            for cls, name in BLOCK_METHODS:
                if isinstance(m, cls):
                    fn = getattr(type(m), name)
                    if fn not in compiled:
                        compiled[fn] = _compiled(fn)
                    setattr(m, name, functools.partial(compiled[fn], m))
    return model
