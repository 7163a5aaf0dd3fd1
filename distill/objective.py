"""The distillation objective on a batch of student samples: the student's logits at every response position
against one teacher's, over the full vocabulary (or the sampled-token estimator), masked and reduced.

Row b of a batch is prompt_b + response_b (right padded); response token t of row b is predicted at
position `plen_b - 1 + t` of the input `ids[:, :-1]`.
"""

from __future__ import annotations

import torch

from distill.config import SAMPLED, DistillConfig
from distill.losses import REDUCTIONS, RowSource, divergence_rows, sampled_token_advantages
from rl.grpo_loss import GRPOLossConfig, aggregate, grpo_loss


def response_positions(plen_B: torch.Tensor, t: int, width: int) -> torch.Tensor:
    """[B, T] input positions whose outputs predict response tokens 0..T-1 (clamped inside `width`)."""
    return (plen_B[:, None] - 1 + torch.arange(t, device=plen_B.device)).clamp(max=width - 1)


def gather_positions(x_BSX: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
    """x[b, pos[b, t]] for every (b, t): [B, T, X]."""
    return x_BSX.gather(1, pos_BT[..., None].expand(-1, -1, x_BSX.shape[-1]))


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return (x_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def distill_objective(
    student_logits_BTV: torch.Tensor, teacher: RowSource, tokens_BT: torch.Tensor, mask_BT: torch.Tensor,
    cfg: DistillConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (to minimise, gradients to the student only) and detached metrics; `teacher` gives the teacher's
    log-prob chunks of the flattened response positions (distill.losses.RowSource), read once. `kl` is
    always the masked mean of the configured full-vocabulary divergence (reverse KL for the sampled
    estimator)."""
    lcfg = cfg.loss_config()
    mask = mask_BT.to(torch.float32)
    if cfg.kind != SAMPLED:
        per_pos, _ = divergence_rows(student_logits_BTV, teacher, lcfg)
        loss = aggregate(per_pos, mask, REDUCTIONS[cfg.reduction])
        return loss, {"kl": _masked_mean(per_pos.detach(), mask)}
    kl, logp_t = divergence_rows(student_logits_BTV.detach(), teacher, lcfg, tokens_BT)
    scaled = student_logits_BTV.float() / cfg.temperature
    logp_s = scaled.gather(-1, tokens_BT[..., None]).squeeze(-1) - torch.logsumexp(scaled, -1)
    adv = sampled_token_advantages(logp_s, logp_t, mask)
    pg = GRPOLossConfig(loss_agg=REDUCTIONS[cfg.reduction])
    loss, _ = grpo_loss(logp_s, logp_s.detach(), adv, mask, pg)  # on-policy: ratio 1, gradient -adv * dlogp
    return loss, {"kl": _masked_mean(kl, mask), "sampled_reverse_kl": _masked_mean(-adv, mask)}
