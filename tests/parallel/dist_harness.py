"""Start `tests/parallel/worker.py` under torchrun (gloo, CPU) and read back its JSON results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, out: Path, ckpt: Path, layouts: list[str], timeout: float = 600,
             worker: Path = WORKER) -> dict:
    """Run `worker` on `nproc` processes (checkpoints in `ckpt`); return its results (fail with its log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(worker), str(out), str(ckpt), *layouts]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        log = f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{log}")
    return json.loads(out.read_text())


def assert_matches(results: dict, rel: float = 1e-5) -> None:
    """Every layout's loss and gradient norm of every step equal the single-process run within `rel`."""
    ref = results["reference"]
    for layout, steps in results.items():
        if layout in ("reference", "muon"):
            continue
        assert len(steps) == len(ref), layout
        assert any(steps), layout
        for i, (got, want) in enumerate(zip(steps, ref)):
            if got is None:  # before the step a resumed run starts from
                continue
            for key in ("loss", "grad_norm", "eval"):
                if key not in want:
                    continue
                err = abs(got[key] - want[key]) / abs(want[key])
                assert err < rel, f"{layout} step {i + 1} {key}: {got[key]} vs single process {want[key]}"
