"""The local executor: a plan's steps in order, in this process (or torchrun), or several at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from launch.markers import read_marker
from launch.plan import Plan
from launch.procs import job_env
from launch.step import run_step
from model.errors import MoeforgeError


def run_local(plan: Plan) -> dict[str, dict]:
    """Run every step (finished ones are skipped); returns each step's marker record."""
    plan_path = plan.save()
    if plan.max_parallel > 1:
        return _run_parallel(plan, plan_path)
    done = {}
    for step in plan.steps:
        try:
            done[step.name] = run_step(plan, step.name)
        except Exception:
            print(f"[moeforge] step {step.name} failed; {resume_hint(plan)}", flush=True)
            raise
    return done


def resume_hint(plan: Plan) -> str:
    """What to type to carry on after a failure or an interruption."""
    return (f"fix the cause and run the same command with hydra.run.dir={plan.run_dir} (finished steps are "
            f"skipped, an interrupted one resumes from its last checkpoint)")


def _run_parallel(plan: Plan, plan_path: Path) -> dict[str, dict]:
    """Up to ``plan.max_parallel`` ready steps at once, each as ``python -m launch.step``."""
    done: dict[str, dict] = {}
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    failed: list[str] = []
    while len(done) + len(failed) < len(plan.steps):
        ready = [s for s in plan.steps if s.name not in done and s.name not in running
                 and all(d in done for d in plan.deps(s))]
        while ready and len(running) < plan.max_parallel and not failed:
            step = ready.pop(0)
            log = plan.state_dir / f"{step.name}.out"
            print(f"[moeforge] step {step.name}: started (log {log})", flush=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "launch.step", str(plan_path), step.name],
                                        stdout=out, stderr=subprocess.STDOUT, env=job_env())
            running[step.name] = (proc, log)
        if not running:
            break
        time.sleep(0.5)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode == 0:
                done[name] = read_marker(Path(plan.step(name).run_dir)) or {}
                print(f"[moeforge] step {name}: finished", flush=True)
            else:
                failed.append(name)
                print(f"[moeforge] step {name}: failed (exit {proc.returncode}); see {log}", flush=True)
    if failed or len(done) < len(plan.steps):
        missing = [s.name for s in plan.steps if s.name not in done]
        raise MoeforgeError(f"pipeline {plan.name}: steps {failed} failed, {missing} not finished; "
                            + resume_hint(plan))
    return done
