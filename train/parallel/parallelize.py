"""`parallelize(model, pmesh, ...)`: parallelism applied from outside the model, in a fixed order:
pipeline split, expert placement, activation checkpointing, FSDP."""

from __future__ import annotations

import functools

import torch

from model.transformer import Transformer
from optim import RoutingBiasUpdater
from train.parallel.expert import apply_expert_parallel
from train.parallel.fsdp import apply_fsdp
from train.parallel.mesh import ParallelMesh
from train.parallel.pipeline import build_schedule, build_stages, stage_loss_fn
from train.parallel.step import ParallelModel


def parallelize(model: Transformer, pmesh: ParallelMesh, *, bias_update_speed: float = 0.001,
                param_dtype: torch.dtype | None = None,
                activation_checkpointing: bool = False) -> ParallelModel:
    """Split `model` (built identically on every rank) for this rank; returns the `ParallelModel`."""
    layout = pmesh.layout
    device = torch.device(pmesh.device_type)
    modules = [model] if layout.pp == 1 else build_stages(model, layout, pmesh.pp_rank)
    for m in modules:
        apply_expert_parallel(m, pmesh.group("ep"), pmesh.ep_rank)
        if activation_checkpointing:
            from train.recompute import enable_activation_checkpointing

            blocks = m.layers.values() if isinstance(m.layers, torch.nn.ModuleDict) else m.layers
            enable_activation_checkpointing(list(blocks))
        m.to(device)
        if layout.fsdp:
            apply_fsdp(m, pmesh, param_dtype)
    schedule_for = None
    if layout.pp > 1:
        # every rank passes a loss_fn (without one a schedule runs no backward); only the last stage calls it
        last = next((m for m in modules if m.is_last), modules[-1])
        dtype = model.embed.weight.dtype
        schedule_for = functools.partial(build_schedule, modules, layout, pmesh.group("pp"), device,
                                         stage_loss_fn(last), dtype=dtype)
    updaters = [RoutingBiasUpdater(m, bias_update_speed) for m in modules]
    return ParallelModel(pmesh, modules, model.config.num_nextn_predict_layers, schedule_for, updaters)
