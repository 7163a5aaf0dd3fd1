"""Build plans from the command line: one stage, or ``pipeline=<name>`` from configs/pipeline/."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from launch.compose import compose_stage, parse
from launch.launcher import launcher_config
from launch.plan import PLACEHOLDER, Plan, Step, order_steps
from launch.stages import StageSpec, get_stage
from launch.validate import check_input_path, validate_stage
from model.errors import ConfigError

ROOT = StageSpec("pipeline", "", "config", None)
STEP_FIELDS = {"name", "stage", "overrides", "input", "after"}
RESERVED = ("slurm", "report.txt")  # other entries of a pipeline's run directory


def plan_stage(stage: str, overrides: list[str]) -> Plan:
    """A one-step plan for ``moeforge <stage> [overrides]``; the config is checked here."""
    spec = get_stage(stage)
    own = with_stage_key(spec, [o for o in overrides if not _is_run_dir(o)])
    if spec.config_name != "config":  # the root config names its own run directories
        overrides = default_dirs(f"runs/{stage}", f"multirun/{stage}", overrides)
    cfg, run_dir = compose_stage(spec, with_stage_key(spec, overrides))
    validate_stage(spec, cfg)
    run_dir = run_dir.resolve()
    lc = launcher_config(cfg)
    step = Step(stage, stage, own, run_dir=str(run_dir), launcher=asdict(lc))
    return Plan(stage, str(run_dir), [step], launcher=lc.name, skip_done=False)


def plan_pipeline(name: str, overrides: list[str]) -> Plan:
    """The plan of configs/pipeline/<name>.yaml; every step's config is composed and checked here."""
    where = f"configs/pipeline/{name}.yaml"
    infra = [o for o in overrides if _top_key(o) in ("hydra", "launcher")]
    cfg, run_dir = compose_stage(ROOT, pipeline_overrides(name, infra))
    validate_stage(ROOT, cfg)
    run_dir = run_dir.resolve()
    raw = OmegaConf.to_container(cfg.pipeline, resolve=False) if cfg.get("pipeline") else None
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), list) or not raw["steps"]:
        raise ConfigError(f"{where}: steps", "must be a non-empty list of steps")
    common = raw.get("overrides") or []
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise ConfigError(f"{where}: overrides", "must be a list of strings")
    own_launcher = [o for o in common if _top_key(o) == "launcher"]
    if own_launcher:  # the pipeline's launcher settings (launcher.max_parallel, ...), the user's on top
        cfg, _ = compose_stage(ROOT, pipeline_overrides(name, own_launcher + infra))
    steps = order_steps([_step(i, s, where, run_dir) for i, s in enumerate(raw["steps"])], where)
    names = {s.name for s in steps}
    user = [o for o in overrides if not _is_run_dir(o)]
    used: set[str] = set()
    errors: dict[str, ConfigError] = {}
    for step in steps:
        spec = get_stage(step.stage, f"{where}: step {step.name}: stage")
        first = [o for o in common if _applies(o, spec)]  # the pipeline's, then the step's, then the user's
        step.overrides = with_stage_key(spec, first + step.overrides + user)
        if step.input and spec.input_key is None:
            raise ConfigError(f"{where}: step {step.name}: input", f"stage {step.stage} takes no input")
        _absolute_input(step, names)
        if step.input and step.input not in names:
            check_input_path(f"{where}: step {step.name}: input", step.input)
        step.launcher, dropped = _check_step(spec, step, run_dir, names, user)
        used |= {o for o in user if o not in dropped}
        errors = {**dropped, **errors}
    for o in user:  # a command-line override goes to the steps whose config has its key; some step must
        if o not in used:
            raise ConfigError(errors[o].key, f"unknown key in every step of {where}")
    lc = launcher_config(cfg)
    return Plan(name, str(run_dir), steps, launcher=lc.name, max_parallel=lc.max_parallel)


def pipeline_overrides(name: str, overrides: list[str]) -> list[str]:
    """Root-config overrides of a pipeline: its group, and by default the run directory runs/<name>
    (sweeps: multirun/<name>), so that running the same command again resumes it."""
    return [f"pipeline={name}", *default_dirs(f"runs/{name}", f"multirun/{name}", overrides, stamp=False)]


def default_dirs(run_top: str, sweep_top: str, overrides: list[str], stamp: bool = True) -> list[str]:
    """``overrides`` plus hydra.run.dir / hydra.sweep.dir under these folders (timestamped) unless given."""
    keys = {o.split("=", 1)[0] for o in overrides}
    leaf = "/${now:%Y%m%d-%H%M%S}" if stamp else ""
    extra = [f"{key}={top}{leaf}" for key, top in
             (("hydra.run.dir", run_top), ("hydra.sweep.dir", sweep_top)) if key not in keys]
    return extra + list(overrides)


def with_stage_key(spec: StageSpec, overrides: list[str]) -> list[str]:
    """Root-config stages get ``stage=<name>`` (the root config's ``stage`` key) unless one is given, and
    their own groups: ``domain=math`` becomes ``+domain=math``; a group not named gets its default option."""
    if spec.config_name != "config":
        return list(overrides)
    out = [f"+{o}" if o.split("=", 1)[0] in dict(spec.groups) else o for o in overrides]
    named = {o.split("=", 1)[0].lstrip("+") for o in out}
    out += [f"+{group}={option}" for group, option in spec.groups if option and group not in named]
    return out if "stage" in named else [f"stage={spec.name}", *out]


def _step(i: int, raw, where: str, run_dir: Path) -> Step:
    key = f"{where}: steps[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(key, "a step is a mapping with name, stage, overrides, input, after")
    for k in raw:
        if k not in STEP_FIELDS:
            raise ConfigError(f"{key}.{k}", f"unknown step field; known: {', '.join(sorted(STEP_FIELDS))}")
    for k in ("name", "stage"):
        if not isinstance(raw.get(k), str) or not raw[k]:
            raise ConfigError(f"{key}.{k}", "must be a non-empty string")
    for k in ("overrides", "after"):
        v = raw.get(k) or []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{key}.{k}", "must be a list of strings")
    if raw.get("input") is not None and not isinstance(raw["input"], str):
        raise ConfigError(f"{key}.input", "must be a step name or a checkpoint path")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", raw["name"]) or raw["name"] in RESERVED:
        raise ConfigError(f"{key}.name", f"{raw['name']!r}: use letters, digits, '_', '-', '.' "
                                         f"(and not {', '.join(RESERVED)})")
    get_stage(raw["stage"], f"{key}.stage")
    return Step(raw["name"], raw["stage"], list(raw.get("overrides") or []), raw.get("input"),
                list(raw.get("after") or []), str(run_dir / raw["name"]))


def _absolute_input(step: Step, names: set[str]) -> None:
    """An input that is a path, not a step, is made absolute (jobs may start elsewhere)."""
    if step.input and step.input not in names:
        step.input = str(Path(step.input).resolve())


def _check_step(spec: StageSpec, step: Step, run_dir: Path, names: set[str],
                optional: list[str]) -> tuple[dict, dict[str, ConfigError]]:
    """Validate the step's config; return its launcher settings and the ``optional`` (command-line)
    overrides taken out of it because its config has no such key (a key that some other step has)."""
    dropped: dict[str, ConfigError] = {}
    while True:
        try:
            return _check_step_once(spec, step, run_dir, names), dropped
        except ConfigError as e:
            unknown = [o for o in optional
                       if o in step.overrides and _not_in_config(parse([o])[0].key_or_group, e)]
            if not unknown:
                raise ConfigError(f"step {step.name}: {e.key}", str(e)[len(e.key) + 2:]) from e
            dropped[unknown[0]] = e
            step.overrides.remove(unknown[0])


def _not_in_config(key: str, e: ConfigError) -> bool:
    """The error says the config has no ``key``: it is unknown, or one of its parents is not a mapping."""
    return (e.key == key and "unknown key" in str(e)) or key.startswith(e.key + ".")


def _check_step_once(spec: StageSpec, step: Step, run_dir: Path, names: set[str]) -> dict:
    """Compose the step's config with stand-in paths for outputs of earlier steps, validate it, and
    return its launcher settings."""
    def stand_in_path(name: str) -> str:
        return str(run_dir / name / "checkpoint")

    stand_in = [PLACEHOLDER.sub(lambda m: stand_in_path(m.group(1)), o) for o in step.overrides]
    from_step = step.input in names
    if step.input and not from_step:
        stand_in.append(f"{spec.input_key}={step.input}")
    elif from_step and spec.config_name != "config":  # a required key of the stage's own config
        stand_in.append(f"{spec.input_key}={stand_in_path(step.input)}")
    stand_in.append(f"hydra.run.dir={step.run_dir}")
    cfg, _ = compose_stage(spec, stand_in)
    validate_stage(spec, cfg, check_input=not from_step)  # outputs are checked when the step starts
    return asdict(launcher_config(cfg))


def _applies(override: str, spec: StageSpec) -> bool:
    """The pipeline's own overrides go to every step of the root config; launcher ones to every step."""
    if _is_run_dir(override):
        return False
    key = parse([override])[0].key_or_group
    return spec.config_name == "config" or key.split(".")[0] == "launcher" or key.startswith("hydra.")


def _top_key(override: str) -> str:
    return parse([override])[0].key_or_group.split(".")[0]


def _is_run_dir(override: str) -> bool:
    return override.split("=", 1)[0].lstrip("+~") == "hydra.run.dir"
