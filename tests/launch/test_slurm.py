"""Pipelines and sweeps through the real one-node SLURM cluster that .ci/slurm-up.sh starts."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from launch.slurm import job_states

pytestmark = pytest.mark.slurm


def jobs(run) -> dict[str, str]:
    return json.loads((run / "slurm" / "jobs.json").read_text())


def test_failed_step_cancels_dependants_and_resubmission_resumes(tmp_path, slurm, cli, wait_until):
    run = tmp_path / "smoke"
    args = ("pipeline=smoke", "launcher=slurm", f"hydra.run.dir={run}")
    cli(*args, "launcher.wait=false", cwd=tmp_path)
    ids = jobs(run)
    assert list(ids) == ["pretrain", "anneal", "export", "generate"]
    show = ["scontrol", "show", "job", "-o", ids["anneal"]]
    dep = subprocess.run(show, capture_output=True, text=True).stdout
    assert f"afterok:{ids['pretrain']}" in dep
    twice = cli(*args, cwd=tmp_path, check=False)  # no second copy of a run whose jobs are in the queue
    assert twice.returncode == 2 and "still queued or running" in twice.stderr
    for step in ids:  # kept in the run directory, readable and resubmittable
        assert "launch.step" in (run / "slurm" / f"{step}.sbatch").read_text()
    wait_until(lambda: (run / "pretrain" / "checkpoints" / "step-1").is_dir(), 600, "a checkpoint", poll=0.2)
    subprocess.run(["scancel", ids["pretrain"]], check=True)
    dependants = [ids[s] for s in ("anneal", "export", "generate")]

    def all_cancelled():
        states = job_states(dependants)
        return all(states[j][0] == "CANCELLED" for j in dependants) and states

    states = wait_until(all_cancelled, 60, "the dependant jobs to be cancelled")
    assert {states[j][1] for j in dependants} == {"DependencyNeverSatisfied"}
    assert not (run / "pretrain" / "DONE.json").exists()

    out = cli(*args, cwd=tmp_path).stdout
    new = jobs(run)
    assert set(new) == set(ids) and new["pretrain"] != ids["pretrain"]
    assert re.search(rf"pretrain: job {new['pretrain']} COMPLETED", out)
    log = (run / "slurm" / f"pretrain-{new['pretrain']}.out").read_text()
    assert re.search(r"resumed from \S+/pretrain/checkpoints/step-([12]) at step \1\b", log), log[-2000:]
    for step in ("pretrain", "anneal"):
        done = json.loads((run / step / "DONE.json").read_text())
        assert done["checkpoint"].endswith(f"{step}/checkpoints/step-3")
    assert (run / "export" / "hf" / "config.json").is_file()
    assert json.loads((run / "generate" / "summary.json").read_text())["metrics"]["new_tokens"] >= 1
    assert 'generation: "def add(a, b):" -> ' in out
    # everything finished: a third submission submits nothing
    again = cli(*args, cwd=tmp_path).stdout
    assert all(f"{step}: finished earlier, skipped" in again for step in ids)


def test_sweep_through_slurm_one_job_per_point(tmp_path, slurm, cli):
    sweep = tmp_path / "sw"
    out = cli("--multirun", "model-info", "model.hidden_size=64,128", "launcher=slurm",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path).stdout
    ids = [json.loads((sweep / i / "slurm" / "jobs.json").read_text())["model-info"] for i in ("0", "1")]
    assert ids[0] != ids[1] and all(f"job {i} COMPLETED" in out for i in ids)
    small, big = (json.loads((sweep / i / "summary.json").read_text())["metrics"]["total_params"]
                  for i in ("0", "1"))
    assert small < big


def test_bad_override_submits_nothing(tmp_path, slurm, cli):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc = cli("pipeline=smoke", "launcher=slurm", "trainer.max_steps=many", f"hydra.run.dir={tmp_path}/r",
               cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "trainer.max_steps: expected an int" in proc.stderr
    assert not (tmp_path / "r").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_srun_mode_runs_one_task_per_rank(tmp_path, slurm, cli):
    run = tmp_path / "mi"
    cli("model-info", "launcher=slurm", "launcher.mode=srun", "launcher.nproc_per_node=2",
        f"hydra.run.dir={run}", cwd=tmp_path)
    log = (run / "slurm" / f"model-info-{jobs(run)['model-info']}.out").read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" in log, log
    assert json.loads((run / "DONE.json").read_text())["metrics"]["total_params"] > 0
