"""Exact resume: N steps straight == N/2 steps, SIGKILL, resume=auto, the rest; bit for bit on CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.errors import MoeforgeError
from train.checkpoint import MANIFEST, find_latest
from train.metrics import read_jsonl
from train.pretrain import run

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 10, 4
ARGS = [*TINY, f"trainer.max_steps={STEPS}", f"checkpoint.every={EVERY}", "trainer.eval_every=4",
        "checkpoint.keep=3"]


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "train.pretrain", f"hydra.run.dir={run_dir}", *ARGS]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def _run(run_dir: Path) -> None:
    proc = subprocess.run(_cmd(run_dir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_after_checkpoint(run_dir: Path, step: int) -> None:
    proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = run_dir / "checkpoints" / f"step-{step}" / MANIFEST
    try:
        while not target.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill"


def _by_step(run_dir: Path) -> dict[int, dict]:
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == list(range(STEPS + 1)), steps  # one record per step, none duplicated by the resume
    return {r["step"]: r for r in records}


def _weights_sha(ckpt: Path) -> str:
    return json.loads((ckpt / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]


def test_sigkill_then_resume_auto_matches_a_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight)
    _kill_after_checkpoint(resumed, EVERY)
    # debris of a crash mid-save must never be picked: a temporary dir and a dir without its manifest
    latest = find_latest(resumed / "checkpoints")
    shutil.copytree(latest, resumed / "checkpoints" / ".tmp-step-9")
    shutil.copytree(latest, resumed / "checkpoints" / "step-9")
    (resumed / "checkpoints" / "step-9" / MANIFEST).unlink()
    _run(resumed)
    assert f"resumed from {latest} at step {EVERY}" in (resumed / "pretrain.log").read_text()

    a, b = _by_step(straight), _by_step(resumed)
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "mtp_loss", "balance_loss", "val_loss"):
            assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))
    assert a[0]["val_loss"] == b[0]["val_loss"]
    final = f"checkpoints/step-{STEPS}"
    assert _weights_sha(straight / final) == _weights_sha(resumed / final)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["checkpoint"] == str(resumed / final) and (resumed / "loss_curve.png").is_file()


def test_resume_auto_refuses_a_corrupted_checkpoint(compose_cfg, tmp_path):
    run(compose_cfg(*TINY, "trainer.max_steps=2", "checkpoint.every=1", "trainer.eval_every=0"), tmp_path)
    weights = tmp_path / "checkpoints" / "step-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(MoeforgeError, match=f"{weights} is corrupt"):
        run(compose_cfg(*TINY, "trainer.max_steps=3", "trainer.eval_every=0"), tmp_path)
