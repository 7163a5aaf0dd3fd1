"""`GRPOConfig`: the validated `grpo` config group (configs/grpo/default.yaml).

The tasks come from the `domain` group (train.sft.DomainConfig); the loop length, seed, evaluation and
checkpoint cadence are the shared `trainer.*` / `checkpoint.*` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import ConfigError
from rl.grpo_loss import AGG_MODES, GRPOLossConfig


@dataclass
class GRPOConfig:
    """One GRPO step: `prompts_per_step` prompts x `group_size` samples, then `epochs` optimizer steps."""

    group_size: int = 8  # G samples per prompt
    prompts_per_step: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    beta: float = 0.0  # k3 KL to the frozen reference (the init checkpoint); 0 = no reference model
    loss_agg: str = "token_mean"  # token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_sum_const (Dr. GRPO)
    scale_by_std: bool = True  # False = Dr. GRPO advantages (centred only)
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal, refill with new prompts
    max_refill_rounds: int = 2  # extra rollout rounds per step while fewer than prompts_per_step groups
    epochs: int = 1  # optimizer steps per rollout batch (importance ratios vs the rollout log-probs)
    micro_batch: int = 32  # sequences per forward/backward (gradient accumulation inside an epoch)
    router_replay: bool = False  # training passes reuse the rollout's expert choices
    format_reward: float = 0.0  # added to the reward when the response is well formatted
    lr: float | None = None  # null = optim.lr
    warmup_steps: int = 0
    eval_batch: int = 64  # held-out sequences per generation batch
    eval_temperature: float = 0.0  # held-out decoding: 0 = greedy, > 0 = sampled (mean over eval_samples)
    eval_samples: int = 1  # responses per held-out task when sampling (1 when greedy)
    use_cache: bool = True  # decode with the model's KV cache (False = recompute every step, the reference)

    def validate(self) -> GRPOConfig:
        for key, low in (("group_size", 2), ("prompts_per_step", 1), ("max_new_tokens", 1), ("epochs", 1),
                         ("micro_batch", 1), ("warmup_steps", 0), ("eval_batch", 1),
                         ("max_refill_rounds", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"grpo.{key}", f"must be >= {low}, got {getattr(self, key)}")
        if self.eval_temperature < 0:
            raise ConfigError("grpo.eval_temperature",
                              f"must be >= 0 (0 = greedy), got {self.eval_temperature}")
        if self.eval_samples < 1 or (self.eval_temperature == 0 and self.eval_samples != 1):
            raise ConfigError("grpo.eval_samples", "must be >= 1, and 1 when eval_temperature is 0 (greedy); "
                                                   f"got {self.eval_samples}")
        if self.temperature <= 0:
            raise ConfigError("grpo.temperature", f"must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("grpo.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.loss_agg not in AGG_MODES:
            raise ConfigError("grpo.loss_agg", f"{self.loss_agg!r} is not one of {AGG_MODES}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("grpo.lr", f"must be > 0 or null, got {self.lr}")
        self.loss_config()
        return self

    def loss_config(self) -> GRPOLossConfig:
        return GRPOLossConfig(clip_low=self.clip_low, clip_high=self.clip_high, beta=self.beta,
                              loss_agg=self.loss_agg, max_len=self.max_new_tokens).validate()
