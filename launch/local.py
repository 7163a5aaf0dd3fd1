"""The local executor: a plan's steps in order, in this process (or torchrun), or several at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from launch.markers import read_marker
from launch.plan import Plan
from launch.procs import job_env
from launch.progress import duration, label, status_line
from launch.step import finished_earlier, run_step
from model.errors import MoeforgeError

STATUS_EVERY = 60.0  # seconds between the status lines of parallel steps


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
    """Up to ``plan.max_parallel`` ready steps at once, each as ``python -m launch.step``; a status line
    every STATUS_EVERY seconds says how far the running ones got."""
    done: dict[str, dict] = {}
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    failed: list[str] = []
    started = last_status = time.time()
    while len(done) + len(failed) < len(plan.steps):
        ready = [s for s in plan.steps if s.name not in done and s.name not in running
                 and all(d in done for d in plan.deps(s))]
        skipped = False
        while ready and len(running) < plan.max_parallel and not failed:
            step = ready.pop(0)
            earlier = finished_earlier(plan, step.name)  # decided here: no process started to skip it
            if earlier is not None:
                done[step.name], skipped = earlier, True
                continue
            log = plan.state_dir / f"{step.name}.out"
            print(f"[moeforge] {label(plan, step.name)} ({step.stage}): started, log {log}", flush=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "launch.step", str(plan_path), step.name],
                                        stdout=out, stderr=subprocess.STDOUT, env=job_env())
            running[step.name] = (proc, log, time.time())
        if skipped:  # the steps after a skipped one may be ready now
            continue
        if not running:
            break
        time.sleep(0.5)
        if time.time() - last_status >= STATUS_EVERY:
            print(status_line(plan, list(running), time.time() - started), flush=True)
            last_status = time.time()
        for name, (proc, log, since) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode == 0:
                done[name] = read_marker(Path(plan.step(name).run_dir)) or {}
                took = duration(time.time() - since)
                print(f"[moeforge] {label(plan, name)}: finished in {took}", flush=True)
            else:
                failed.append(name)
                print(f"[moeforge] {label(plan, name)}: failed (exit {proc.returncode}); see {log}",
                      flush=True)
    if failed or len(done) < len(plan.steps):
        missing = [s.name for s in plan.steps if s.name not in done]
        raise MoeforgeError(f"pipeline {plan.name}: steps {failed} failed, {missing} not finished; "
                            + resume_hint(plan))
    return done
