"""The SLURM executor: one sbatch script per step, chained with --dependency=afterok, followed with squeue."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from launch.launcher import LauncherConfig
from launch.local import resume_hint
from launch.markers import read_marker, stale_reason
from launch.plan import Plan, Step
from launch.procs import PASSED_ENV, REPO_ROOT
from launch.report import format_report
from launch.step import identity, resolve
from model.errors import MoeforgeError

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}


def sbatch_script(plan: Plan, step: Step, plan_path: Path) -> str:
    """The batch script of one step; it runs ``python -m launch.step <plan> <step>`` under srun."""
    lc = LauncherConfig(**step.launcher)
    out_dir = Path(plan.run_dir) / "slurm"
    tasks = lc.nproc_per_node if lc.mode == "srun" else 1
    lines = [
        "#!/bin/bash",
        f"# moeforge {plan.name}: step {step.name} (stage {step.stage}), input {step.input or '-'}",
        f"# overrides: {' '.join(step.overrides) or '-'}",
        "# Resubmit with: sbatch <this file>  (a finished step is skipped, an interrupted one resumes)",
        f"#SBATCH --job-name=mf-{plan.name}-{step.name}",
        f"#SBATCH --output={out_dir / step.name}-%j.out",
        f"#SBATCH --nodes={lc.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --cpus-per-task={lc.cpus_per_task}",
        f"#SBATCH --time={lc.time}",
        f"#SBATCH --chdir={os.getcwd()}",
    ]
    for flag, value in (("partition", lc.partition), ("account", lc.account), ("qos", lc.qos),
                        ("mem", lc.mem), ("gpus-per-node", lc.gpus_per_node or None)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {a}" for a in lc.sbatch_args]
    repo = shlex.quote(str(REPO_ROOT))
    lines += ["set -euo pipefail", f"export PYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}}"]
    lines += [f"export {k}={shlex.quote(os.environ[k])}" for k in PASSED_ENV if k in os.environ]
    lines += list(lc.setup)
    cmd = [sys.executable, "-m", "launch.step", str(plan_path), step.name]
    lines.append(f"srun --kill-on-bad-exit=1 {shlex.join(cmd)}")
    return "\n".join(lines) + "\n"


def submit(plan: Plan) -> dict[str, str]:
    """Submit every unfinished step as a job (dependants afterok their inputs); returns step -> job id."""
    out_dir = Path(plan.run_dir) / "slurm"
    check_no_active_jobs(out_dir / "jobs.json")
    plan_path = plan.save()
    out_dir.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    resubmit = ["#!/bin/bash", "# Resubmit the steps of this run that had not finished, chained as before.",
                "set -euo pipefail"]
    for step in plan.steps:
        if _finished(plan, step, ids):
            print(f"[moeforge] step {step.name}: finished earlier, skipped", flush=True)
            continue
        script = out_dir / f"{step.name}.sbatch"
        script.write_text(sbatch_script(plan, step, plan_path))
        deps = [ids[d] for d in plan.deps(step) if d in ids]
        dep_args = [f"--dependency=afterok:{':'.join(deps)}", "--kill-on-invalid-dep=yes"] if deps else []
        proc = _run(["sbatch", "--parsable", *dep_args, str(script)])
        if proc.returncode != 0:
            cancel(list(ids.values()))
            raise MoeforgeError(f"sbatch {script} failed: {proc.stderr.strip()}")
        ids[step.name] = proc.stdout.strip().split(";")[0]
        dep_vars = ":".join("${" + _var(d) + "}" for d in plan.deps(step) if d in ids)
        dep_text = f"--dependency=afterok:{dep_vars} --kill-on-invalid-dep=yes " if dep_vars else ""
        resubmit.append(f"{_var(step.name)}=$(sbatch --parsable {dep_text}{shlex.quote(str(script))})")
        print(f"[moeforge] step {step.name}: job {ids[step.name]}"
              + (f" (after {', '.join(deps)})" if deps else ""), flush=True)
    (out_dir / "jobs.json").write_text(json.dumps(ids, indent=2) + "\n")
    (out_dir / "submit.sh").write_text("\n".join(resubmit) + "\n")
    return ids


def run_slurm(plans: list[Plan]) -> int:
    """Submit every plan's unfinished steps; unless ``launcher.wait=false``, follow the jobs to the end and
    print each pipeline's report. Returns 0 when every job completed."""
    jobs: dict[str, str] = {}
    steps: dict[str, Step] = {}
    for plan in plans:
        prefix = f"{plan.run_dir}:" if len(plans) > 1 else ""
        for name, jid in submit(plan).items():
            jobs[prefix + name], steps[prefix + name] = jid, plan.step(name)
    lc = LauncherConfig(**plans[0].steps[0].launcher)
    if not lc.wait or not jobs:
        return 0
    states = follow(jobs, lc.poll_seconds)
    for plan in plans:
        if len(plan.steps) > 1:
            print(format_report(plan), end="", flush=True)
    # a job that already left scontrol's memory (MinJobAge) counts as completed if its step left a marker
    bad = {k: v for k, v in states.items()
           if v != "COMPLETED" and not (v == "UNKNOWN" and read_marker(Path(steps[k].run_dir)))}
    if bad:
        hints = "; ".join(resume_hint(p) for p in plans)
        print(f"moeforge: jobs did not complete: {bad}; {hints}", file=sys.stderr)
        return 1
    return 0


def check_no_active_jobs(jobs_file: Path) -> None:
    """Refuse to submit a run again while jobs of its last submission are still queued or running."""
    if not jobs_file.exists():
        return
    old = json.loads(jobs_file.read_text())
    states = job_states(list(old.values()))
    active = {step: jid for step, jid in old.items() if states[jid][0] not in TERMINAL | {"UNKNOWN"}}
    if active:
        raise MoeforgeError(f"{jobs_file.parent.parent}: jobs of the last submission are still queued or "
                            f"running ({active}); wait for them (squeue) or cancel them "
                            f"(scancel {' '.join(active.values())}) before submitting again")


def _finished(plan: Plan, step: Step, ids: dict[str, str]) -> bool:
    if not plan.skip_done or any(d in ids for d in plan.deps(step)):
        return False
    try:
        overrides, inputs = resolve(plan, step)
    except MoeforgeError:
        return False
    return stale_reason(Path(step.run_dir), identity(overrides), inputs) is None


def job_states(ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) from squeue, and from scontrol for jobs that left the queue."""
    states: dict[str, tuple[str, str]] = {}
    if ids:
        out = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"]).stdout
        for line in out.splitlines():
            jid, state, reason = (line.split("|") + ["", ""])[:3]
            states[jid.strip()] = (state.strip(), reason.strip())
    for jid in ids:
        if jid not in states:
            out = _run(["scontrol", "show", "job", "-o", jid]).stdout
            fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
            states[jid] = (fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""))
    return states


def follow(jobs: dict[str, str], poll_seconds: float = 2.0, timeout: float | None = None) -> dict[str, str]:
    """Wait for the jobs (label -> id) to end, printing state changes; returns label -> final state."""
    last: dict[str, str] = {}
    start = time.time()
    while True:
        states = job_states(list(jobs.values()))
        for label, jid in jobs.items():
            state, reason = states.get(jid, ("UNKNOWN", ""))
            if last.get(label) != state:
                extra = f" ({reason})" if reason and reason != "None" else ""
                print(f"[moeforge] {label}: job {jid} {state}{extra}", flush=True)
                last[label] = state
        if all(s in TERMINAL or s == "UNKNOWN" for s in last.values()):
            return last
        if timeout is not None and time.time() - start > timeout:
            raise MoeforgeError(f"jobs {jobs} still running after {timeout:.0f} s")
        time.sleep(poll_seconds)


def cancel(ids: list[str]) -> None:
    if ids:
        _run(["scancel", *ids])


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def _var(step: str) -> str:
    """A shell variable name for a step's job id in submit.sh."""
    return "job_" + "".join(c if c.isalnum() else "_" for c in step)
