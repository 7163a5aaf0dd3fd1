"""The stage registry: CLI names -> modules exposing ``run(cfg, run_dir) -> dict`` and ``main()``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from model.errors import ConfigError

WARMUP = "optim.warmup_steps"


@dataclass(frozen=True)
class StageSpec:
    """How to start one stage and how a pipeline hands it its input."""

    name: str
    module: str
    config_name: str = "config"  # the root configs/config.yaml, or a structured config the module stores
    input_key: str | None = "init"  # the override that receives the input checkpoint
    # config groups the root defaults list lacks: (group, option selected when the user names none, or None)
    groups: tuple[tuple[str, str | None], ...] = ()
    warmup_key: str | None = None  # the LR warm-up of its optimizer schedule (over trainer.max_steps)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("pretrain", "train.pretrain", warmup_key=WARMUP),
        StageSpec("sft", "train.sft", groups=(("domain", None),), warmup_key=WARMUP),
        StageSpec("grpo", "rl.grpo", groups=(("domain", None),), warmup_key="grpo.warmup_steps"),
        StageSpec("distill", "distill.stage", groups=(("distill", "default"),), warmup_key=WARMUP),
        StageSpec("export", "launch.export", config_name="moeforge_export", input_key="checkpoint"),
        StageSpec("generate", "launch.generate", config_name="moeforge_generate", input_key="model"),
        StageSpec("model-info", "launch.model_info", input_key=None),
    )
}


def get_stage(name: str, key: str = "stage") -> StageSpec:
    """The registry entry for ``name``; a ConfigError naming ``key`` if there is none."""
    if name not in STAGES:
        raise ConfigError(key, f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[name]


def load_stage(spec: StageSpec) -> ModuleType:
    """Import the stage's module and check it has ``run``."""
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as e:
        if e.name and spec.module.startswith(e.name):
            msg = f"stage {spec.name!r} is not available: no module {spec.module}"
            raise ConfigError("stage", msg) from e
        raise
    if not callable(getattr(module, "run", None)):
        raise ConfigError("stage", f"{spec.module} has no run(cfg, run_dir) entry point")
    return module
