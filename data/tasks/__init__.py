"""Post-training task domains: generated `math` and `code` tasks, or any dataset with prompt/answer columns.

Records follow docs/interfaces.md: `{"id", "domain", "prompt", "answer", "tests", "entry_point",
"solution"}`. Every domain has a deterministic held-out split ('val') disjoint from 'train'.
"""

from __future__ import annotations

from data.tasks.code import code_tasks
from data.tasks.dataset import dataset_tasks
from data.tasks.math import math_tasks
from model.errors import ConfigError

GENERATED = {"math": math_tasks, "code": code_tasks}


def load_tasks(domain: str, split: str, n: int | None = None, seed: int = 0, **options) -> list[dict]:
    """Task records of `domain` and `split` ('train'|'val').

    `math`/`code`: `n` generated tasks (options: `difficulty` for math, `val_fraction`). Any other
    domain name reads a dataset: options `path`, `prompt_field`, `answer_field` and those of
    `dataset_tasks` (then `n` caps the count and `seed` is unused: rows keep the dataset's order).
    """
    if domain in GENERATED:
        if n is None:
            raise ConfigError("domain.n", f"the number of generated {domain} tasks is required")
        return GENERATED[domain](split, n, seed, **options)
    missing = [k for k in ("path", "prompt_field", "answer_field") if not options.get(k)]
    if missing:
        raise ConfigError(f"domain.{missing[0]}", f"a dataset domain {domain!r} needs {', '.join(missing)}")
    return dataset_tasks(domain=domain, split=split, n=n, **options)


__all__ = ["code_tasks", "dataset_tasks", "load_tasks", "math_tasks"]
