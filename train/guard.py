"""Loss-spike / NaN guard: judge each step before the optimizer applies it."""

from __future__ import annotations

import math
from enum import Enum


class Verdict(Enum):
    OK = "ok"
    SKIP = "skip"  # do not apply this step's update
    ROLLBACK = "rollback"  # too many bad steps in a row: reload the last checkpoint


class SpikeGuard:
    """A step is bad when its loss or grad norm is not finite, or (after `warmup_steps` good steps) its loss
    exceeds `factor` x the running mean (EMA) of good losses. `max_bad_steps` bad steps in a row roll back."""

    def __init__(self, factor: float, ema_beta: float, warmup_steps: int, max_bad_steps: int,
                 enabled: bool = True):
        self.factor, self.beta, self.warmup, self.max_bad = factor, ema_beta, warmup_steps, max_bad_steps
        self.enabled = enabled
        self.ema: float | None = None
        self.good = 0
        self.bad_in_row = 0

    def is_bad(self, loss: float, grad_norm: float) -> bool:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True
        return self.good >= self.warmup and self.ema is not None and loss > self.factor * self.ema

    def check(self, loss: float, grad_norm: float) -> Verdict:
        """Judge one step and update the running statistics."""
        if not self.enabled:
            return Verdict.OK
        if self.is_bad(loss, grad_norm):
            self.bad_in_row += 1
            return Verdict.ROLLBACK if self.bad_in_row >= self.max_bad else Verdict.SKIP
        self.bad_in_row = 0
        self.good += 1
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        return Verdict.OK

    def state_dict(self) -> dict:
        return {"ema": self.ema, "good": self.good, "bad_in_row": self.bad_in_row}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.good, self.bad_in_row = state["ema"], state["good"], state["bad_in_row"]
