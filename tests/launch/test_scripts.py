"""The commands the executors start: sbatch scripts and torchrun command lines."""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict

import pytest

from launch.launcher import LauncherConfig
from launch.plan import Plan, Step
from launch.procs import REPO_ROOT, torchrun_argv
from launch.slurm import sbatch_script


def script(tmp_path, monkeypatch, **launcher) -> str:
    monkeypatch.setenv("WANDB_MODE", "offline")
    step = Step("sft-math", "sft", ["+domain=math"], input="pretrain", run_dir=str(tmp_path / "sft-math"),
                launcher=asdict(LauncherConfig(name="slurm", **launcher)))
    plan = Plan("demo", str(tmp_path), [step], "slurm")
    return sbatch_script(plan, step, tmp_path / "plan.json")


def test_sbatch_script_multinode_torchrun(tmp_path, monkeypatch):
    text = script(tmp_path, monkeypatch, nodes=4, nproc_per_node=8, partition="gpu", gpus_per_node=8,
                  mem="200G", cpus_per_task=32, time="12:00:00", setup=["module load cuda"],
                  sbatch_args=["--exclusive"])
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for flag in ("--nodes=4", "--ntasks-per-node=1", "--partition=gpu", "--gpus-per-node=8", "--mem=200G",
                 "--cpus-per-task=32", "--time=12:00:00", "--exclusive", "--job-name=mf-demo-sft-math",
                 f"--output={tmp_path}/slurm/sft-math-%j.out"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "module load cuda" in lines and "export WANDB_MODE=offline" in lines
    assert f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" in lines
    assert lines[-1] == (f"srun --kill-on-bad-exit=1 {sys.executable} -m launch.step {tmp_path}/plan.json "
                         f"sft-math")
    assert "+domain=math" in text  # the step's overrides are shown for the reader
    assert lines.index("module load cuda") < len(lines) - 1


def test_sbatch_script_srun_mode_starts_one_task_per_rank(tmp_path, monkeypatch):
    text = script(tmp_path, monkeypatch, nodes=2, nproc_per_node=4, mode="srun")
    assert "#SBATCH --ntasks-per-node=4" in text and "#SBATCH --partition" not in text


def test_torchrun_argv_single_node(monkeypatch):
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    argv = torchrun_argv("train.pretrain", ["a=1"], LauncherConfig(nproc_per_node=2))
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                    "-m", "train.pretrain", "a=1"]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs scontrol to expand the node list")
def test_torchrun_argv_across_slurm_nodes(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    argv = torchrun_argv("train.pretrain", [], LauncherConfig(name="slurm", nodes=2, nproc_per_node=8))
    for arg in ("--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:29500",
                "--rdzv-id=4242", "--nproc-per-node=8"):
        assert arg in argv
