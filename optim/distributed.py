"""Distributed Muon: every Newton-Schulz input is a whole matrix, whatever the sharding.

For a parameter sharded across its matrix rows/columns (FSDP2 `Shard(0)` of a 2-D weight) the momentum
step runs on the local shard, then one owning rank of the parameter's mesh (owners balanced by size)
gathers the whole update matrix, orthogonalises it and the result is redistributed to every shard.
A stack sharded only along leading dims (experts [E, I, d] split by expert) is orthogonalised where it
lives, without gathering other ranks' experts. Any other sharding is refused loudly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from model.errors import MoeforgeError
from optim.build import _adamw, _muon_groups
from optim.combined import CombinedOptimizer
from optim.config import OptimConfig
from optim.muon import Muon
from optim.newton_schulz import hybrid_schedule
from optim.rules import ADAMW_RULES, V4_RULES, assign_parameters


def needs_gather(p: torch.Tensor, name: str) -> bool:
    """True when a DTensor cuts through its matrices (the last two dims); False for whole local matrices."""
    if p.ndim < 2:
        raise MoeforgeError(f"Muon needs a matrix, but parameter {name!r} has shape {tuple(p.shape)}")
    if not isinstance(p, DTensor):
        return False
    if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], (Shard, Replicate)):
        raise MoeforgeError(f"distributed Muon supports 1-D meshes with Shard/Replicate placements; "
                            f"{name!r} has {p.placements} on a {p.device_mesh.ndim}-D mesh")
    placement = p.placements[0]
    return isinstance(placement, Shard) and placement.dim % p.ndim >= p.ndim - 2


def assign_owners(sizes: list[int], n_ranks: int) -> list[int]:
    """Greedy size balancing: the largest matrices first, each to the least-loaded rank."""
    load = [0] * n_ranks
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(n_ranks), key=lambda r: load[r])
        owners[i] = r
        load[r] += sizes[i]
    return owners


class DistributedMuon(Muon):
    """`Muon` over FSDP2/expert-parallel parameters; same options, same update, whole matrices only."""

    def _check_param(self, p: torch.Tensor, name: str) -> None:
        needs_gather(p, name)

    def _updates(self, jobs: list) -> list[torch.Tensor]:
        """Whole local matrices are orthogonalised here; sharded ones on their owner rank."""
        local = [i for i, (p, _, _) in enumerate(jobs) if not needs_gather(p, "")]
        gathered = [i for i in range(len(jobs)) if i not in set(local)]
        updates: list[torch.Tensor | None] = [None] * len(jobs)
        for i, o in zip(local, self._orthogonalize([(jobs[i][1], jobs[i][2]) for i in local])):
            updates[i] = o
        for i, o in zip(gathered, self._owned_updates([jobs[i] for i in gathered])):
            updates[i] = o
        return updates

    def _owned_updates(self, jobs: list) -> list[torch.Tensor]:
        """Gather each sharded update whole, orthogonalise it on its owner, redistribute the shards."""
        by_mesh: dict[int, list[int]] = {}
        for i, (p, _, _) in enumerate(jobs):
            by_mesh.setdefault(id(p.device_mesh), []).append(i)
        results: list[torch.Tensor | None] = [None] * len(jobs)
        for idx in by_mesh.values():
            mesh = jobs[idx[0]][0].device_mesh
            group, me = mesh.get_group(), mesh.get_local_rank()
            owners = assign_owners([jobs[i][0].numel() for i in idx], mesh.size())
            fulls = [_full(jobs[i][0], jobs[i][1]) for i in idx]
            mine = [k for k, o in enumerate(owners) if o == me]
            done = self._orthogonalize([(fulls[k], jobs[idx[k]][2]) for k in mine])
            for k, o in zip(mine, done):
                fulls[k] = o
            for k, i in enumerate(idx):
                dist.broadcast(fulls[k], src=dist.get_global_rank(group, owners[k]), group=group)
                p = jobs[i][0]
                whole = DTensor.from_local(fulls[k], mesh, [Replicate()], run_check=False)
                results[i] = whole.redistribute(mesh, p.placements).to_local()
        return results


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(p: DTensor, u_local: torch.Tensor) -> torch.Tensor:
    u = DTensor.from_local(u_local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                           stride=p.stride())
    return u.full_tensor().contiguous()


def build_distributed_optimizer(modules: nn.Module | list[nn.Module], cfg) -> CombinedOptimizer:
    """`optim.build_optimizer` for a parallelised model (or this rank's pipeline stage modules, whose
    parameter names are the global ones): `DistributedMuon` + AdamW (DTensor-aware)."""
    cfg = cfg if isinstance(cfg, OptimConfig) else OptimConfig.from_dict(cfg)
    rules = V4_RULES if cfg.name == "muon" else ADAMW_RULES
    modules = modules if isinstance(modules, list) else [modules]
    assignments = [a for m in modules for a in assign_parameters(m, rules)]
    muon_part = [a for a in assignments if a.rule.optimizer == "muon"]
    muon = None
    if muon_part:
        muon = DistributedMuon(_muon_groups(muon_part), lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.muon_momentum, nesterov=cfg.nesterov, update_rms=cfg.update_rms,
                               ns_coeffs=hybrid_schedule(cfg.ns_steps, cfg.ns_pin_steps),
                               ns_dtype=cfg.ns_dtype)
    opt = CombinedOptimizer({"muon": muon, "adamw": _adamw([a for a in assignments
                                                            if a.rule.optimizer == "adamw"], cfg)})
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt
