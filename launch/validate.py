"""Check a composed stage config before anything starts."""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launch.launcher import launcher_config
from launch.stages import StageSpec, load_stage
from model.errors import ConfigError


def validate_stage(spec: StageSpec, cfg: DictConfig, check_input: bool = True) -> None:
    """train.config.validate for the root tree, the stage's own ``validate``, launcher, input path."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(missing[0], "must be set (no default), e.g. " + f"{missing[0]}=...")
    if spec.config_name == "config":
        train_validate = _train_validate()
        if train_validate is not None:
            train_validate(cfg)
    launcher_config(cfg)
    if spec.module:
        stage_validate = getattr(load_stage(spec), "validate", None)
        if callable(stage_validate):
            stage_validate(cfg)
    if spec.warmup_key:
        check_schedule(spec.warmup_key, cfg)
    if check_input and spec.input_key:
        check_input_path(spec.input_key, OmegaConf.select(cfg, spec.input_key, default=None))


def check_schedule(warmup_key: str, cfg: DictConfig) -> None:
    """Build the LR schedule the stage will build (``optim.*`` with its warm-up from ``warmup_key``, over
    ``trainer.max_steps``), so that a warm-up longer than the run fails now, not when the step starts."""
    from optim import OptimConfig, build_schedule

    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim["warmup_steps"] = OmegaConf.select(cfg, warmup_key)
    try:
        build_schedule(OptimConfig.from_dict(optim), cfg.trainer.max_steps)
    except ConfigError as e:
        if e.key != "optim.warmup_steps" or warmup_key == e.key:
            raise
        raise ConfigError(warmup_key, str(e)[len(e.key) + 2:]) from e


def check_input_path(key: str, path) -> None:
    """A set input checkpoint must exist."""
    if path not in (None, "", "???") and not Path(str(path)).exists():
        raise ConfigError(key, f"input checkpoint {path} does not exist")


def _train_validate():
    """``train.config.validate`` once the training package provides it, else None."""
    try:
        module = importlib.import_module("train.config")
    except ModuleNotFoundError as e:
        if e.name in ("train.config", "train"):
            return None
        raise
    return getattr(module, "validate", None)
