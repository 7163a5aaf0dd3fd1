"""On-policy distillation losses (training-algorithms §7): full-vocabulary KLs, generalised JSD, and the
sampled-token estimator. Gradients reach only the student: teacher log-probabilities are never tracked.

``divergence`` is the plain reference (all positions, the whole vocabulary at once). ``divergence_rows``
computes the same values ``chunk_rows`` positions by ``chunk_vocab`` vocabulary entries at a time
(distill.streaming): the teacher's log-probabilities come from a *row source*, ``source(i, j)`` -> its
log-prob chunks of positions i:j in vocabulary order, built from full logits (``logits_source``), from
final hidden states and a head (``head_source``), or received from a teacher rank (distill.remote).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.streaming import Chunk, logprob_chunks, streamed_divergence
from model.errors import ConfigError, MoeforgeError
from rl.grpo_loss import aggregate

RowSource = Callable[[int, int], Iterable[Chunk]]  # flattened positions i:j -> the teacher's log-prob chunks
KINDS = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = {"token": "token_mean", "sequence": "seq_mean_token_mean"}


@dataclass(frozen=True)
class DistillLossConfig:
    """``kind``: reverse_kl = KL(student || teacher) (V4's OPD), forward_kl, or jsd (GKD's JSD(beta),
    ``beta`` in (0, 1)); ``reduction``: mean over all tokens, or per sequence then over sequences;
    ``chunk_rows`` x ``chunk_vocab``: the largest block of teacher logits alive at once."""

    kind: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    reduction: str = "token"
    chunk_rows: int = 1024
    chunk_vocab: int = 8192

    def validate(self) -> DistillLossConfig:
        if self.kind not in KINDS:
            raise ConfigError("distill.kind", f"{self.kind!r} is not one of {KINDS}")
        if self.kind == "jsd" and not 0 < self.beta < 1:
            raise ConfigError("distill.beta", f"must be in (0, 1) for jsd, got {self.beta}")
        if not self.temperature > 0:
            raise ConfigError("distill.temperature", f"must be > 0, got {self.temperature}")
        if self.reduction not in REDUCTIONS:
            raise ConfigError("distill.reduction", f"{self.reduction!r} is not one of {tuple(REDUCTIONS)}")
        for key in ("chunk_rows", "chunk_vocab"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distill.{key}", f"must be >= 1, got {getattr(self, key)}")
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


def _check_rows(n: int, i: int, j: int) -> None:
    if not 0 <= i < j <= n:
        raise MoeforgeError(f"teacher rows [{i}, {j}) outside the {n} rows of this batch")


def logits_source(teacher_logits_NV: torch.Tensor, cfg: DistillLossConfig) -> RowSource:
    """The teacher's log-prob chunks of rows i:j from its full logits (the reference form)."""
    t = teacher_logits_NV.detach()

    def rows(i: int, j: int):
        _check_rows(t.shape[0], i, j)
        return logprob_chunks(lambda a, b: t[i:j, a:b], t.shape[1], cfg.chunk_vocab, cfg.temperature)

    return rows


def head_source(teacher_hidden_NH: torch.Tensor, head, vocab: int, cfg: DistillLossConfig) -> RowSource:
    """The teacher's log-prob chunks of rows i:j rebuilt from its final hidden states through
    ``head(hidden, v0, v1)`` (logits of vocabulary v0:v1), one [rows, chunk_vocab] block at a time: V4
    keeps only the teachers' hidden states and rebuilds logits on the fly."""
    h = teacher_hidden_NH.detach()

    def rows(i: int, j: int):
        _check_rows(h.shape[0], i, j)

        def logits(a: int, b: int) -> torch.Tensor:
            with torch.no_grad():
                return head(h[i:j], a, b)

        return logprob_chunks(logits, vocab, cfg.chunk_vocab, cfg.temperature)

    return rows


def divergence_rows(
    student_logits_BTV: torch.Tensor, source: RowSource, cfg: DistillLossConfig,
    tokens_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position divergence [B, T] (gradient to the student only), ``cfg.chunk_rows`` flattened
    positions by ``cfg.chunk_vocab`` vocabulary entries at a time; with ``tokens_BT`` also the teacher's
    log-probabilities of those tokens [B, T]. ``source(i, j)`` gives the teacher's log-prob chunks of
    positions i:j and is asked for consecutive row blocks, in order."""
    lead = student_logits_BTV.shape[:-1]
    s = student_logits_BTV.reshape(-1, student_logits_BTV.shape[-1])
    tok = tokens_BT.reshape(-1) if tokens_BT is not None else None
    divs, tok_lps = [], []
    for i in range(0, s.shape[0], cfg.chunk_rows):
        j = min(i + cfg.chunk_rows, s.shape[0])
        d, lp = streamed_divergence(s[i:j], source(i, j), cfg.kind, cfg.beta, cfg.temperature,
                                    cfg.chunk_vocab, tok[i:j] if tok is not None else None)
        divs.append(d)
        tok_lps.append(lp)
    per_pos = torch.cat(divs).view(lead)
    return per_pos, (torch.cat(tok_lps).view(lead) if tok is not None else None)


def chunked_divergence(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, cfg: DistillLossConfig
) -> torch.Tensor:
    """``divergence`` computed in [chunk_rows, chunk_vocab] blocks with bounded memory; [B, T]."""
    t = teacher_logits_BTV.reshape(-1, teacher_logits_BTV.shape[-1])
    return divergence_rows(student_logits_BTV, logits_source(t, cfg), cfg)[0]


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
