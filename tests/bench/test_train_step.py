"""bench/train_step.py: one short tiny row of every implementation (the transformers peer included) end to
end on the CPU, the JSON it writes, and the row plan, ratios and failure handling."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import train_step as ts
from bench.efficiency import load_model_yaml
from model.info import count_parameters

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("transformers")


def test_tiny_rows_of_every_implementation_end_to_end(tmp_path):
    out = tmp_path / "train_step.json"
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--device", "cpu", "--tiny",
           "--out", str(out), "--models", "v4-small", "--rows", "2x4096,4x2048:bf16,1x32768:bf16-ac",
           "--impls", "peer,bf16,fp8,bf16-mtp,bf16-ac",
           "--warmup", "1", "--steps", "1", "--peak-tflops", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__ and "sparse attention" in data["flops"]
    order = [(r["shape"], r["impl"]) for r in data["rows"]]
    assert order == [("2x4096", "peer"), ("2x4096", "fp8"), ("2x4096", "bf16-mtp"), ("2x4096", "bf16"),
                     ("4x2048", "bf16"), ("1x32768", "bf16-ac")]
    for r in data["rows"]:
        assert r["status"] == "ok", (r["shape"], r["impl"], r["status"])
        assert r["model"] == "v4-small" and r["model_run"] == "v4-tiny"
        assert r["tokens"] == r["batch"] * r["seq"] and r["tokens_per_s"] > 0 and r["timed_steps"] == 1
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["step_ms"] / 1e3))
        assert r["mfu"] == pytest.approx(r["tflops_per_s"])  # peak given as 1 TFLOP/s
        assert len(r["losses"]) == 2 and abs(r["loss_first"] - math.log(4096)) < 0.5, r["losses"]
    reused = data["rows"][4]  # bf16 at 4 x 32 tokens: the model built for 2 x 64 trains on
    assert reused["reused_model"] and reused["build_s"] == 0 and (reused["batch"], reused["seq"]) == (4, 32)
    assert not any(r["reused_model"] for r in data["rows"][:4])
    rows = {r["impl"]: r for r in data["rows"][:4] + data["rows"][5:]}
    assert (rows["peer"]["batch"], rows["peer"]["seq"], rows["bf16-ac"]["seq"]) == (2, 64, 512)
    assert rows["peer"]["attn"].startswith("hf-") and rows["peer"]["experts"].startswith("hf-")
    assert rows["bf16"]["attn"] == "sparse" and rows["bf16"]["experts"] in ("grouped_mm", "loop")
    assert rows["fp8"]["experts"] == "Fp8Experts" and rows["fp8"]["mfu_fp8_peak"] is not None
    assert rows["bf16-mtp"]["mtp_layers"] == 1 and rows["bf16"]["mtp_layers"] == 0
    assert rows["bf16-ac"]["activation_checkpointing"] is True
    # the same FLOP count for the peer and moeforge without MTP; the MTP layer adds to it
    flops = {impl: r["flops_per_step"] for impl, r in rows.items()}
    assert flops["peer"] == flops["bf16"] == flops["fp8"] < flops["bf16-mtp"]
    speed = {impl: r["tokens_per_s"] for impl, r in rows.items()}
    assert rows["bf16"]["vs_peer"] == pytest.approx(speed["bf16"] / speed["peer"])
    assert rows["fp8"]["vs_bf16"] == pytest.approx(speed["fp8"] / speed["bf16"])
    assert rows["peer"]["vs_peer"] is None and rows["peer"]["vs_bf16"] is None
    lines = proc.stdout.strip().splitlines()
    assert lines[-1 - len(order)].split()[:3] == ["model", "shape", "impl"]  # the table is printed last


def test_plan_order_and_filters(tmp_path):
    rows = ts.plan_rows(ts.parse_args(["--out", str(tmp_path / "x.json")]))
    first = [("2x4096", i) for i in ("peer", "fp8", "bf16-mtp", "bf16", "bf16-compile", "fp8-compile",
                                         "bf16-compile-adamw", "bf16-blocks", "bf16-blocks-adamw", "fp8-blocks")]
    assert [(r.shape, r.impl) for r in rows[:11]] == first + [("1x65536", "bf16")]
    assert {r.shape for r in rows} == {"2x4096", "4x2048", "1x8192", "1x32768", "1x65536"}
    assert {(r.model, r.impl) for r in rows} >= {("v4-medium", i) for i in ("peer", "bf16", "fp8")}
    assert len({(r.model, r.shape, r.impl) for r in rows}) == len(rows)
    args = ts.parse_args(["--out", "x", "--tiny", "--models", "v4-small", "--rows", "1x65536:bf16-ac,4x2048",
                          "--impls", "bf16,bf16-ac"])
    got = [(r.shape, r.impl, r.batch, r.seq) for r in ts.plan_rows(args)]
    assert got == [("4x2048", "bf16", 4, 32), ("1x65536", "bf16-ac", 1, 1024)]
    with pytest.raises(SystemExit, match="--impls"):
        ts.plan_rows(ts.parse_args(["--out", "x", "--impls", "bf16,megatron"]))


def test_failed_rows_are_recorded_and_ratios_skip_them(tmp_path):
    args = ts.parse_args(["--out", str(tmp_path / "x.json"), "--device", "cpu"])
    live = ts.Live(args, torch.device("cpu"))
    rec = ts.measure(args, ts.Row("v4-missing", "2x4096", "bf16", 2, 64), torch.device("cpu"), live)
    assert live.built is None and "triton_error" not in rec  # sparse attention on the CPU: no retry
    assert rec["status"].startswith("error: ConfigError") and "v4-missing" in rec["status"]
    assert ts.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB"))
    assert not ts.is_oom(RuntimeError("shape mismatch"))
    records = [{"model": "m", "shape": "s", "impl": "peer", "status": "OOM"},
               {"model": "m", "shape": "s", "impl": "bf16", "status": "ok", "tokens_per_s": 10.0},
               {"model": "m", "shape": "s", "impl": "fp8", "status": "ok", "tokens_per_s": 15.0}]
    ts.add_ratios(records)
    assert records[1]["vs_peer"] is None and records[2]["vs_bf16"] == 1.5 and "vs_peer" not in records[0]


def test_medium_config_is_a_few_billion_parameters():
    cfg = load_model_yaml("v4-medium")
    cfg.validate()
    total, active = count_parameters(cfg)
    assert 3.0e9 < total < 3.6e9 and 1.2e9 < active < 1.4e9
