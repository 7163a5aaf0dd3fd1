"""bench/profile_step.py on the CPU: a tiny profiled step, its parts, operators and host-sync counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_profile_names_the_parts_and_counts_host_syncs(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "bench" / "profile_step.py"), "--device", "cpu", "--tiny",
           "--out", str(out), "--warmup", "1", "--steps", "1", "--top", "7"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    parts = data["parts_forward_ms"]
    for part in ("model", "attention", "compressor", "indexer", "moe", "router", "routed experts", "mhc"):
        assert parts[f"{part} (cpu)"] > 0, part
    assert parts["model (cpu)"] > parts["attention (cpu)"] > parts["indexer (cpu)"]  # ranges nest
    assert len(data["top_ops"]) == 7 and data["step_ms"] > 0
    assert data["host_syncs_per_step"]["item() / bool(tensor)"] >= 1  # the loss and the grad norm at least
    assert data["row"]["seq"] == 64 and "step" in proc.stdout
    launches = data["launches_per_step"]  # leaf aten calls on the CPU, by phase and part
    assert launches["forward"]["mhc"] > 0 and launches["backward"]["mhc"] > 0 and launches["optimizer"] > 0
    assert launches["backward"]["attention"] > launches["backward"].get("other", 0)  # nodes map to parts
    parts = sum(launches["forward"].values()) + sum(launches["backward"].values())
    assert launches["total"] == parts + launches["optimizer"] + launches["other"]
