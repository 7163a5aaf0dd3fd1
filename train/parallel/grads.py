"""Global gradient norm and clipping across every axis (FSDP shards, expert shards, pipeline stages).

Every gradient element lives on exactly one rank once FSDP has sharded all parameters (dp for dense ones,
edp for expert shards, a stage's parameters only on its pp rank), so the squared norm is a sum over the
world of each rank's local sum of squares.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from train.parallel.env import collective

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed
    DTensor = None


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients of all ranks, accumulated in fp64 (every element lives on one rank:
    FSDP shards dense and expert parameters; without FSDP, dp = 1 and stages hold distinct parameters)."""
    grads = [local(p.grad).detach() for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        total += g.double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        with collective("all_reduce(grad norm)"):
            dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def clip_(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)), as `torch.nn.utils.clip_grad_norm_`."""
    if max_norm <= 0 or not max_norm < float("inf"):
        return
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                local(p.grad).mul_(coef)
