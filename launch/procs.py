"""Process-level helpers: the environment jobs run with, and torchrun command lines."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from launch.launcher import LauncherConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
PASSED_ENV = ("WANDB_MODE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
              "OMP_NUM_THREADS")


def job_env() -> dict[str, str]:
    """This environment with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def torchrun_argv(module: str, overrides: list[str], lc: LauncherConfig) -> list[str]:
    """``python -m torch.distributed.run ... -m module overrides``; multi-node through SLURM's variables."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={lc.nproc_per_node}"]
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    if nnodes > 1:
        head = slurm_head_node()
        job = os.environ.get("SLURM_JOB_ID", "moeforge")
        argv += [f"--nnodes={nnodes}", f"--node-rank={os.environ['SLURM_NODEID']}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={head}:{lc.rdzv_port}", f"--rdzv-id={job}"]
    else:
        argv += ["--standalone"]
    return argv + ["-m", module, *overrides]


def slurm_head_node() -> str:
    """The first host of this SLURM job (the rendezvous / MASTER_ADDR host)."""
    out = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[0]


def rank_env_from_slurm(lc: LauncherConfig) -> dict[str, str]:
    """torch.distributed's env:// variables for one srun task (launcher.mode=srun)."""
    return {
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": os.environ["SLURM_NTASKS"],
        "LOCAL_RANK": os.environ["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(lc.nproc_per_node),
        "MASTER_ADDR": slurm_head_node(),
        "MASTER_PORT": str(lc.rdzv_port),
    }


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def is_lead_process() -> bool:
    """True on the process that writes markers: SLURM task 0 / node 0, or any non-SLURM process."""
    return os.environ.get("SLURM_PROCID", "0") == "0"


@contextmanager
def intra_op_threads(n: int | None):
    """torch's intra-op threads (and OMP_NUM_THREADS for processes started meanwhile) set to ``n`` while the
    block runs; ``None`` leaves them alone."""
    if n is None:
        yield
        return
    import torch

    before, env_before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
