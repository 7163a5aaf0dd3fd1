"""The prompts of the distillation stage: every teacher's domain, a fixed number per step, resumable.

Each domain's training tasks are visited in a seeded order that is reshuffled every pass, so the batch of
step k depends only on (seed, k): the position (`state_dict()`) is the number of steps drawn.
"""

from __future__ import annotations

import random

from distill.config import DistillConfig
from model.errors import ConfigError


def domain_tasks(cfg: DistillConfig, domain: str, split: str) -> list[dict]:
    """Task records of `domain` ('train' or 'val' split) with the stage's counts, seed and options."""
    from data.tasks import load_tasks

    n = cfg.n_train if split == "train" else cfg.n_val
    tasks = load_tasks(domain, split, n, cfg.task_seed, **cfg.domain_options.get(domain, {}))
    if not tasks:
        raise ConfigError(f"teachers.{domain}", f"domain {domain!r} has no {split} tasks")
    return tasks


class PromptSampler:
    """`next_batch()`: `per_domain` training tasks of each domain (one count for all, or domain -> count),
    grouped by domain (sorted by domain name, so one teacher at a time scores its rows)."""

    def __init__(self, pools: dict[str, list[dict]], per_domain: int | dict[str, int], seed: int):
        self.pools = {d: pools[d] for d in sorted(pools)}
        counts = per_domain if isinstance(per_domain, dict) else dict.fromkeys(self.pools, per_domain)
        self.per_domain = {d: int(counts[d]) for d in self.pools}
        self.seed, self.steps = seed, 0
        self._orders: dict[str, tuple[int, list[int]]] = {}  # domain -> (pass, its order)

    def _order(self, domain: str, epoch: int) -> list[int]:
        if self._orders.get(domain, (None,))[0] != epoch:
            order = list(range(len(self.pools[domain])))
            random.Random(f"{self.seed}|{domain}|{epoch}").shuffle(order)
            self._orders[domain] = (epoch, order)
        return self._orders[domain][1]

    def batch_at(self, step: int) -> list[dict]:
        """The tasks of step `step` (0-based)."""
        out = []
        for domain, pool in self.pools.items():
            n, k = len(pool), self.per_domain[domain]
            for i in range(step * k, (step + 1) * k):
                out.append(pool[self._order(domain, i // n)[i % n]])
        return out

    def next_batch(self) -> list[dict]:
        batch = self.batch_at(self.steps)
        self.steps += 1
        return batch

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
