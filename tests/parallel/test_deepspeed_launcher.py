"""launcher=deepspeed, for real: `moeforge pretrain launcher=deepspeed launcher.hostfile=<this machine, 2
slots> parallel=zero3-offload parallel.ep=2` starts two ranks through DeepSpeed's launcher (CPU, gloo) that
train under the DeepSpeed engine (the training stage's path: the model built on the host, partitioned by
ZeRO-3, partitions and optimizer offloaded) and write a moeforge checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dist_harness import ROOT, free_port


def test_deepspeed_launcher_starts_two_ranks(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.cli", "pretrain", "launcher=deepspeed",
           f"launcher.hostfile={hostfile}", f"launcher.rdzv_port={free_port()}", "parallel=zero3-offload",
           "parallel.ep=2", f"hydra.run.dir={run}", "trainer.batch_size=2", "trainer.max_steps=2",
           "optim.warmup_steps=1", "trainer.seq_len=32", "trainer.eval_every=0", "trainer.eval_batches=1",
           "logger.progress=false", "logger.wandb.mode=disabled"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "deepspeed.launcher.launch" in proc.stdout + proc.stderr  # DeepSpeed's runner started the ranks
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    assert (run / "ranks" / "1" / "metrics.jsonl").is_file()  # the second rank ran
    manifest = json.loads((run / "checkpoints" / "step-2" / "manifest.json").read_text())
    layout = manifest["layout"]
    assert manifest["format"] == "moeforge-dcp-v1" and layout["engine"] == "deepspeed"
    assert (layout["world"], layout["ep"], layout["zero_stage"]) == (2, 2, 3)
