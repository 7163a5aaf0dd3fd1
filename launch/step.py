"""Run one step of a plan: resolve its inputs, skip it if finished, run it, leave its marker.

``python -m launch.step <run dir>/.moeforge/plan.json <step>`` is what SLURM jobs (and parallel local
steps) execute; the in-process pipeline calls :func:`run_step` directly.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from launch.compose import compose_stage
from launch.deepspeed_launcher import deepspeed_argv
from launch.inprocess import run_in_process
from launch.launcher import LauncherConfig, launcher_config
from launch.markers import MARKER, checksum, read_marker, stale_reason, write_marker
from launch.plan import PLACEHOLDER, Plan, Step
from launch.procs import (
    cpu_seconds,
    intra_op_threads,
    is_lead_process,
    job_env,
    rank_env_from_slurm,
    torchrun_argv,
)
from launch.progress import duration, label, stage_log
from launch.stages import get_stage
from launch.validate import check_input_path
from model.errors import MoeforgeError
from train.summary import read_summary

log = logging.getLogger(__name__)


def resolve(plan: Plan, step: Step) -> tuple[list[str], dict[str, str | None]]:
    """The step's final overrides (inputs filled in, run dir set) and the checksums of its inputs."""
    spec = get_stage(step.stage)
    names = {s.name for s in plan.steps}

    def output_of(name: str) -> dict:
        marker = read_marker(Path(plan.step(name).run_dir))
        if marker is None:
            raise MoeforgeError(f"step {step.name!r} needs step {name!r}, which has not finished "
                                f"(no {Path(plan.step(name).run_dir) / MARKER})")
        return marker

    inputs = {name: output_of(name).get("checksum") for name in plan.deps(step)}

    def fill(m) -> str:
        return quote(str(output_of(m.group(1))["checkpoint"]))

    overrides = [PLACEHOLDER.sub(fill, o) for o in step.overrides]
    if step.input:
        if step.input in names:
            ckpt = output_of(step.input).get("checkpoint")
            if not ckpt:
                raise MoeforgeError(f"step {step.input!r} produced no checkpoint for step {step.name!r}")
        else:
            ckpt = step.input
            check_input_path(spec.input_key, ckpt)
            inputs["input"] = checksum(ckpt)
        overrides.append(f"{spec.input_key}={quote(ckpt)}")
    overrides.append(f"hydra.run.dir={quote(step.run_dir)}")
    return overrides, inputs


def quote(path: str) -> str:
    """A path as a Hydra override value (quoted when it has characters the override grammar treats)."""
    if re.fullmatch(r"[\w/.\-+@%]+", str(path)):
        return str(path)
    return "'" + str(path).replace("'", "\\'") + "'"  # backslashes stay literal in Hydra's quoted strings


def identity(overrides: list[str]) -> list[str]:
    """The overrides that define a step's result: not where it ran (``launcher.*``) nor ``hydra.*``."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return [o for o, k in zip(overrides, keys) if k.split(".")[0] not in ("launcher", "hydra")]


def run_step(plan: Plan, name: str) -> dict:
    """Run step ``name`` unless its marker shows it finished; returns its marker record."""
    step = plan.step(name)
    step_dir = Path(step.run_dir)
    overrides, inputs, reason = _previous_run(plan, step)
    if reason is None:
        return _skip(step)
    why = f", re-run: {reason}" if reason not in ("not finished", "always run") else ""
    spec = get_stage(step.stage)
    if step.launcher:
        lc = LauncherConfig(**step.launcher)
    else:
        lc = launcher_config(compose_stage(spec, overrides)[0])
    where = f"log {stage_log(step_dir, spec.name)}" if _in_process(lc) else f"logs in {step_dir}"
    print(f"[moeforge] {label(plan, name)} ({step.stage}) -> {step_dir}, {where}{why}", flush=True)
    started, cpu = time.time(), cpu_seconds()
    with intra_op_threads(lc.threads):
        summary = _execute(spec, name, overrides, lc, step_dir)
    seconds, cpu = time.time() - started, cpu_seconds() - cpu
    took = f"{duration(seconds)} (CPU {duration(cpu)})"
    print(f"[moeforge] {label(plan, name)}: finished in {took}", flush=True)
    record = {"step": name, "stage": step.stage, "overrides": identity(overrides), "inputs": inputs,
              "checkpoint": summary.get("checkpoint"), "metrics": summary.get("metrics", {}),
              "summary": summary, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}
    if is_lead_process():
        write_marker(step_dir, record)
    return read_marker(step_dir) or record


def finished_earlier(plan: Plan, name: str) -> dict | None:
    """The step's marker record (and a line saying it is skipped) if it finished earlier with the same
    overrides and inputs, else None."""
    step = plan.step(name)
    return _skip(step) if _previous_run(plan, step)[2] is None else None


def _previous_run(plan: Plan, step: Step) -> tuple[list[str], dict[str, str | None], str | None]:
    """(overrides, input checksums, why the step must run: None if its marker shows it finished)."""
    overrides, inputs = resolve(plan, step)
    reason = stale_reason(Path(step.run_dir), identity(overrides), inputs) if plan.skip_done else "always run"
    return overrides, inputs, reason


def _skip(step: Step) -> dict:
    print(f"[moeforge] step {step.name}: finished earlier, skipped", flush=True)
    return {**read_marker(Path(step.run_dir)), "skipped": True}


def _in_process(lc: LauncherConfig) -> bool:
    """The stage runs in this process: it has one process, or this is one srun task (one rank)."""
    return lc.world_size == 1 or (lc.mode == "srun" and "SLURM_PROCID" in os.environ)


def _execute(spec, name: str, overrides: list[str], lc: LauncherConfig, step_dir: Path) -> dict:
    """Run the stage here (one process, or this srun task's rank) or under torchrun / deepspeed;
    returns its summary."""
    if _in_process(lc):
        if lc.world_size > 1:
            os.environ.update(rank_env_from_slurm(lc))
            print(f"[moeforge] step {name}: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} "
                  f"(master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})", flush=True)
        return run_in_process(spec, overrides)
    runner = "deepspeed" if lc.name == "deepspeed" else "torchrun"
    argv = (deepspeed_argv if runner == "deepspeed" else torchrun_argv)(spec.module, overrides, lc)
    if subprocess.run(argv, env=job_env()).returncode != 0:
        raise MoeforgeError(f"step {name}: {runner} exited with an error; see {step_dir}")
    return read_summary(step_dir)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m launch.step <plan.json> <step>", file=sys.stderr)
        return 2
    try:
        run_step(Plan.load(args[0]), args[1])
    except MoeforgeError as e:
        print(f"moeforge: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
