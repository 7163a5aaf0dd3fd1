"""`parallel.engine`, `parallel.zero_stage` and the offload options: validation and the DeepSpeed config.

engine=fsdp (default): moeforge's native FSDP2 engine (zero_stage 0, no offload).
engine=deepspeed: DeepSpeed ZeRO owns the data axis: zero_stage 1 (optimizer states), 2 (+ gradients) or
3 (+ parameters); offload_optimizer=cpu keeps fp32 master weights and optimizer states in host memory and
steps them there, offload_param=cpu (ZeRO-3 only) keeps the parameter partitions there too.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import ConfigError

ENGINES = ("fsdp", "deepspeed")
OFFLOAD_DEVICES = ("none", "cpu")
MIN_BUCKET, MAX_BUCKET = 1 << 20, 500_000_000  # elements; DeepSpeed's default is the maximum
# with offload the device is what is short: ZeRO-3 preallocates its gradient bucket there (fp32: 2 GB at
# the maximum); 2**26 elements = 256 MiB fp32 (a larger gradient is reduced on its own, not in the bucket)
OFFLOAD_MAX_BUCKET = 1 << 26
PERSISTENCE = 100_000  # DeepSpeed's default ZeRO-3 persistence threshold (elements)


@dataclass(frozen=True)
class ZeroOptions:
    stage: int
    offload_optimizer: str = "none"
    offload_param: str = "none"
    pin_memory: bool = True


def _get(p, key, default=None):
    value = p.get(key, default) if hasattr(p, "get") else getattr(p, key, default)
    return default if value is None else value


def check_engine(p) -> None:
    """Raise ConfigError (naming the key) for engine options that do not fit together."""
    engine, stage = _get(p, "engine", "fsdp"), _get(p, "zero_stage", 0)
    offload = {k: _get(p, k, "none") for k in ("offload_optimizer", "offload_param")}
    if engine not in ENGINES:
        raise ConfigError("parallel.engine", f"must be one of {', '.join(ENGINES)}, got {engine!r}")
    for key, value in offload.items():
        if value not in OFFLOAD_DEVICES:
            raise ConfigError(f"parallel.{key}", f"must be one of {', '.join(OFFLOAD_DEVICES)}, "
                                                 f"got {value!r}")
    if engine == "fsdp":
        if stage != 0:
            raise ConfigError("parallel.zero_stage", "ZeRO stages belong to parallel.engine=deepspeed (fsdp "
                                                     "always shards parameters, gradients and states); "
                                                     f"got {stage}")
        for key, value in offload.items():
            if value != "none":
                raise ConfigError(f"parallel.{key}", "offloading needs parallel.engine=deepspeed")
        return
    if stage not in (1, 2, 3):
        raise ConfigError("parallel.zero_stage", f"must be 1, 2 or 3 with parallel.engine=deepspeed, "
                                                 f"got {stage}")
    if offload["offload_param"] != "none" and stage != 3:
        raise ConfigError("parallel.offload_param", f"parameter offload needs parallel.zero_stage=3, "
                                                    f"got {stage}")
    if _get(p, "pp", 1) != 1:
        raise ConfigError("parallel.pp", "parallel.engine=deepspeed shards the data axis (experts over ep); "
                                         "pipeline parallelism needs parallel.engine=fsdp")


def zero_options(p) -> ZeroOptions:
    check_engine(p)
    return ZeroOptions(int(_get(p, "zero_stage", 0)), str(_get(p, "offload_optimizer", "none")),
                       str(_get(p, "offload_param", "none")), bool(_get(p, "pin_memory", True)))


def ds_config(opts: ZeroOptions, micro_batch: int, dp: int, n_params: int) -> dict:
    """The DeepSpeed config of a moeforge run: ZeRO only. Gradient clipping is 0 because moeforge clips
    (inside its optimizer, with the global norm it reports and guards on); DeepSpeed's own optimizers
    and compiled ops are never used (`zero_force_ds_cpu_optimizer: false` lets our optimizer step the
    offloaded partitions)."""
    offload = "cpu" in (opts.offload_optimizer, opts.offload_param)
    bucket = int(min(OFFLOAD_MAX_BUCKET if offload else MAX_BUCKET, max(MIN_BUCKET, n_params)))
    zero: dict = {"stage": opts.stage, "contiguous_gradients": True, "reduce_scatter": True,
                  "round_robin_gradients": False, "reduce_bucket_size": bucket,
                  "allgather_bucket_size": bucket}
    if opts.stage == 3:  # parameters under 0.1% of the model (at most DeepSpeed's 1e5) stay whole
        zero.update(stage3_prefetch_bucket_size=bucket, sub_group_size=MAX_BUCKET * 2,
                    stage3_param_persistence_threshold=min(PERSISTENCE, n_params // 1000))
    if opts.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": opts.offload_optimizer, "pin_memory": opts.pin_memory}
    if opts.offload_param != "none":
        zero["offload_param"] = {"device": opts.offload_param, "pin_memory": opts.pin_memory}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * dp,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
