"""Vocabulary-chunked divergences: the streaming logsumexp and log-softmax equal the full ones, the streamed
divergence and its gradient equal the plain full-vocabulary reference for every option, teacher logits
never exist in blocks larger than [chunk_rows, chunk_vocab], and malformed chunk streams are refused."""

import pytest
import torch
import torch.nn.functional as F

from distill.losses import KINDS, DistillLossConfig, divergence, divergence_rows, head_source
from distill.streaming import logprob_chunks, streamed_divergence, streaming_logsumexp
from model.errors import MoeforgeError


@pytest.mark.parametrize("chunk", [1, 3, 7, 13, 100])
def test_streaming_logsumexp_and_log_softmax_equal_the_full_ones(chunk):
    g = torch.Generator().manual_seed(chunk)
    z = torch.randn(4, 13, generator=g) * 5
    z[0] += 200.0  # exp(250) overflows float32: the running max must keep it finite
    z[1, 5] = -200.0
    lse = streaming_logsumexp(lambda a, b: z[:, a:b], 13, chunk)
    assert torch.allclose(lse, torch.logsumexp(z, -1), rtol=1e-6, atol=1e-4)
    parts = list(logprob_chunks(lambda a, b: z[:, a:b], 13, chunk, temperature=0.8))
    assert [(a, b) for a, b, _ in parts] == [(v, min(v + chunk, 13)) for v in range(0, 13, chunk)]
    full = torch.cat([lp for _, _, lp in parts], dim=1)
    assert torch.allclose(full, F.log_softmax(z / 0.8, -1), rtol=1e-6, atol=1e-4)  # ulp(250) ~ 2e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta, temperature", [(0.5, 1.0), (0.2, 0.7), (0.9, 1.6)])
def test_head_streamed_divergence_equals_the_full_vocabulary_reference(kind, beta, temperature):
    """Teacher logits rebuilt from hidden states in [3, 5] blocks: the same values and student gradients
    as the plain divergence on full logits; the teacher's hidden states and head get no gradient."""
    g = torch.Generator().manual_seed(11)
    student = (torch.randn(2, 4, 17, generator=g) * 2).requires_grad_(True)
    hidden = torch.randn(8, 6, generator=g).requires_grad_(True)
    head_w = torch.randn(17, 6, generator=g).requires_grad_(True)
    blocks = []

    def head(h, v0, v1):
        out = h @ head_w[v0:v1].T
        blocks.append(tuple(out.shape))
        return out

    cfg = DistillLossConfig(kind=kind, beta=beta, temperature=temperature, chunk_rows=3, chunk_vocab=5)
    got, _ = divergence_rows(student, head_source(hidden, head, 17, cfg), cfg)
    want = divergence(student, (hidden @ head_w.T).view(2, 4, 17).detach(), kind, beta, temperature)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    w = torch.rand(2, 4, generator=g)
    (g_got,) = torch.autograd.grad((got * w).sum(), student)
    (g_want,) = torch.autograd.grad((want * w).sum(), student)
    assert torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert hidden.grad is None and head_w.grad is None
    assert max(r for r, _ in blocks) == 3 and max(c for _, c in blocks) == 5  # never [rows, V] at once
    assert sum(r * c for r, c in blocks) == 2 * 8 * 17  # two passes over the teacher's vocabulary


def test_streamed_token_logprobs_are_the_teacher_log_softmax_at_the_tokens():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    tokens = torch.tensor([0, 9, 4, 5, 3, 9])
    _, lp = streamed_divergence(s, logprob_chunks(lambda a, b: t[:, a:b], 10, 3, 1.3), temperature=1.3,
                                chunk=4, tokens_N=tokens)
    want = F.log_softmax(t / 1.3, -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(lp, want, atol=1e-6)


def test_malformed_chunk_streams_are_refused():
    s, t = torch.randn(2, 6), torch.randn(2, 6)
    chunks = list(logprob_chunks(lambda a, b: t[:, a:b], 6, 2))
    for bad in (chunks[:2], [chunks[1], chunks[0], chunks[2]], [chunks[0], chunks[0], *chunks[1:]],
                [(0, 6, t[:1])]):
        with pytest.raises(MoeforgeError, match="vocabulary"):
            streamed_divergence(s, bad)
