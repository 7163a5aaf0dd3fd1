"""The parallel layout (pp x dp, ep carved out of dp) resolved from `parallel.*` and checked before any
process group exists, so an impossible layout fails fast with a message naming the key to change."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from model.errors import ConfigError

# parallel.pp_schedule -> (torch.distributed.pipelining class name, stages per pp rank, stage placement)
# The schedules that split backward into input and weight passes run without FSDP (dp = 1) for now: their
# weight pass looks up `submod.parameters()`, FSDP2's sharded parameters, not the unsharded ones the graph
# used, so weight gradients go missing (seen on torch 2.13: wrong gradient norms).
SPLIT_BACKWARD = ("zero_bubble", "zbv", "dualpipev")
SCHEDULES: dict[str, tuple[str, int, str]] = {
    "gpipe": ("ScheduleGPipe", 1, "loop"),
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", 2, "loop"),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", 2, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}


@dataclass(frozen=True)
class Layout:
    """world = pp * dp; dp = edp * ep (experts sharded over ep, replicated/FSDP-sharded over edp)."""

    world: int
    pp: int = 1
    dp: int = 1
    ep: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int = 1

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def fsdp(self) -> bool:
        """FSDP2 wraps the model unless it would only add a one-rank data axis to a pipeline."""
        return self.dp > 1 or self.pp == 1

    @property
    def stages_per_rank(self) -> int:
        return SCHEDULES[self.pp_schedule][1] if self.pp > 1 else 1

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def stage_ids(self, pp_rank: int) -> list[int]:
        """Pipeline stage indices held by pipeline rank `pp_rank` (loop: r, r+pp, ...; V: r, 2pp-1-r)."""
        if self.stages_per_rank == 1:
            return [pp_rank]
        if SCHEDULES[self.pp_schedule][2] == "v":
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        return [pp_rank + k * self.pp for k in range(self.stages_per_rank)]

    def describe(self) -> str:
        text = f"pp{self.pp} x dp{self.dp} (ep{self.ep}, edp{self.edp}) on {self.world} processes"
        return text + (f", {self.pp_schedule} with {self.microbatches} microbatches" if self.pp > 1 else "")


def _get(parallel, key: str, default):
    value = parallel.get(key, default) if hasattr(parallel, "get") else getattr(parallel, key, default)
    return default if value is None else value


def resolve_layout(parallel, world: int, model_cfg: ModelConfig | None = None,
                   batch_size: int | None = None) -> Layout:
    """Check `parallel.*` against the world size, the model and the per-rank batch; return the `Layout`.

    `parallel` is the `parallel` config group (mapping or object). Raises `ConfigError` naming the key.
    """
    pp, ep = int(_get(parallel, "pp", 1)), int(_get(parallel, "ep", 1))
    schedule = str(_get(parallel, "pp_schedule", "1f1b"))
    microbatches = int(_get(parallel, "microbatches", 1))
    for key, value in (("pp", pp), ("ep", ep), ("microbatches", microbatches)):
        if value < 1:
            raise ConfigError(f"parallel.{key}", f"must be >= 1, got {value}")
    if schedule not in SCHEDULES:
        raise ConfigError("parallel.pp_schedule", f"must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if world % pp:
        raise ConfigError("parallel.pp", f"world size {world} is not divisible by pp={pp}")
    dp = _get(parallel, "dp", None)
    dp = world // pp if dp is None else int(dp)
    if dp < 1 or pp * dp != world:
        raise ConfigError("parallel.dp", f"pp={pp} x dp={dp} must equal the world size {world} "
                                         "(leave dp unset to fill the world)")
    if dp % ep:
        raise ConfigError("parallel.ep", f"must divide parallel.dp={dp} (experts are sharded inside the data "
                                         f"axis), got {ep}")
    layout = Layout(world, pp, dp, ep, schedule, microbatches)
    if model_cfg is not None:
        _check_model(layout, model_cfg)
    if batch_size is not None and batch_size % microbatches:
        raise ConfigError("parallel.microbatches", f"must divide trainer.batch_size={batch_size} "
                                                   f"(per data-parallel rank), got {microbatches}")
    if pp > 1 and schedule in SPLIT_BACKWARD and dp > 1:
        raise ConfigError("parallel.pp_schedule",
                          f"{schedule} splits backward into input and weight passes, which FSDP over "
                          f"parallel.dp={dp} does not support yet; use 1f1b, gpipe or interleaved_1f1b, "
                          "or dp=1")
    if pp > 1 and microbatches < layout.pp:
        raise ConfigError("parallel.microbatches", f"must be >= parallel.pp={pp}, got {microbatches}")
    return layout


def _check_model(layout: Layout, cfg: ModelConfig) -> None:
    experts = cfg.n_routed_experts
    if layout.ep > experts:
        raise ConfigError("parallel.ep", f"{layout.ep} expert ranks but the model has only {experts} experts "
                                         "(model.n_routed_experts)")
    if experts % layout.ep:
        raise ConfigError("parallel.ep", f"must divide model.n_routed_experts={experts}, got {layout.ep}")
    if layout.n_stages > cfg.num_hidden_layers:
        raise ConfigError("parallel.pp", f"{layout.n_stages} pipeline stages ({layout.pp} ranks x "
                                         f"{layout.stages_per_rank} for {layout.pp_schedule}) but only "
                                         f"{cfg.num_hidden_layers} layers (model.num_hidden_layers)")
