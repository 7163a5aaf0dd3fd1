"""Where each rank's training step goes (`trainer.profile`): a few steps under `torch.profiler`, summarised.

`trainer.profile.steps=N` profiles steps `first_step` .. `first_step + N - 1` of the run and writes
`profile/rank<R>.json` in each rank's run directory: per step, the wall time and the time in

* `all_to_all`: the expert-parallel dispatch and combine (`nccl:all_to_all`, `gloo:all_to_all`, ...);
* `p2p`: pipeline sends and receives. A receive waits for its peer, so this holds the waiting too;
* `other_collective`: gradient reduction, FSDP gathers and scatters, barriers;
* `compute`: on CUDA the kernel time outside communication; on CPU the wall time outside it.

On CUDA, `device_idle` is the wall time during which no kernel ran (launch gaps, host work, and a
pipeline stage waiting for work). `pipeline_bubble` = p2p + device_idle estimates the pipeline bubble.
On CPU (gloo), where collectives block the calling thread, it is p2p alone. Each figure is also given as a
share of the wall time. Communication is read from the `nccl:` / `gloo:` events that process groups record
for every collective: their kernels on CUDA, their host time on CPU.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from train.summary import write_text_atomic

COMM_PREFIXES = ("nccl:", "gloo:")
KINDS = ("all_to_all", "p2p", "other_collective")


@dataclass
class ProfileConfig:
    steps: int = 0  # steps to profile (0 = off)
    first_step: int = 3  # the first profiled step (the steps before warm up: allocator, compilation)


def comm_kind(name: str) -> str | None:
    """The communication class of a profiler event name, or None for anything else."""
    if not name.startswith(COMM_PREFIXES):
        return None
    op = name.split(":", 1)[1]
    if "all_to_all" in op or "alltoall" in op:
        return "all_to_all"
    if "send" in op or "recv" in op:
        return "p2p"
    return "other_collective"


def _device_ms(event) -> float:
    total = getattr(event, "device_time_total", None)
    return (total if total is not None else event.cuda_time_total) / 1e3


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, milliseconds out)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def summarise(events, wall_ms: list[float], cuda: bool) -> dict:
    """Per-step milliseconds and shares of the wall time, from the profiler's events of len(wall_ms) steps."""
    steps, wall = len(wall_ms), sum(wall_ms)
    comm = defaultdict(float)
    kernels, kernel_ms, nccl_ms = [], 0.0, 0.0
    for e in events:
        kind = comm_kind(e.name)
        if kind is not None:  # on CUDA its kernels (children) carry the time; on CPU the blocked host
            comm[kind] += _device_ms(e) if cuda else e.cpu_time_total / 1e3
        elif cuda and e.device_type == DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end))
            kernel_ms += e.time_range.elapsed_us() / 1e3
            nccl_ms += e.time_range.elapsed_us() / 1e3 if "nccl" in e.name.lower() else 0.0
    comm_ms = sum(comm.values())
    out = {k: comm[k] / steps for k in KINDS}
    if cuda:
        out["compute"] = max(kernel_ms - comm_ms, 0.0) / steps
        out["device_idle"] = max(wall - _union_ms(kernels), 0.0) / steps
        out["pipeline_bubble"] = out["p2p"] + out["device_idle"]
    else:
        out["compute"] = max(wall - comm_ms, 0.0) / steps
        out["device_idle"] = None
        out["pipeline_bubble"] = out["p2p"]
    per_step = wall / steps
    return {"steps": steps, "wall_ms": per_step, "ms": out,
            "share": {k: (v / per_step if v is not None and per_step else None) for k, v in out.items()},
            # cross-check on CUDA: every NCCL kernel's time, attributed or not
            "nccl_kernel_ms": nccl_ms / steps if cuda else None}


class StepProfiler:
    """Profiles the configured steps of a run (`step(n)` wraps step n) and writes this rank's summary."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, device: torch.device):
        self.cfg, self.device = cfg, device
        self.path = Path(run_dir) / "profile" / f"rank{int(os.environ.get('RANK', '0'))}.json"
        self.last = cfg.first_step + cfg.steps - 1
        self.prof, self.wall_ms, self.numbers = None, [], []

    @contextmanager
    def step(self, n: int):
        if not self.cfg.steps or not self.cfg.first_step <= n <= self.last:
            yield
            return
        if self.prof is None:
            cuda = [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
            self.prof = profile(activities=[ProfilerActivity.CPU, *cuda])
            self.prof.__enter__()
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall_ms.append((time.perf_counter() - start) * 1e3)
        self.numbers.append(n)
        if n == self.last:
            self.finish()

    def finish(self) -> None:
        """Stop profiling and write the summary (also for a run that ends before the last profiled step)."""
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        record = {"rank": int(os.environ.get("RANK", "0")), "world": int(os.environ.get("WORLD_SIZE", "1")),
                  "device": str(self.device), "profiled_steps": self.numbers,
                  **summarise(self.prof.events(), self.wall_ms, self.device.type == "cuda")}
        self.prof = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(record, indent=1) + "\n")


def read_profiles(run_dir: Path) -> list[dict]:
    """Every rank's summary of a run, by rank."""
    run_dir = Path(run_dir)  # rank 0 writes under the run directory, the others under ranks/<R>/
    files = [*run_dir.glob("profile/rank*.json"), *run_dir.glob("ranks/*/profile/rank*.json")]
    files.sort(key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in files]
