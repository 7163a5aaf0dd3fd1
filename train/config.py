"""Structured configs of the training stages and `validate(cfg)`, the check of the whole Hydra tree.

Each top-level section is merged with the dataclass of the package that consumes it, so a misspelt key or
a value of the wrong type is a `ConfigError` that names the full key (`trainer.max_stpes`).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.errors import ConfigError
from train.compile import CHOICES as COMPILE_CHOICES
from train.parallel.deepspeed.options import check_engine
from train.parallel.layout import SCHEDULES
from train.step_profile import ProfileConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp8", "fp8_rowwise", "fp8+fp4_experts")  # train.fp8 runs the fp8 ones
PP_SCHEDULES = tuple(SCHEDULES)


@dataclass
class SpikeGuardConfig:
    """Loss-spike / NaN guard: a bad step is skipped; `max_bad_steps` bad steps in a row roll back."""

    enabled: bool = True
    factor: float = 3.0  # a loss above factor x its running mean is a spike
    ema_beta: float = 0.9  # running mean of good losses
    warmup_steps: int = 20  # spikes are only judged after this many good steps (NaN/inf always are)
    max_bad_steps: int = 3
    max_rollbacks: int = 3


@dataclass
class TrainerConfig:
    max_steps: int = 200
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 25  # 0 = only at the end
    eval_batches: int = 8
    seed: int = 0
    grad_clip: float = 1.0  # 0 = no clipping
    activation_checkpointing: bool = False
    compile: str = "none"  # none | mhc | blocks (train/compile.py)
    mtp_weight: float = 0.3
    mtp_weight_decay_phase: float = 0.1  # MTP weight once the LR starts to decay
    sparse_from_step: int = 0  # CSA attends densely before this step, to the indexer's top-k from it on
    indexer_warmup_steps: int = 0  # steps before sparse_from_step in which the indexer loss is on
    log_every: int = 10  # console lines; metrics.jsonl gets every step
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    peak_tflops: float | None = None  # peak of the device for MFU where it is not known (CPU)
    spike: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # train/step_profile.py


@dataclass
class CheckpointConfig:
    every: int = 50  # 0 = only the final checkpoint
    keep: int = 2
    dir: str | None = None  # default: <run_dir>/checkpoints


@dataclass
class PrecisionConfig:
    name: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU


@dataclass
class ParallelConfig:
    dp: int | None = None  # None: fill the world (world = pp x dp)
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int = 1
    engine: str = "fsdp"  # fsdp (native) | deepspeed (train.parallel.deepspeed)
    zero_stage: int = 0  # engine=deepspeed: 1, 2 or 3
    offload_optimizer: str = "none"  # engine=deepspeed: none | cpu
    offload_param: str = "none"  # engine=deepspeed, zero_stage=3: none | cpu
    pin_memory: bool = True  # offloaded tensors in pinned host memory


@dataclass
class WandbConfig:
    project: str | None = None  # unset = offline
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; None = WANDB_MODE, else offline unless project


@dataclass
class LoggerConfig:
    every: int = 1  # wandb every N steps
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


# section -> dataclass; other packages' classes are imported lazily ("module:attr").
SECTIONS: dict[str, Any] = {
    "trainer": TrainerConfig,
    "checkpoint": CheckpointConfig,
    "precision": PrecisionConfig,
    "parallel": ParallelConfig,
    "logger": LoggerConfig,
    "model": "model:ModelConfig",
    "data": "data.config:DataConfig",
    "optim": "optim.config:OptimConfig",
}
REQUIRED = ("trainer", "checkpoint", "precision", "parallel", "logger")
# sections of some stages only, validated when present (the post-training groups domain=, sft.*, grpo.*)
OPTIONAL_SECTIONS: dict[str, Any] = {
    "domain": "train.sft:DomainConfig",
    "sft": "train.sft:SFTConfig",
    "grpo": "rl.config:GRPOConfig",
    "distill": "distill.config:DistillConfig",
}


def _schema(spec: Any, section: str) -> type | None:
    if not isinstance(spec, str):
        return spec
    module, attr = spec.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(section, f"cannot import its schema {spec}: {e}") from e


def _omegaconf_error(section: str, e: OmegaConfBaseException) -> ConfigError:
    key = f"{section}.{e.full_key}" if getattr(e, "full_key", None) else section
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    return ConfigError(key, msg)


def _prefixed(section: str, e: ConfigError) -> ConfigError:
    if e.key == section or e.key.startswith(section + "."):
        return e
    return ConfigError(f"{section}.{e.key}", str(e).split(": ", 1)[-1])


def _instantiate(section: str, cls: type, values: dict) -> Any:
    """Build the section's object the way its package does (`from_dict` if it has one) and validate it."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    if names is not None:
        for key in values:
            if key not in names:
                raise ConfigError(f"{section}.{key}", f"unknown key (known: {', '.join(sorted(names))})")
    try:
        if hasattr(cls, "from_dict"):
            obj = cls.from_dict(values)
        else:
            obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
        if hasattr(obj, "validate"):
            obj.validate()
    except ConfigError as e:
        raise _prefixed(section, e) from e
    except OmegaConfBaseException as e:
        raise _omegaconf_error(section, e) from e
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(section, str(e)) from e
    return obj


def _merge(section: str, node: Any, cls: type) -> DictConfig:
    if not isinstance(node, DictConfig):
        raise ConfigError(section, f"must be a mapping, got {node!r}")
    try:
        schema = OmegaConf.structured(cls)
    except OmegaConfBaseException:
        schema = None  # field types OmegaConf cannot express: the dataclass itself checks the keys
    if schema is None:
        merged = node
    else:
        try:
            merged = OmegaConf.merge(schema, node)
        except OmegaConfBaseException as e:
            raise _omegaconf_error(section, e) from e
    _instantiate(section, cls, OmegaConf.to_container(merged, resolve=True))
    return merged


def _one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(key, f"must be one of {', '.join(options)}, got {value!r}")


def _check_int(key: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")


def _check_train(cfg: DictConfig) -> None:
    t = cfg.trainer
    for name, low in (("max_steps", 1), ("seq_len", 2), ("batch_size", 1), ("grad_accum", 1),
                      ("eval_every", 0), ("eval_batches", 1), ("log_every", 1), ("sparse_from_step", 0),
                      ("indexer_warmup_steps", 0), ("spike.warmup_steps", 0), ("spike.max_bad_steps", 1),
                      ("spike.max_rollbacks", 0), ("profile.steps", 0), ("profile.first_step", 1)):
        _check_int(f"trainer.{name}", OmegaConf.select(t, name), low)
    limit = cfg.model.get("max_position_embeddings")
    if limit is not None and t.seq_len > limit:
        raise ConfigError("trainer.seq_len", f"{t.seq_len} exceeds model.max_position_embeddings={limit}")
    if t.grad_clip < 0:
        raise ConfigError("trainer.grad_clip", f"must be >= 0, got {t.grad_clip}")
    if t.spike.factor <= 1:
        raise ConfigError("trainer.spike.factor", f"must be > 1, got {t.spike.factor}")
    if not 0 <= t.spike.ema_beta < 1:
        raise ConfigError("trainer.spike.ema_beta", f"must be in [0, 1), got {t.spike.ema_beta}")
    _one_of("trainer.compile", t.compile, COMPILE_CHOICES)
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError("trainer.device", f"must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    _check_int("checkpoint.every", cfg.checkpoint.every, 0)
    _check_int("checkpoint.keep", cfg.checkpoint.keep, 1)
    _check_int("logger.every", cfg.logger.every, 1)
    if cfg.logger.wandb.mode is not None:
        _one_of("logger.wandb.mode", cfg.logger.wandb.mode, ("online", "offline", "disabled"))


def _check_layout(cfg: DictConfig) -> None:
    _one_of("precision.name", cfg.precision.name, PRECISIONS)
    p = cfg.parallel
    for name in ("ep", "pp", "microbatches"):
        _check_int(f"parallel.{name}", p[name], 1)
    _check_int("parallel.dp", p.dp, 1)
    _one_of("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    check_engine(p)
    if p.dp is not None and p.dp % p.ep:
        raise ConfigError("parallel.ep", f"must divide parallel.dp={p.dp}, got {p.ep}")
    if p.pp > 1 and p.microbatches < p.pp:
        raise ConfigError("parallel.microbatches", f"must be >= parallel.pp={p.pp}, got {p.microbatches}")


def _check_paths(cfg: DictConfig) -> None:
    from train.checkpoint import MANIFEST  # late: checkpoint imports torch-heavy modules

    resume = str(cfg.get("resume", "auto"))
    if resume not in ("auto", "never"):
        if not (Path(resume) / MANIFEST).is_file():
            raise ConfigError("resume", f"must be auto, never or a checkpoint directory; "
                                        f"{resume} has no {MANIFEST}")
    init = cfg.get("init")
    if init is not None and not (Path(str(init)) / MANIFEST).is_file():
        raise ConfigError("init", f"checkpoint {init} does not exist (no {MANIFEST} in it)")


def validate(cfg: DictConfig, check_paths: bool = True) -> DictConfig:
    """Check the whole config tree; return a copy whose sections carry every default of their schema.

    `check_paths=False` skips the `resume`/`init` existence checks (a pipeline step's input that an earlier
    step has not written yet)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for name in REQUIRED:
        if name not in cfg:
            raise ConfigError(name, "section missing (is the defaults list of config.yaml intact?)")
    for name, spec in SECTIONS.items():
        if name not in cfg:
            raise ConfigError(name, "section missing from the config")
        cfg[name] = _merge(name, cfg[name], _schema(spec, name))
    for name, spec in OPTIONAL_SECTIONS.items():
        if name in cfg:
            cfg[name] = _merge(name, cfg[name], _schema(spec, name))
    _check_train(cfg)
    _check_layout(cfg)
    if check_paths:
        _check_paths(cfg)
    return cfg


def to_object(cfg: DictConfig, section: str) -> Any:
    """The validated section as its dataclass instance (e.g. `TrainerConfig`)."""
    values = OmegaConf.to_container(cfg[section], resolve=True)
    spec = SECTIONS[section] if section in SECTIONS else OPTIONAL_SECTIONS[section]
    return _instantiate(section, _schema(spec, section), values)
