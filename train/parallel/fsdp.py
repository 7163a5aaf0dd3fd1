"""FSDP2 (`fully_shard`): non-expert parameters sharded over the data axis `dp`, expert shards over the
expert-data axis `edp`. Gradients are SUMMED (divide factor 1): the loss is already normalised over the
global batch (`train.parallel.loss`), so the sum is the single-process gradient."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from train.parallel.expert import ExpertParallel
from train.parallel.mesh import ParallelMesh


def mp_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Compute in `param_dtype` (None: the stored dtype), reduce gradients in fp32."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def _sum_gradients(module: FSDPModule) -> None:
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:  # older torch name
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM/AVG


def _blocks(root: nn.Module) -> list[nn.Module]:
    """The transformer blocks under `root` (`layers` as a list or dict, and `mtp`)."""
    out = []
    for attr in ("layers", "mtp"):
        container = getattr(root, attr, None)
        if container is not None:
            out += list(container.values() if isinstance(container, nn.ModuleDict) else container)
    return out


def apply_fsdp(root: nn.Module, pmesh: ParallelMesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard each block (its experts first, on `edp`), then the root (embedding, heads, norms) on `dp`."""
    policy = mp_policy(param_dtype)
    dp, edp = pmesh.sub("dp"), pmesh.sub("edp")
    for block in _blocks(root):
        for module in block.modules():
            if isinstance(module, ExpertParallel):
                fully_shard(module, mesh=edp, mp_policy=policy)
        fully_shard(block, mesh=dp, mp_policy=policy)
    fully_shard(root, mesh=dp, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            _sum_gradients(module)
    return root
