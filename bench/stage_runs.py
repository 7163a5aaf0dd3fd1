"""Runs of the real pretrain stage for the layout benchmarks: one process or torchrun, and the per-step
comparison of two runs' metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("loss", "grad_norm", "mtp_loss", "balance_loss")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pretrain(run_dir: Path, overrides: list[str], nproc: int = 1, timeout: float | None = None,
                 env: dict | None = None) -> tuple[list[dict], float]:
    """(per-step metric records, wall seconds) of `train.pretrain` with `overrides`, on `nproc` processes
    (torchrun when > 1). Fails with the end of the stage's stderr."""
    stage = ["-m", "train.pretrain", f"hydra.run.dir={run_dir}", *overrides]
    if nproc > 1:
        stage = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                 "--master-port", str(free_port()), *stage]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *stage], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {}), "PYTHONPATH": path})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(stage)} failed:\n{proc.stderr[-4000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r and "step" in r], seconds


def compare(base: list[dict], other: list[dict]) -> dict:
    """Largest relative difference per key in `KEYS` over the steps both runs logged."""
    if [r["step"] for r in base] != [r["step"] for r in other]:
        raise RuntimeError("the two runs logged different steps")
    worst = {}
    for key in KEYS:
        diffs = [abs(a[key] - b[key]) / max(abs(a[key]), 1e-12) for a, b in zip(base, other)
                 if a.get(key) is not None and b.get(key) is not None]
        worst[key] = max(diffs) if diffs else None
    return worst


def mean_after_first(records: list[dict], key: str) -> float | None:
    """Mean of `key` over the steps after the first (which includes compilation and warm-up)."""
    values = [r[key] for r in records[1:] if r.get(key) is not None]
    return sum(values) / len(values) if values else None
