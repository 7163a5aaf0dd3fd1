"""LR schedules: warmup-stable-decay (V4) and cosine with warmup; both end at lr * min_lr_ratio.

Step s is 0-based. Warmup: factor (s+1)/warmup for s < warmup. WSD decays over the last
round(decay_fraction * total) steps, reaching min_lr_ratio at s = total - 1 and staying there after.
Cosine decays from the end of warmup to s = total - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.errors import ConfigError


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "wsd"  # wsd | cosine
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1
    decay_shape: str = "cosine"  # wsd only: linear | cosine

    def __post_init__(self):
        if self.total_steps < 1:
            raise ConfigError("trainer.max_steps", f"the LR schedule needs >= 1 step, got {self.total_steps}")
        if self.warmup_steps > self.total_steps:
            raise ConfigError("optim.warmup_steps", f"{self.warmup_steps} > the {self.total_steps} steps")
        if self.kind not in ("wsd", "cosine"):
            raise ConfigError("optim.schedule", f"must be wsd or cosine, got {self.kind!r}")
        if self.decay_shape not in ("linear", "cosine"):
            raise ConfigError("optim.decay_shape", f"must be linear or cosine, got {self.decay_shape!r}")

    @property
    def decay_start(self) -> int:
        """First step whose LR is below the peak because of decay."""
        if self.kind == "cosine":
            return self.warmup_steps
        n_decay = round(self.decay_fraction * self.total_steps)
        return max(self.warmup_steps, self.total_steps - n_decay)

    def factor(self, step: int) -> float:
        """LR / peak LR at `step`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start, last = self.decay_start, self.total_steps - 1
        if step < start:
            return 1.0
        if last <= start:
            return self.min_lr_ratio if start < self.total_steps else 1.0
        progress = min(1.0, (step - start) / (last - start))
        shape = self.decay_shape if self.kind == "wsd" else "cosine"
        frac = 1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * frac

    def lr_at(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def in_decay(self, step: int) -> bool:
        """True once LR decay has started (the MTP loss weight drops from 0.3 to 0.1 here)."""
        return step >= self.decay_start and self.decay_start < self.total_steps


def build_schedule(cfg, total_steps: int) -> LRSchedule:
    """The schedule of an OptimConfig for a run of `total_steps` (trainer.max_steps) steps."""
    return LRSchedule(
        peak_lr=cfg.lr,
        total_steps=total_steps,
        warmup_steps=cfg.warmup_steps,
        kind=cfg.schedule,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_fraction=cfg.decay_fraction,
        decay_shape=cfg.decay_shape,
    )
