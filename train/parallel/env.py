"""Rank and world from torchrun or SLURM (srun); process-group start with timeouts; named collectives."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from model.errors import MoeforgeError

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    source: str  # "torchrun" | "slurm" | "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list (`scontrol show hostnames` when present, else parsed)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    return (m.group(1) + (m.group(2) or "")) if m else "127.0.0.1"


def detect_env(environ: dict | None = None) -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       "slurm")
    return DistEnv(0, 1, 0, "single")


def init_distributed(device_type: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Start the default process group (gloo on CPU, nccl on CUDA) from the environment, with a timeout.

    A single process without launcher variables gets a process group of one (so the same code path runs).
    """
    denv = detect_env()
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), denv.local_rank, denv.source)
    if denv.source == "slurm":
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "")))
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a group of one needs no agreed port: take a free one
            os.environ["MASTER_PORT"] = str(_free_port()) if denv.world == 1 else "29500"
    if device_type == "cuda":
        torch.cuda.set_device(denv.local_rank)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=denv.rank, world_size=denv.world,
                            timeout=timedelta(seconds=timeout_s))
    return denv


def comm_device(group=None) -> torch.device:
    """Where the tensors of a collective on `group` (None: the default group) must lie: NCCL communicates
    only CUDA tensors (this rank's device, set by `init_distributed`), gloo host tensors. A tensor that can
    be on the host while the run computes on the GPU (offloaded state, a Python number made a tensor) goes
    through this device."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def collective(op: str):
    """Name a collective: a failure or timeout inside ends the job with the rank and operation named."""
    try:
        yield
    except RuntimeError as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise MoeforgeError(f"rank {rank}: collective '{op}' failed or timed out ({e}); a peer rank died "
                            "or hung (see its log)") from e
