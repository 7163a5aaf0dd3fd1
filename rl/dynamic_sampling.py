"""DAPO dynamic sampling with refill: collect informative groups over several rollout rounds.

A group whose G rewards are all equal has zero advantage everywhere and gives no gradient. With dynamic
sampling the step drops such groups and, while the batch has fewer than `n_groups` informative groups,
samples more prompts (a refill round), up to `max_refill_rounds` extra rounds. A refill round asks for as
many prompts as the missing groups need at the informative rate seen so far (at most `n_groups`, a whole
batch when nothing was informative yet). The batch keeps the first `n_groups` informative groups in
sampling order (DAPO truncates the same way). Advantages are computed within each group, so groups from
different rounds mix freely.
"""

from __future__ import annotations

import math

import torch

from model.errors import ConfigError
from rl.grpo_loss import dynamic_sampling_keep, group_advantages
from rl.rollout import Rollout, concat_rollouts


class GroupCollector:
    """Accumulates rollout rounds (`add`) until `full`; `batch()` gives the training rows and advantages."""

    def __init__(self, n_groups: int, group_size: int, *, drop_equal: bool = True, scale_by_std: bool = True):
        if n_groups < 1:
            raise ConfigError("grpo.prompts_per_step", f"must be >= 1, got {n_groups}")
        self.n_groups, self.group_size = n_groups, group_size
        self.drop_equal, self.scale_by_std = drop_equal, scale_by_std
        self.parts: list[Rollout] = []
        self.advantages: list[torch.Tensor] = []
        self.groups = self.dropped = self.refilled = self.rounds = self.sampled = 0

    @property
    def full(self) -> bool:
        return self.groups >= self.n_groups

    def next_round_size(self) -> int:
        """Prompts for the next round: `n_groups` first, then what the missing groups need (0 when full)."""
        informative = self.sampled - self.dropped
        if not informative:
            return self.n_groups
        missing = max(self.n_groups - self.groups, 0)
        return min(self.n_groups, math.ceil(missing * self.sampled / informative))

    def add(self, roll: Rollout, rewards_B: torch.Tensor) -> int:
        """Fold in one round (groups of `group_size` contiguous rows); return how many groups it added."""
        g = self.group_size
        adv = group_advantages(rewards_B, g, scale_by_std=self.scale_by_std)
        keep = (dynamic_sampling_keep(rewards_B, g) if self.drop_equal
                else torch.ones_like(rewards_B, dtype=torch.bool)).view(-1, g)[:, 0]
        n_all = keep.numel()
        self.sampled += n_all
        self.dropped += int((~keep).sum())
        groups = keep.nonzero().squeeze(1)[: max(self.n_groups - self.groups, 0)]
        if groups.numel():
            rows = (groups[:, None] * g + torch.arange(g)).reshape(-1)
            self.parts.append(roll.select(rows.to(roll.tokens.device)))
            self.advantages.append(adv[rows])
        if self.rounds:
            self.refilled += groups.numel()
        self.rounds += 1
        self.groups += groups.numel()
        return groups.numel()

    def batch(self) -> tuple[Rollout | None, torch.Tensor | None]:
        """The kept rows of every round in order and their advantages (None, None when nothing was kept)."""
        if not self.parts:
            return None, None
        return concat_rollouts(self.parts), torch.cat(self.advantages)

    def stats(self) -> dict[str, int]:
        return {"sampling_rounds": self.rounds, "groups_sampled": self.sampled,
                "groups_dropped": self.dropped, "groups_refilled": self.refilled,
                "groups_trained": self.groups}
