"""Task records (docs/interfaces.md) and the deterministic, held-out-disjoint sampling of generated tasks."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from data.split import check_split, split_of
from model.errors import MoeforgeError

STALE_DRAWS = 3000  # draws without a new task after which the task space counts as exhausted
FIELDS = ("id", "domain", "prompt", "answer", "tests", "entry_point", "solution")


@dataclass(frozen=True)
class Draft:
    """One generated task before sampling: `split_key` decides its split, `key` identifies it."""

    key: str
    split_key: str
    prompt: str
    answer: str
    solution: str
    tests: str = ""
    entry_point: str = ""


def make_record(domain: str, d: Draft) -> dict:
    """The task record of a draft; the id is a hash of the domain and key."""
    rid = hashlib.sha256(f"{domain}|{d.key}".encode()).hexdigest()[:12]
    return {"id": f"{domain}-{rid}", "domain": domain, "prompt": d.prompt, "answer": d.answer,
            "tests": d.tests, "entry_point": d.entry_point, "solution": d.solution}


def sample(domain: str, draw: Callable[[random.Random], Draft], split: str, n: int, seed: int,
           val_fraction: float) -> list[dict]:
    """`n` distinct tasks of `split`, drawn with a `seed`ed RNG; a task's split depends on its `split_key`
    only, so train and val never share one, whatever the seeds."""
    check_split(split)
    rng = random.Random(f"{domain}|{seed}")
    seen: set[str] = set()
    out: list[dict] = []
    misses = 0
    while len(out) < n and misses < STALE_DRAWS:
        d = draw(rng)
        misses += 1
        if d.key in seen or split_of(f"{domain}|{d.split_key}", val_fraction) != split:
            continue
        seen.add(d.key)
        out.append(make_record(domain, d))
        misses = 0
    if len(out) < n:
        raise MoeforgeError(f"domain: only {len(out)} distinct {domain} tasks of split {split!r} found at "
                            f"this difficulty; ask for fewer than {n} or raise the difficulty")
    return out
