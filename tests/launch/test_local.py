"""The local executor: stages in-process and under torchrun, pipelines, skipping, sweeps, kill and resume."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from omegaconf import OmegaConf

from launch.cli import main


def run_cli(*args: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 0


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_model_info_in_process_matches_the_v4_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_cli("model-info", "model=v4-flash", f"hydra.run.dir={tmp_path}/flash")
    m = summary(tmp_path / "flash")["metrics"]
    assert round(m["total_params"] / 1e9, 1) == 284.3 and round(m["active_params"] / 1e9, 1) == 13.3
    assert "284.3B" in capsys.readouterr().out
    assert OmegaConf.load(tmp_path / "flash" / ".hydra" / "config.yaml").stage == "model-info"


def test_torchrun_executor(tmp_path, cli):
    run = tmp_path / "tr"
    out = cli("model-info", "launcher=torchrun", "model=v4-small", f"hydra.run.dir={run}", cwd=tmp_path)
    assert "step model-info" in out.stdout
    assert (run / ".hydra" / "hydra.yaml").exists()  # written by the stage's own hydra.main under torchrun
    assert OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.output_dir == str(run)
    assert summary(run)["metrics"]["total_params"] > 5e8
    assert json.loads((run / "DONE.json").read_text())["stage"] == "model-info"


def test_parallel_steps_then_rerun_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "model-sizes"  # a pipeline's default run directory: the same command resumes
    run_cli("pipeline=model-sizes", "launcher.max_parallel=2")
    names = ["v4-tiny", "v4-small", "v4-flash", "v4-pro"]
    assert all((run / ".moeforge" / f"{n}.out").exists() for n in names)  # each ran as its own process
    totals = [summary(run / n)["metrics"]["total_params"] for n in names]
    assert totals == sorted(totals)
    report = (run / "report.txt").read_text()
    assert all(n in report for n in names) and "active_params=" in report
    stamps = {n: (run / n / "DONE.json").stat().st_mtime_ns for n in names}
    logs = {n: (run / ".moeforge" / f"{n}.out").read_text() for n in names}
    capsys.readouterr()
    run_cli("pipeline=model-sizes", "launcher.max_parallel=2")
    out = capsys.readouterr().out
    assert all(f"step {n}: finished earlier, skipped" in out for n in names)
    assert stamps == {n: (run / n / "DONE.json").stat().st_mtime_ns for n in names}
    assert logs == {n: (run / ".moeforge" / f"{n}.out").read_text() for n in names}  # no process started


def test_sweep_runs_each_point_in_its_own_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli("--multirun", "model-info", "model.hidden_size=64,128", f"hydra.sweep.dir={tmp_path}/sw")
    small, big = (summary(tmp_path / "sw" / i)["metrics"]["total_params"] for i in ("0", "1"))
    assert small < big
    assert OmegaConf.load(tmp_path / "sw" / "0" / ".hydra" / "config.yaml").model.hidden_size == 64


@pytest.mark.slow
def test_killed_pipeline_resumes_the_interrupted_step(tmp_path, cli, cli_background, wait_until):
    run = tmp_path / "smoke"
    # the first run starts each step as its own process (the demo's way, launcher.max_parallel=2); the
    # whole process group is killed, as Ctrl-C in a terminal would; the re-run runs steps in-process
    proc = cli_background("pipeline=smoke", "launcher.max_parallel=2", f"hydra.run.dir={run}", cwd=tmp_path,
                          log=tmp_path / "first.log")
    try:
        wait_until(lambda: (run / "anneal" / "checkpoints" / "step-1").is_dir() or proc.poll() is not None,
                   600, "the anneal step's first checkpoint", poll=0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert (run / "pretrain" / "DONE.json").exists() and not (run / "anneal" / "DONE.json").exists()
    first_marker = (run / "pretrain" / "DONE.json").read_text()

    out = cli("pipeline=smoke", f"hydra.run.dir={run}", cwd=tmp_path).stdout
    assert "step pretrain: finished earlier, skipped" in out
    assert (run / "pretrain" / "DONE.json").read_text() == first_marker
    log = (run / "anneal" / "pretrain.log").read_text()
    assert re.search(r"resumed from \S+/anneal/checkpoints/step-([12]) at step \1\b", log), log[-2000:]
    done = json.loads((run / "anneal" / "DONE.json").read_text())
    assert done["checkpoint"].endswith("anneal/checkpoints/step-3") and done["metrics"]["steps"] == 3
    report = (run / "report.txt").read_text()
    assert f"exported model: {run}/export/hf" in report and 'generation: "def add(a, b):" -> ' in report
