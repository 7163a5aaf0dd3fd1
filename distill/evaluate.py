"""Held-out scores of the distillation stage: greedy accuracy of a model on every domain's val tasks, and the
teachers' score matrix (every teacher on every domain; computed where the teachers live), cached in the run
directory for resumed runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from distill.config import DistillConfig
from model.errors import ConfigError

TEACHER_SCORES = "teacher_scores.json"


def check_cache_support(model, cfg: DistillConfig) -> None:
    if cfg.use_cache and not hasattr(model, "new_cache"):
        raise ConfigError("distill.use_cache", "this model has no decode cache (Transformer.new_cache); "
                          "set it to false to sample by recomputation")


def domain_scores(model, tok, val: dict[str, list[dict]], cfg: DistillConfig) -> dict[str, dict]:
    """{domain: {"accuracy", "format_rate", "n"}} of greedy responses to the held-out tasks."""
    from rl.rollout import evaluate_tasks

    check_cache_support(model, cfg)
    return {d: evaluate_tasks(model, tok, tasks, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch,
                              system=cfg.system, use_cache=cfg.use_cache)
            for d, tasks in val.items()}


def local_teacher_scores(teachers: dict, tok, val: dict[str, list[dict]],
                         cfg: DistillConfig) -> dict[str, dict[str, float]]:
    """{teacher: {domain: accuracy}} of teachers loaded in this process (`Teacher` objects)."""
    return {n: {d: r["accuracy"] for d, r in domain_scores(t.model, tok, val, cfg).items()}
            for n, t in teachers.items()}


def teacher_scores(paths: dict[str, Path], val: dict[str, list[dict]], cfg: DistillConfig, run_dir: Path,
                   compute: Callable[[], dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{teacher: {domain: accuracy}}; read from the run's cache when it was computed for these teachers
    (checkpoint `paths`) and these held-out sets, else `compute()`d and cached."""
    path = Path(run_dir) / TEACHER_SCORES
    key = {"teachers": {n: str(p) for n, p in paths.items()},
           "val": {d: [t["id"] for t in tasks] for d, tasks in val.items()},
           "max_new_tokens": cfg.max_new_tokens, "system": cfg.system}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["scores"]
    scores = compute()
    path.write_text(json.dumps({"key": key, "scores": scores}, indent=1))
    return scores
