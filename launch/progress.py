"""What a running plan tells its user: which step runs, where its log is, how far it got, how long it took."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from launch.plan import Plan


def label(plan: Plan, name: str) -> str:
    """``step 3/8 grpo-math``: the step's place in a pipeline (``step pretrain`` for a single stage)."""
    names = [s.name for s in plan.steps]
    return f"step {names.index(name) + 1}/{len(names)} {name}" if len(names) > 1 else f"step {name}"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def stage_log(step_dir: str | Path, stage: str) -> Path:
    """The log file an in-process stage writes (launch.inprocess.run_in_process)."""
    return Path(step_dir) / f"{stage}.log"


def position(step_dir: str | Path) -> str | None:
    """``40/120``: the last step in the stage's metrics.jsonl and its trainer.max_steps, when known."""
    step_dir = Path(step_dir)
    last = None
    metrics = step_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text().splitlines()
        for line in reversed(lines):
            try:
                last = json.loads(line).get("step")
            except json.JSONDecodeError:  # a line being written
                continue
            if last is not None:
                break
    if last is None:
        return None
    total = None
    saved = step_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        total = OmegaConf.select(OmegaConf.load(saved), "trainer.max_steps", default=None)
    return f"{last}/{total}" if total is not None else str(last)


def status_line(plan: Plan, running: list[str], elapsed: float) -> str:
    """``[moeforge] 4m10s: sft-math at step 20/40, sft-code at step 18/40``."""
    parts = []
    for name in running:
        pos = position(plan.step(name).run_dir)
        parts.append(f"{name} at step {pos}" if pos else f"{name} starting")
    return f"[moeforge] {duration(elapsed)}: " + ", ".join(parts)
