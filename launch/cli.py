"""``moeforge <stage> [overrides]``, ``moeforge pipeline=<name> [overrides]``, ``moeforge -m ...`` sweeps."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from launch.compose import CONFIG_DIR, compose_stage, sweep_dir
from launch.local import run_local
from launch.plan import Plan
from launch.planner import ROOT, default_dirs, pipeline_overrides, plan_pipeline, plan_stage, with_stage_key
from launch.report import format_report
from launch.slurm import run_slurm
from launch.stages import STAGES, get_stage
from launch.sweep import expand
from model.errors import MoeforgeError

USAGE = """usage: moeforge [-m|--multirun] [--cfg] <stage> [key=value ...]
       moeforge [-m|--multirun] [--cfg] pipeline=<name> [key=value ...]

stages:    {stages}
pipelines: {pipelines}
Overrides are Hydra's (group=option, group.key=value, hydra.run.dir=<dir>); --multirun sweeps a=1,2 grids,
each point in its own run directory; --cfg prints the composed config and exits."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point; user errors print one line naming the key and exit with status 2."""
    try:
        code = run_cli(sys.argv[1:] if argv is None else list(argv))
    except MoeforgeError as e:
        print(f"moeforge: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("moeforge: interrupted (SLURM jobs keep running: squeue); run the same command again with the "
              "same hydra.run.dir to resume (finished steps are skipped)", file=sys.stderr)
        code = 130
    sys.exit(code)


def run_cli(args: list[str]) -> int:
    flags = {a for a in args if a.startswith("-")}
    words = [a for a in args if not a.startswith("-")]
    if flags & {"-h", "--help"} or not words:
        pipelines = sorted(p.stem for p in (CONFIG_DIR / "pipeline").glob("*.yaml"))
        print(USAGE.format(stages=", ".join(STAGES), pipelines=", ".join(pipelines)))
        return 0 if words or flags else 2
    unknown = flags - {"-m", "--multirun", "--cfg"}
    if unknown:
        raise MoeforgeError(f"unknown option {sorted(unknown)[0]}; see moeforge --help")
    started = time.time()
    stage, pipeline, overrides = _target(words)
    if "--cfg" in flags:
        if pipeline:
            cfg = compose_stage(ROOT, pipeline_overrides(pipeline, overrides))[0]
        else:
            cfg = compose_stage(get_stage(stage), with_stage_key(get_stage(stage), overrides))[0]
        print(OmegaConf.to_yaml(cfg))
        return 0
    points = [overrides]
    if flags & {"-m", "--multirun"}:
        points = expand(overrides)
        base = _sweep_base(stage, pipeline, points[0])
        points = [p + [f"hydra.run.dir={base / str(i)}"] for i, p in enumerate(points)]
    # every point is planned (composed and validated) before anything starts
    plans = [plan_pipeline(pipeline, p) if pipeline else plan_stage(stage, p) for p in points]
    return execute(plans, started)


def execute(plans: list[Plan], started: float | None = None) -> int:
    """Run the plans locally one after another, or submit them all to SLURM and follow the jobs;
    ``started``: when the command began (its planning counts in the first local plan's time)."""
    if plans[0].launcher != "slurm":
        since = started or time.time()
        for plan in plans:
            run_local(plan)
            if len(plan.steps) > 1:
                print(format_report(plan, time.time() - since), end="", flush=True)
            since = time.time()
        return 0
    return run_slurm(plans)


def _sweep_base(stage: str | None, pipeline: str | None, overrides: list[str]) -> Path:
    """``hydra.sweep.dir``: the parent of the sweep points' run directories."""
    if pipeline:
        return sweep_dir(ROOT, pipeline_overrides(pipeline, overrides)).resolve()
    spec = get_stage(stage)
    if spec.config_name != "config":
        overrides = default_dirs(f"runs/{stage}", f"multirun/{stage}", overrides)
    return sweep_dir(spec, overrides).resolve()


def _target(words: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(stage, pipeline, overrides) from the positional words."""
    pipes = [w for w in words if w.startswith("pipeline=")]
    if pipes:
        if len(pipes) > 1 or "=" not in words[0]:
            raise MoeforgeError("pipeline: give either one stage or one pipeline=<name>")
        return None, pipes[0].split("=", 1)[1], [w for w in words if w not in pipes]
    if "=" in words[0]:
        raise MoeforgeError(f"stage: the first word must be a stage ({', '.join(STAGES)}) or pipeline=<name>")
    return words[0], None, words[1:]


if __name__ == "__main__":
    main()
