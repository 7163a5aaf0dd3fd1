"""``launcher.*``: where and how a step's processes start (validated here, the package that consumes it)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from model.errors import ConfigError

KINDS = ("local", "torchrun", "slurm", "deepspeed")
MODES = ("torchrun", "srun")


@dataclass
class LauncherConfig:
    name: str = "local"  # local | torchrun (local, several processes) | slurm
    nproc_per_node: int = 1  # processes per node; > 1 starts torchrun
    nodes: int = 1  # SLURM only
    max_parallel: int = 1  # local: independent pipeline steps run at once (each in a subprocess)
    partition: str | None = None  # SLURM: --partition
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"  # SLURM: --time per step
    cpus_per_task: int = 1
    mem: str | None = None  # SLURM: --mem, e.g. "16G"; unset = the cluster's DefMemPerCPU
    gpus_per_node: int = 0
    mode: str = "torchrun"  # SLURM: one srun task per node running torchrun, or "srun": one task per rank
    rdzv_port: int = 29500
    setup: list[str] = field(default_factory=list)  # shell lines run before each step (module load ...)
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. "--exclusive"
    wait: bool = True  # SLURM: follow the jobs until they end
    poll_seconds: float = 2.0
    threads: int | None = None  # torch intra-op threads of each step's processes; null = torch's default
    hostfile: str | None = None  # deepspeed: MPI-style hostfile of the nodes (launch/deepspeed_launcher.py)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def launcher_config(cfg: DictConfig | None) -> LauncherConfig:
    """The validated ``launcher`` node of ``cfg`` (defaults when the stage's config has none)."""
    node = cfg.get("launcher") if cfg is not None else None
    if node is None:
        return LauncherConfig()
    raw = OmegaConf.to_container(node, resolve=True)
    known = {f.name: f for f in dataclasses.fields(LauncherConfig)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"launcher.{key}", f"unknown key; known: {', '.join(known)}")
        _check(f"launcher.{key}", known[key].type, value)
    lc = LauncherConfig(**raw)
    if lc.name not in KINDS:
        raise ConfigError("launcher.name", f"{lc.name!r} is not one of {', '.join(KINDS)}")
    if lc.mode not in MODES:
        raise ConfigError("launcher.mode", f"{lc.mode!r} is not one of {', '.join(MODES)}")
    for key in ("nproc_per_node", "nodes", "max_parallel", "cpus_per_task", "threads"):
        if getattr(lc, key) is not None and getattr(lc, key) < 1:
            raise ConfigError(f"launcher.{key}", f"must be >= 1, got {getattr(lc, key)}")
    if lc.nodes > 1 and lc.name not in ("slurm", "deepspeed"):
        raise ConfigError("launcher.nodes", f"{lc.nodes} nodes need launcher=slurm or launcher=deepspeed "
                                            "(local runs on one node)")
    return lc


def _check(key: str, annotation: str, value) -> None:
    if value is None:
        if "None" not in annotation:
            raise ConfigError(key, "must be set")
        return
    base = annotation.split(" ")[0].split("[")[0]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[base]
    if not ok:
        raise ConfigError(key, f"expected {annotation}, got {value!r}")


@contextmanager
def launchers_in_config_store():
    """configs/launcher/*.yaml as a ConfigStore group while the block runs, for stage configs that live
    in the ConfigStore (taken out again so the root config only ever sees its files)."""
    from hydra.core.config_store import ConfigStore

    import configs

    store = ConfigStore.instance()
    added = "launcher" not in store.repo
    for path in sorted((Path(configs.__file__).parent / "launcher").glob("*.yaml")):
        store.store(group="launcher", name=path.stem, node=OmegaConf.load(path))
    try:
        yield
    finally:
        if added:
            store.repo.pop("launcher", None)
