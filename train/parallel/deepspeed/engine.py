"""`build_deepspeed(model, pmesh, optim_cfg, options)`: the model (experts placed over `ep`, as the native
engine does) inside a DeepSpeed ZeRO engine, with moeforge's optimizer; returns a `DeepSpeedModel`.

DeepSpeed averages gradients over the data ranks (experts: over the same count, reduced over their
expert-data group); moeforge's loss is already normalised over the global batch, so the backward is
scaled by that count and the reduced gradients are the sums the native engine gets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.errors import MoeforgeError
from model.transformer import ModelOutput, Transformer
from optim import OptimConfig, RoutingBiasUpdater
from train.parallel.deepspeed.optimizer import ZeroOptimizer, mark_expert_params, param_groups
from train.parallel.deepspeed.options import ZeroOptions, ds_config
from train.parallel.deepspeed.partitions import Partition, read_partitions
from train.parallel.deepspeed.placement import place_model
from train.parallel.deepspeed.runtime import import_deepspeed, register_expert_groups
from train.parallel.expert import apply_expert_parallel
from train.parallel.mesh import ParallelMesh
from train.parallel.step import ParallelModel


class DictOutput(nn.Module):
    """What the engine wraps: our model, its output as a dict (DeepSpeed starts its backward bookkeeping
    from hooks on the output tensors it finds in dicts, lists and tuples, not in dataclasses)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, *args, autocast: tuple[str, bool, torch.dtype] | None = None, **kwargs) -> dict:
        """`autocast` = the caller's (device type, enabled, dtype), entered again here: the engine turns a
        CUDA autocast off around the module unless its own `torch_autocast` section is on, which would also
        change how it communicates gradients."""
        if autocast is None:
            return dict(vars(self.model(*args, **kwargs)))
        device, enabled, dtype = autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return dict(vars(self.model(*args, **kwargs)))


def _expert_marker(n_experts: int, ep: int, group_name: str) -> nn.Module:
    """DeepSpeed's engine treats expert ('moe') parameter groups specially in ZeRO-1/2 only when the
    model holds a DeepSpeed `MoE` module; this parameter-less stand-in says so (moeforge's experts stay
    its own `ExpertParallel` modules; the groups it would create are registered already)."""
    from deepspeed.moe.layer import MoE

    class ExpertGroups(MoE):
        def __init__(self):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size, self.expert_group_name = n_experts, ep, group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass

        def forward(self, *args, **kwargs):
            raise MoeforgeError("ExpertGroups only marks the model for DeepSpeed; it has no forward")

    return ExpertGroups()


def zero_grad_norm(zopt, stage: int) -> float:
    """The global L2 norm of the gradients DeepSpeed holds after the last backward (every partition);
    NaN when a gradient is not finite (DeepSpeed reports that as -1), so the spike guard skips the step."""
    if stage == 3:
        from deepspeed.runtime.utils import combine_grad_norm_groups

        norm = float(combine_grad_norm_groups(zopt._get_norm_groups()))
    else:
        norm = float(zopt.scaled_global_norm())
    return norm if norm >= 0 else math.nan


@dataclass
class DeepSpeedModel(ParallelModel):
    """`ParallelModel` whose forward and backward run through a DeepSpeed engine."""

    engine: Any = None
    zero: ZeroOptimizer | None = None
    partitions: list[Partition] = field(default_factory=list)
    stage: int = 1
    grad_scale: float = 1.0  # DeepSpeed divides reduced gradients by this; our loss is already global
    pending: bool = False  # gradients from a backward that no engine step has consumed yet

    def _forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor):
        device = input_ids.device.type
        state = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return ModelOutput(**self.engine(input_ids, doc_ids, autocast=state))

    def _backward(self, total: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(total * self.grad_scale, scale_wrt_gas=False)
        self.pending = True

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global gradient norm; the optimizer scales gradients by the clipping factor when it steps."""
        norm = zero_grad_norm(self.engine.optimizer, self.stage)
        clip = 0 < max_norm < math.inf
        self.zero.clip_coef = min(1.0, max_norm / (norm + 1e-6)) if clip else 1.0
        return norm

    def engine_step(self, apply: bool = True) -> None:
        """One DeepSpeed step; `apply=False` consumes the gradients without changing weights or state."""
        self.zero.skip = not apply
        try:
            self.engine.step()
        finally:
            self.zero.skip, self.zero.clip_coef, self.pending = False, 1.0, False


class DeepSpeedStep:
    """The training loop's optimizer under engine=deepspeed: LR factors go to moeforge's groups, `step`
    is an engine step, and `zero_grad` after a step the spike guard skipped still runs an engine step
    with the update switched off, so DeepSpeed drops that step's gradients. `first_step_check()` (a
    context manager, `verify.muon_check`) wraps the first step."""

    def __init__(self, pm: DeepSpeedModel, first_step_check: Callable[[], Any] | None = None):
        self.pm = pm
        self.check = first_step_check

    @property
    def param_groups(self) -> list[dict]:
        return self.pm.zero.param_groups

    def set_lr_factor(self, factor: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def step(self) -> None:
        ctx = self.check() if self.check is not None else contextlib.nullcontext()
        self.check = None
        with ctx:
            self.pm.engine_step(apply=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.pm.pending:
            self.pm.engine_step(apply=False)


def build_deepspeed(model: Transformer, pmesh: ParallelMesh, optim_cfg: OptimConfig, opts: ZeroOptions,
                    micro_batch: int, bias_update_speed: float) -> DeepSpeedModel:
    """Place experts over `ep`, group parameters (experts apart), place the model (`placement`: ZeRO-3
    partitions it from the host, never whole on the device), start the engine, read its partitions."""
    layout = pmesh.layout
    device = torch.device(pmesh.device_type)
    deepspeed = import_deepspeed(device.type)
    apply_expert_parallel(model, pmesh.group("ep"), pmesh.ep_rank)
    group_name = register_expert_groups(layout.ep, pmesh)
    mark_expert_params(model, group_name)
    groups = param_groups(model, optim_cfg, group_name)  # whole shapes: before ZeRO-3 partitions them
    names = {id(p): n for g in groups for p, n in zip(g["params"], g["names"])}
    config = ds_config(opts, micro_batch, layout.dp, sum(p.numel() for p in model.parameters()))
    place_model(deepspeed, model, opts.stage, config, group_name, device)
    zero = ZeroOptimizer(groups, device)
    wrapped = DictOutput(model)
    if opts.stage != 3 and any(g.get("moe") for g in groups):
        wrapped.expert_groups = _expert_marker(model.config.n_routed_experts, layout.ep, group_name)
    engine, *_ = deepspeed.initialize(model=wrapped, optimizer=zero, config=config, dist_init_required=False)
    if engine.optimizer.optimizer is not zero:
        raise MoeforgeError(f"DeepSpeed wrapped {type(engine.optimizer.optimizer).__name__}, not moeforge's "
                            "optimizer: it would train with another optimizer than configured")
    partitions = read_partitions(engine.optimizer, opts.stage, names)
    zero.bind({id(p.flat): p.layout for p in partitions})
    updaters = [RoutingBiasUpdater(model, bias_update_speed)]
    return DeepSpeedModel(pmesh, [model], model.config.num_nextn_predict_layers, None, updaters,
                          engine=engine, zero=zero, partitions=partitions, stage=opts.stage,
                          grad_scale=float(dist.get_world_size(engine.seq_data_parallel_group)))
