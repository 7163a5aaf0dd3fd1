"""A plan: the ordered steps of a pipeline (or of one stage), each with its stage, overrides and input."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.errors import ConfigError

PLACEHOLDER = re.compile(r"\{ckpt:([A-Za-z0-9_.-]+)\}")  # {ckpt:<step>} = that step's output checkpoint
PLAN_FILE = "plan.json"


@dataclass
class Step:
    name: str
    stage: str
    overrides: list[str] = field(default_factory=list)
    input: str | None = None  # a step name (its output checkpoint) or a checkpoint path
    after: list[str] = field(default_factory=list)  # more steps that must finish first
    run_dir: str = ""
    launcher: dict = field(default_factory=dict)  # this step's LauncherConfig fields

    def needs(self, names: set[str]) -> list[str]:
        """The steps this one waits for: its input step, ``after`` and every ``{ckpt:<step>}``."""
        refs = list(self.after) + [m for o in self.overrides for m in PLACEHOLDER.findall(o)]
        if self.input in names:
            refs.insert(0, self.input)
        return list(dict.fromkeys(refs))


@dataclass
class Plan:
    name: str
    run_dir: str
    steps: list[Step]
    launcher: str = "local"  # local | torchrun | slurm
    max_parallel: int = 1  # local: independent steps run at once
    skip_done: bool = True  # pipelines skip finished steps; a single stage always runs

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise ConfigError("step", f"no step {name!r} in {self.name}; steps: {[s.name for s in self.steps]}")

    def deps(self, step: Step) -> list[str]:
        return step.needs({s.name for s in self.steps})

    @property
    def state_dir(self) -> Path:
        return Path(self.run_dir) / ".moeforge"

    def save(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / PLAN_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @staticmethod
    def load(path: str | Path) -> Plan:
        raw = json.loads(Path(path).read_text())
        return Plan(**{**raw, "steps": [Step(**s) for s in raw["steps"]]})


def order_steps(steps: list[Step], where: str) -> list[Step]:
    """Steps in an order where every step follows the steps it needs; errors name the bad field."""
    names = [s.name for s in steps]
    for i, s in enumerate(steps):
        if s.name in names[:i]:
            raise ConfigError(f"{where}.steps[{i}].name", f"step name {s.name!r} is used twice")
    known = set(names)
    for i, s in enumerate(steps):
        for ref in s.needs(known):
            if ref not in known:
                raise ConfigError(f"{where}.steps[{i}]", f"step {s.name!r} needs unknown step {ref!r}")
    done: list[Step] = []
    left = list(steps)
    while left:
        ready = [s for s in left if all(d in {x.name for x in done} for d in s.needs(known))]
        if not ready:
            cycle = [s.name for s in left]
            raise ConfigError(f"{where}.steps", f"steps {cycle} depend on each other in a cycle")
        done += ready
        left = [s for s in left if s not in ready]
    return done
