"""Distillation losses against hand-written loops; chunked = plain; gradients reach only the student."""

import math

import pytest
import torch

from distill.losses import (
    KINDS,
    DistillLossConfig,
    chunked_divergence,
    distill_loss,
    divergence,
    sampled_token_advantages,
)
from model.errors import ConfigError


def softmax(z):
    e = [math.exp(x - max(z)) for x in z]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def loop_divergence(s_logits, t_logits, kind, beta=0.5, temperature=1.0):
    p_s = softmax([x / temperature for x in s_logits])
    p_t = softmax([x / temperature for x in t_logits])
    if kind == "reverse_kl":
        return kl(p_s, p_t)
    if kind == "forward_kl":
        return kl(p_t, p_s)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def test_reverse_kl_by_hand():
    s = torch.tensor([[0.0, math.log(3.0)]])  # p_s = (1/4, 3/4)
    t = torch.tensor([[0.0, 0.0]])  # p_t = (1/2, 1/2)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert divergence(s, t, "reverse_kl").item() == pytest.approx(want, abs=1e-6)
    want_fwd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert divergence(s, t, "forward_kl").item() == pytest.approx(want_fwd, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta, temperature", [(0.5, 1.0), (0.1, 0.7)])
def test_divergences_match_the_loop(kind, beta, temperature):
    g = torch.Generator().manual_seed(KINDS.index(kind))
    s, t = torch.randn(5, 7, generator=g) * 2, torch.randn(5, 7, generator=g) * 2
    got = divergence(s, t, kind, beta, temperature)
    want = [loop_divergence(a, b, kind, beta, temperature) for a, b in zip(s.tolist(), t.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert (got >= -1e-6).all()
    assert divergence(s, s, kind, beta).abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_rows, chunk_vocab", [(3, 4), (10, 11), (1, 1), (4, 64)])
def test_chunked_equals_plain_values_and_gradients(kind, chunk_rows, chunk_vocab):
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(2, 5, 11, generator=g) * 3).requires_grad_(True)
    t = (torch.randn(2, 5, 11, generator=g) * 3).requires_grad_(True)  # made to track: must get nothing
    cfg = DistillLossConfig(kind, beta=0.3, temperature=0.9, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    chunked = chunked_divergence(s, t, cfg)
    plain = divergence(s, t.detach(), kind, 0.3, 0.9)
    assert chunked.shape == (2, 5) and torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)
    w = torch.randn(2, 5, generator=g)
    (g_chunked,) = torch.autograd.grad((chunked * w).sum(), s)
    (g_plain,) = torch.autograd.grad((plain * w).sum(), s)
    assert torch.allclose(g_chunked, g_plain, rtol=1e-5, atol=1e-6)
    assert t.grad is None


def test_streamed_backward_keeps_one_gradient_not_the_softmax_intermediates():
    s = torch.randn(64, 50).requires_grad_(True)
    t = torch.randn(64, 50)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    cfg = DistillLossConfig(chunk_rows=8, chunk_vocab=16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        chunked_divergence(s, t, cfg).sum()
    assert sum(saved) <= s.numel()  # the [rows, V] gradient of the student's logits, nothing else
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        divergence(s, t).sum()
    assert sum(saved) >= 2 * s.numel()  # the plain form keeps several [rows, V] intermediates


def test_reverse_kl_gradient_has_the_closed_form():
    s = torch.randn(3, 6).requires_grad_(True)
    t = torch.randn(3, 6)
    kl_rows = divergence(s, t)
    kl_rows.sum().backward()
    p, lp, lq = s.softmax(-1), s.log_softmax(-1), t.log_softmax(-1)
    assert torch.allclose(s.grad, p * (lp - lq - kl_rows.detach()[:, None]), atol=1e-6)


def test_gradient_reaches_only_the_student():
    s = torch.randn(2, 3, 5).requires_grad_(True)
    t = torch.randn(2, 3, 5).requires_grad_(True)
    for kind in KINDS:
        loss, _ = distill_loss(s, t, torch.ones(2, 3), DistillLossConfig(kind=kind, chunk_rows=2))
        loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_masked_reductions_by_hand():
    s = torch.randn(2, 3, 4)
    t = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    d = [[loop_divergence(s[b, i].tolist(), t[b, i].tolist(), "reverse_kl") for i in range(3)]
         for b in range(2)]
    tok, metrics = distill_loss(s, t, mask, DistillLossConfig(reduction="token"))
    seq, _ = distill_loss(s, t, mask, DistillLossConfig(reduction="sequence"))
    assert tok.item() == pytest.approx((d[0][0] + d[0][1] + d[1][0]) / 3, rel=1e-5)
    assert seq.item() == pytest.approx(((d[0][0] + d[0][1]) / 2 + d[1][0]) / 2, rel=1e-5)
    assert metrics["reverse_kl"].item() == pytest.approx(tok.item(), rel=1e-6)


def test_sampled_token_advantages_by_hand():
    s_lp = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9)]]).requires_grad_(True)
    t_lp = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.1)]]).requires_grad_(True)
    adv = sampled_token_advantages(s_lp, t_lp, torch.tensor([[1, 1, 0]]))
    assert adv.tolist()[0] == pytest.approx([-math.log(2.0), math.log(2.0), 0.0])
    assert not adv.requires_grad


@pytest.mark.parametrize(
    "kwargs, key",
    [({"kind": "kl"}, "distill.kind"), ({"kind": "jsd", "beta": 1.0}, "distill.beta"),
     ({"temperature": 0}, "distill.temperature"), ({"reduction": "sum"}, "distill.reduction"),
     ({"chunk_rows": 0}, "distill.chunk_rows")],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DistillLossConfig(**kwargs).validate()
