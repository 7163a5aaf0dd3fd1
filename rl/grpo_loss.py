"""GRPO losses (training-algorithms §6): group advantages, the clipped surrogate, k3 KL, aggregation modes.

Shapes: ``[B, T]`` per-token tensors over B = n_prompts * G sampled responses (groups contiguous), with a
response mask (1 = a generated token that takes loss). Log-probabilities are of the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.errors import ConfigError, MoeforgeError

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_sum_const")


@dataclass(frozen=True)
class GRPOLossConfig:
    """``token_mean`` = DAPO (all tokens of the batch), ``seq_mean_token_mean`` = original GRPO,
    ``seq_sum_const`` = Dr. GRPO (sum / (num_sequences * max_len); ``max_len`` None = the batch's T)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    beta: float = 0.0
    loss_agg: str = "token_mean"
    max_len: int | None = None

    def validate(self) -> GRPOLossConfig:
        if not 0 < self.clip_low < 1:
            raise ConfigError("grpo.clip_low", f"must be in (0, 1), got {self.clip_low}")
        if not self.clip_high > 0:
            raise ConfigError("grpo.clip_high", f"must be > 0, got {self.clip_high}")
        if self.beta < 0:
            raise ConfigError("grpo.beta", f"must be >= 0, got {self.beta}")
        if self.loss_agg not in AGG_MODES:
            raise ConfigError("grpo.loss_agg", f"{self.loss_agg!r} is not one of {AGG_MODES}")
        if self.max_len is not None and self.max_len <= 0:
            raise ConfigError("grpo.max_len", f"must be > 0, got {self.max_len}")
        return self


def group_advantages(
    rewards_B: torch.Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """``(r - mean_group(r)) / (std_group(r) + eps)``; Dr. GRPO: ``scale_by_std=False`` (only centring).

    The std is the unbiased (Bessel-corrected) one over the G samples of a group, as in TRL and verl.
    """
    if group_size < 1 or rewards_B.numel() % group_size:
        n = rewards_B.numel()
        raise ConfigError("grpo.group_size", f"{n} rewards do not split into groups of {group_size}")
    r = rewards_B.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.view(-1)


def dynamic_sampling_keep(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: bool [B], False for every sample of a group whose rewards are all equal."""
    if group_size < 1 or rewards_B.numel() % group_size:
        raise ConfigError("grpo.group_size", f"{rewards_B.numel()} rewards, group size {group_size}")
    r = rewards_B.view(-1, group_size)
    varied = (r != r[:, :1]).any(dim=1)
    return varied.repeat_interleave(group_size)


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = ref_logp_BT - logp_BT
    return torch.exp(d) - d - 1


def aggregate(values_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, max_len: int | None = None):
    """Reduce per-token values to a scalar over the masked tokens with one of ``AGG_MODES``."""
    m = mask_BT.to(values_BT.dtype)
    total = (values_BT * m).sum()
    if mode == "token_mean":
        return total / m.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        return ((values_BT * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if mode == "seq_sum_const":
        return total / (values_BT.shape[0] * (max_len or values_BT.shape[1]))
    raise ConfigError("grpo.loss_agg", f"{mode!r} is not one of {AGG_MODES}")


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


def grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: GRPOLossConfig | None = None,
    *,
    ref_logp_BT: torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio GRPO loss (to minimise) and detached metrics.

    ``old_logp_BT`` are the rollout log-probs (fixed across the epochs over one batch); ``advantages`` is
    [B] (one per response) or [B, T] (per token). ``ref_logp_BT`` is needed only when ``cfg.beta > 0``.
    """
    cfg = (cfg or GRPOLossConfig()).validate()
    if cfg.beta > 0 and ref_logp_BT is None:
        raise MoeforgeError("grpo.beta > 0 needs the reference model's log-probs (ref_logp_BT)")
    m = mask_BT.to(logp_BT.dtype)
    adv = advantages.to(logp_BT.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    ratio = torch.exp((logp_BT - old_logp_BT.detach()).clamp(-20.0, 20.0))
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    metrics = {"pg_loss": aggregate(per_token, m, cfg.loss_agg, cfg.max_len).detach()}
    if cfg.beta > 0:
        kl = k3_kl(logp_BT, ref_logp_BT.detach())
        per_token = per_token + cfg.beta * kl
        metrics["kl_ref"] = _masked_mean(kl.detach(), m)
    loss = aggregate(per_token, m, cfg.loss_agg, cfg.max_len)
    with torch.no_grad():
        r = ratio.detach()
        metrics["clip_frac_low"] = _masked_mean(((r < 1 - cfg.clip_low) & (adv < 0)).to(m.dtype), m)
        metrics["clip_frac_high"] = _masked_mean(((r > 1 + cfg.clip_high) & (adv > 0)).to(m.dtype), m)
        metrics["approx_kl_old"] = _masked_mean(k3_kl(logp_BT.detach(), old_logp_BT.detach()), m)
        on = m > 0
        metrics["ratio_mean"] = _masked_mean(r, m)
        metrics["ratio_max"] = r[on].max() if on.any() else r.new_tensor(1.0)
        metrics["ratio_min"] = r[on].min() if on.any() else r.new_tensor(1.0)
        if entropy_BT is not None:
            metrics["entropy"] = _masked_mean(entropy_BT.detach(), m)
    return loss, metrics
