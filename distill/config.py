"""`DistillConfig`: the validated `distill` config group (configs/distill/default.yaml).

The student and the teachers are the top-level keys `student=<ckpt>` (else `init`, a pipeline's hand-off)
and `teachers.<domain>=<ckpt>`; loop length, seed and evaluation cadence are the shared `trainer.*` keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.losses import KINDS, DistillLossConfig
from model.errors import ConfigError

SAMPLED = "sampled"  # the sampled-token estimator: per-token log-ratio as a reward (for comparison)
ALL_KINDS = (*KINDS, SAMPLED)


@dataclass
class DistillConfig:
    """One step: `prompts_per_domain` prompts of every teacher's domain (`domain_prompts` overrides it per
    domain), `samples_per_prompt` student samples each, scored position by position by that domain's
    teacher."""

    kind: str = "reverse_kl"  # reverse_kl (V4) | forward_kl | jsd | sampled
    beta: float = 0.5  # JSD(beta) mixture weight
    temperature: float = 1.0  # of both distributions inside the divergence
    reduction: str = "token"  # token: mean over all tokens | sequence: per sequence, then over sequences
    chunk_rows: int = 256  # response positions per teacher-logit block
    chunk_vocab: int = 8192  # vocabulary entries per block: [chunk_rows, chunk_vocab] teacher logits at once
    weights: dict[str, float] = field(default_factory=dict)  # per teacher (domain); missing = 1.0
    prompts_per_domain: int = 8
    domain_prompts: dict[str, int] = field(default_factory=dict)  # per domain; missing = prompts_per_domain
    samples_per_prompt: int = 1
    max_new_tokens: int = 48
    sample_temperature: float = 1.0  # the student's sampling temperature (1.0 = its own distribution)
    top_p: float = 1.0
    micro_batch: int = 64  # sequences per forward/backward (gradient accumulation inside a step)
    use_cache: bool = True  # sample with the model's decode cache (false = recompute, the reference)
    teacher_device: str = "same"  # same (the student's device) | cpu | cuda | cuda:N
    teacher_ranks: list[int] = field(default_factory=list)  # torchrun ranks hosting the teachers ([]: local)
    n_train: int = 2000  # training prompts per domain
    n_val: int = 64  # held-out prompts per domain (scored greedily)
    task_seed: int = 0
    eval_batch: int = 64
    system: str | None = None  # optional system message before every prompt
    domain_options: dict[str, Any] = field(default_factory=dict)  # per domain, to data.tasks.load_tasks

    def validate(self) -> DistillConfig:
        if self.kind not in ALL_KINDS:
            raise ConfigError("distill.kind", f"{self.kind!r} is not one of {ALL_KINDS}")
        for key, low in (("prompts_per_domain", 1), ("samples_per_prompt", 1), ("max_new_tokens", 1),
                         ("micro_batch", 1), ("n_train", 1), ("n_val", 1), ("eval_batch", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"distill.{key}", f"must be >= {low}, got {getattr(self, key)}")
        if self.sample_temperature <= 0:
            raise ConfigError("distill.sample_temperature", f"must be > 0 (on-policy sampling), "
                                                            f"got {self.sample_temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("distill.top_p", f"must be in (0, 1], got {self.top_p}")
        for name, w in self.weights.items():
            if not w >= 0:
                raise ConfigError(f"distill.weights.{name}", f"must be >= 0, got {w}")
        for name, n in self.domain_prompts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"distill.domain_prompts.{name}", f"must be an integer >= 1, got {n!r}")
        for name, opts in self.domain_options.items():
            if not isinstance(opts, dict):
                raise ConfigError(f"distill.domain_options.{name}", f"must be a mapping, got {opts!r}")
        dev = self.teacher_device
        if not (dev in ("same", "cpu", "cuda") or dev.startswith("cuda:")):
            raise ConfigError("distill.teacher_device", f"must be same, cpu, cuda or cuda:N, got {dev!r}")
        ranks = list(self.teacher_ranks)
        bad = any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks)
        if bad or len(set(ranks)) < len(ranks):
            raise ConfigError("distill.teacher_ranks", f"must be distinct ranks >= 0, got {ranks}")
        self.loss_config()
        return self

    def loss_config(self) -> DistillLossConfig:
        """The full-vocabulary divergence settings; with kind `sampled`, those of the reverse KL that is
        reported beside the estimator's loss."""
        kind = "reverse_kl" if self.kind == SAMPLED else self.kind
        return DistillLossConfig(kind=kind, beta=self.beta, temperature=self.temperature,
                                 reduction=self.reduction, chunk_rows=self.chunk_rows,
                                 chunk_vocab=self.chunk_vocab).validate()

    def weight(self, domain: str) -> float:
        return float(self.weights.get(domain, 1.0))

    def prompts(self, domain: str) -> int:
        """Prompts of `domain` per step."""
        return int(self.domain_prompts.get(domain, self.prompts_per_domain))
