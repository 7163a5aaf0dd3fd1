"""Hydra multirun sweeps: ``a=1,2 b=x,y`` -> one override list per point of the grid."""

from __future__ import annotations

import itertools

from launch.compose import parse


def expand(overrides: list[str]) -> list[list[str]]:
    """The cartesian product of every sweep override (``a=1,2``, ``range(...)``, ``choice(...)``)."""
    axes: list[list[str]] = []
    for o in parse(overrides):
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(point) for point in itertools.product(*axes)]


def has_sweep(overrides: list[str]) -> bool:
    return any(o.is_sweep_override() for o in parse(overrides))
