"""On-policy distillation losses (training-algorithms §7): full-vocabulary KLs, generalised JSD, and the
sampled-token estimator. Gradients reach only the student: teacher logits are always detached.

``divergence`` is the plain reference (all positions at once); ``chunked_divergence`` computes the same
values ``chunk_rows`` positions at a time under activation checkpointing, so the softmax intermediates of
only one chunk ([chunk_rows, V]) are alive at once, in the forward and in the backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.errors import ConfigError
from rl.grpo_loss import aggregate

KINDS = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = {"token": "token_mean", "sequence": "seq_mean_token_mean"}


@dataclass(frozen=True)
class DistillLossConfig:
    """``kind``: reverse_kl = KL(student || teacher) (V4's OPD), forward_kl, or jsd (GKD's JSD(beta),
    ``beta`` in (0, 1)); ``reduction``: mean over all tokens, or per sequence then over sequences."""

    kind: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    reduction: str = "token"
    chunk_rows: int = 1024

    def validate(self) -> DistillLossConfig:
        if self.kind not in KINDS:
            raise ConfigError("distill.kind", f"{self.kind!r} is not one of {KINDS}")
        if self.kind == "jsd" and not 0 < self.beta < 1:
            raise ConfigError("distill.beta", f"must be in (0, 1) for jsd, got {self.beta}")
        if not self.temperature > 0:
            raise ConfigError("distill.temperature", f"must be > 0, got {self.temperature}")
        if self.reduction not in REDUCTIONS:
            raise ConfigError("distill.reduction", f"{self.reduction!r} is not one of {tuple(REDUCTIONS)}")
        if self.chunk_rows < 1:
            raise ConfigError("distill.chunk_rows", f"must be >= 1, got {self.chunk_rows}")
        return self


def _kl_logp(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probabilities."""
    return (la.exp() * (la - lb)).sum(-1)


def divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "reverse_kl", beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence over the full vocabulary (last dim); output has the leading shape."""
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if kind == "reverse_kl":
        return _kl_logp(ls, lt)
    if kind == "forward_kl":
        return _kl_logp(lt, ls)
    if kind == "jsd":
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), dim=0)
        return beta * _kl_logp(lt, lm) + (1 - beta) * _kl_logp(ls, lm)
    raise ConfigError("distill.kind", f"{kind!r} is not one of {KINDS}")


def _chunked(student_logits_BTV: torch.Tensor, teacher_chunk, cfg: DistillLossConfig) -> torch.Tensor:
    """Per-position divergence, ``cfg.chunk_rows`` flattened positions at a time; ``teacher_chunk(i, j)``
    gives the (detached) teacher logits of positions ``i:j``."""
    lead = student_logits_BTV.shape[:-1]
    s = student_logits_BTV.reshape(-1, student_logits_BTV.shape[-1])
    args = (cfg.kind, cfg.beta, cfg.temperature)
    parts = []
    for i in range(0, s.shape[0], cfg.chunk_rows):
        sc, tc = s[i : i + cfg.chunk_rows], teacher_chunk(i, i + cfg.chunk_rows).detach()
        if torch.is_grad_enabled() and sc.requires_grad:
            parts.append(checkpoint(divergence, sc, tc, *args, use_reentrant=False))
        else:
            parts.append(divergence(sc, tc, *args))
    return torch.cat(parts).view(lead)


def chunked_divergence(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, cfg: DistillLossConfig
) -> torch.Tensor:
    """``divergence`` computed ``cfg.chunk_rows`` positions at a time with bounded memory; [B, T]."""
    t = teacher_logits_BTV.detach().reshape(-1, teacher_logits_BTV.shape[-1])
    return _chunked(student_logits_BTV, lambda i, j: t[i:j], cfg)


def head_chunked_divergence(
    student_logits_BTV: torch.Tensor, teacher_hidden_BTH: torch.Tensor, teacher_head, cfg: DistillLossConfig
) -> torch.Tensor:
    """``chunked_divergence`` where the teacher's logits are rebuilt chunk by chunk from its final hidden
    states through ``teacher_head`` ([N, H] -> [N, V]), so at most ``chunk_rows`` rows of teacher logits
    exist at once (V4 keeps only teacher hidden states); [B, T]."""
    h = teacher_hidden_BTH.detach().reshape(-1, teacher_hidden_BTH.shape[-1])

    def teacher_chunk(i: int, j: int) -> torch.Tensor:
        with torch.no_grad():
            return teacher_head(h[i:j]).to(student_logits_BTV.device)

    return _chunked(student_logits_BTV, teacher_chunk, cfg)


def head_chunked_token_logprobs(
    teacher_hidden_BTH: torch.Tensor, teacher_head, tokens_BT: torch.Tensor, chunk_rows: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The teacher's log-probabilities of ``tokens_BT`` under ``log_softmax(logits / temperature)``, its
    logits rebuilt ``chunk_rows`` rows at a time from its hidden states (no gradient); [B, T]."""
    h = teacher_hidden_BTH.detach().reshape(-1, teacher_hidden_BTH.shape[-1])
    tok = tokens_BT.reshape(-1)
    parts = []
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk_rows):
            logits = teacher_head(h[i : i + chunk_rows]).to(tok.device).float()
            lp = F.log_softmax(logits / temperature, dim=-1)
            parts.append(lp.gather(1, tok[i : i + chunk_rows, None]).squeeze(1))
    return torch.cat(parts).view(tokens_BT.shape)


def distill_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: DistillLossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked full-vocabulary distillation loss of the student against one teacher, and metrics."""
    cfg = (cfg or DistillLossConfig()).validate()
    per_pos = chunked_divergence(student_logits_BTV, teacher_logits_BTV, cfg)
    loss = aggregate(per_pos, mask_BT, REDUCTIONS[cfg.reduction])
    m = mask_BT.to(per_pos.dtype)
    return loss, {cfg.kind: ((per_pos.detach() * m).sum() / m.sum().clamp(min=1))}


def sampled_token_advantages(
    student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Token-level estimator of on-policy distillation: per sampled token ``reverse_kl = logp_s - logp_t``
    and ``advantage = -reverse_kl`` (discount 0), detached and zero outside the mask, for ``grpo_loss``."""
    adv = -(student_logp_BT.detach() - teacher_logp_BT.detach())
    return adv * mask_BT.to(adv.dtype)
