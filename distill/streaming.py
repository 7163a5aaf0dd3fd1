"""Full-vocabulary divergences streamed over vocabulary chunks, so no [rows, V] teacher tensor ever exists.

The teacher side turns its logits into normalised log-probabilities chunk by chunk (`logprob_chunks`): a
first pass over the vocabulary accumulates a streaming logsumexp, a second yields `(v0, v1, log_p[:, v0:v1])`.
The student side (`streamed_divergence`) consumes those chunks once, in order, next to its own logits:

    reverse KL(s||t) = sum_v p_s (l_s - l_t)        d/dz_s = p_s (l_s - l_t - KL) / T
    forward KL(t||s) = sum_v p_t (l_t - l_s)        d/dz_s = (p_s - p_t) / T
    JSD(beta)        = beta KL(t||m) + (1-beta) KL(s||m),  m = beta p_t + (1-beta) p_s
                                                    d/dz_s = (1-beta) p_s (l_s - l_m - KL(s||m)) / T

with l = log_softmax(z / T). Each needs, per vocabulary entry, only the row's two logsumexps and the
row's final sum (applied in a last pass over the student's chunks), so the gradient with respect to the
student's logits is built in the same pass and kept for backward; gradients never reach the teacher.
Peak teacher memory is rows x chunk; the student holds its [rows, V] logits and their gradient (which its
backward needs anyway). `divergence` in distill.losses is the plain full-vocabulary reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

from model.errors import MoeforgeError

Chunk = tuple[int, int, torch.Tensor]  # (v0, v1, teacher log-probs [rows, v1 - v0], float32)
LogitsFn = Callable[[int, int], torch.Tensor]  # (v0, v1) -> logits [rows, v1 - v0] of vocabulary v0:v1


def spans(vocab: int, chunk: int) -> list[tuple[int, int]]:
    """The vocabulary chunks [v0, v1) in order."""
    return [(v, min(v + chunk, vocab)) for v in range(0, vocab, chunk)]


def streaming_logsumexp(logits_fn: LogitsFn, vocab: int, chunk: int) -> torch.Tensor:
    """logsumexp over the vocabulary of `logits_fn`'s chunks, one chunk alive at a time; [rows] float32."""
    m = s = None
    for v0, v1 in spans(vocab, chunk):
        z = logits_fn(v0, v1).float()
        cm = z.max(-1).values
        if m is None:
            m, s = cm, (z - cm[:, None]).exp().sum(-1)
            continue
        new = torch.maximum(m, cm)
        s = s * (m - new).exp() + (z - new[:, None]).exp().sum(-1)
        m = new
    return m + s.log()


def logprob_chunks(logits_fn: LogitsFn, vocab: int, chunk: int, temperature: float = 1.0) -> Iterator[Chunk]:
    """log_softmax(logits / temperature) in vocabulary chunks (two passes over `logits_fn`)."""
    def scaled(v0: int, v1: int) -> torch.Tensor:
        return logits_fn(v0, v1).float() / temperature

    lse = streaming_logsumexp(scaled, vocab, chunk)
    for v0, v1 in spans(vocab, chunk):
        yield v0, v1, scaled(v0, v1) - lse[:, None]


class _Streamed(torch.autograd.Function):
    """Forward: per-row divergence from the student's logits and the teacher's log-prob chunks; the
    gradient with respect to the student's logits is computed on the way and scaled in backward."""

    @staticmethod
    def forward(ctx, student_NV, chunks, kind, beta, temperature, chunk, tokens_N, want_grad):
        div, tok_lp, grad = _stream(student_NV.detach(), chunks, kind, beta, temperature, chunk, tokens_N,
                                    want_grad)
        ctx.save_for_backward(grad.to(student_NV.dtype) if grad is not None else None)  # built in fp32
        ctx.dtype = student_NV.dtype
        ctx.mark_non_differentiable(tok_lp)
        return div, tok_lp

    @staticmethod
    def backward(ctx, grad_div, _grad_tok):
        (grad,) = ctx.saved_tensors
        return (grad_div[:, None] * grad).to(ctx.dtype), None, None, None, None, None, None, None


def _stream(s_NV, chunks: Iterable[Chunk], kind, beta, temperature, chunk, tokens_N, want_grad):
    n, vocab = s_NV.shape

    def ls_of(v0: int, v1: int) -> torch.Tensor:
        return s_NV[:, v0:v1].float() / temperature

    lse = streaming_logsumexp(ls_of, vocab, chunk)
    acc = torch.zeros(n, dtype=torch.float32, device=s_NV.device)  # the row's divergence (reverse/forward)
    acc_t = torch.zeros_like(acc)  # jsd: KL(t || m)
    tok_lp = torch.zeros_like(acc)
    grad = torch.empty(n, vocab, dtype=torch.float32, device=s_NV.device) if want_grad else None
    done = 0
    for v0, v1, lt in chunks:
        if v0 != done or v1 <= v0 or v1 > vocab or lt.shape != (n, v1 - v0):
            raise MoeforgeError(f"teacher log-prob chunk [{v0}, {v1}) of shape {tuple(lt.shape)} does not "
                                f"continue the vocabulary at {done} for {n} rows of {vocab}")
        done = v1
        lt = lt.to(s_NV.device, torch.float32)
        ls = ls_of(v0, v1) - lse[:, None]
        ps = ls.exp()
        if kind == "reverse_kl":
            term = ps * (ls - lt)
            acc += term.sum(-1)
            g = term
        elif kind == "forward_kl":
            pt = lt.exp()
            acc += (pt * (lt - ls)).sum(-1)
            g = ps - pt
        elif kind == "jsd":
            lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
            acc_t += (lt.exp() * (lt - lm)).sum(-1)
            g = ps * (ls - lm)
            acc += g.sum(-1)  # KL(s || m)
        else:
            raise MoeforgeError(f"distill.kind: {kind!r} has no streamed form")
        if grad is not None:
            grad[:, v0:v1] = g
        if tokens_N is not None:
            inside = (tokens_N >= v0) & (tokens_N < v1)
            picked = lt.gather(1, (tokens_N - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            tok_lp = torch.where(inside, picked, tok_lp)
    if done != vocab:
        raise MoeforgeError(f"teacher log-prob chunks end at {done}, the vocabulary has {vocab} entries")
    if grad is not None:
        if kind in ("reverse_kl", "jsd"):  # subtract p_s * (the row's sum), chunk by chunk
            for v0, v1 in spans(vocab, chunk):
                grad[:, v0:v1] -= (ls_of(v0, v1) - lse[:, None]).exp() * acc[:, None]
        grad *= (1 - beta) / temperature if kind == "jsd" else 1 / temperature
    div = beta * acc_t + (1 - beta) * acc if kind == "jsd" else acc
    return div, tok_lp, grad


def streamed_divergence(
    student_NV: torch.Tensor, chunks: Iterable[Chunk], kind: str = "reverse_kl", beta: float = 0.5,
    temperature: float = 1.0, chunk: int = 4096, tokens_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence [N] of the student's logits [N, V] (differentiable) against the teacher's
    log-prob `chunks` (consumed once, in vocabulary order), and, given `tokens_N`, the teacher's
    log-probabilities of those tokens [N] (no gradient); `chunk` is the student's own chunk width."""
    want_grad = torch.is_grad_enabled() and student_NV.requires_grad
    div, tok_lp = _Streamed.apply(student_NV, chunks, kind, beta, temperature, chunk, tokens_N, want_grad)
    return div, (tok_lp if tokens_N is not None else None)
