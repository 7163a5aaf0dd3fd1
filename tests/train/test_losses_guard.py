"""LM/MTP losses against plain loops, and the spike guard's verdicts."""

import math

import torch
import torch.nn.functional as F

from train.guard import SpikeGuard, Verdict
from train.losses import IGNORE, cross_entropy, lm_and_mtp_loss, mtp_labels


def _packed(b=3, s=12, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, v, (b, s), generator=g)
    doc_ids = torch.cumsum(torch.rand(b, s, generator=g) < 0.25, dim=1)
    labels = torch.full_like(tokens, IGNORE)
    same = doc_ids[:, 1:] == doc_ids[:, :-1]
    labels[:, :-1] = torch.where(same, tokens[:, 1:], IGNORE)
    return tokens, doc_ids, labels


def test_mtp_labels_match_a_loop():
    tokens, doc_ids, labels = _packed()
    for depth in range(3):
        want = torch.full_like(labels, IGNORE)
        for b in range(tokens.shape[0]):
            for i in range(tokens.shape[1]):
                j = i + 2 + depth  # depth k at position i predicts token i+2+k of the same document
                if j < tokens.shape[1] and doc_ids[b, i] == doc_ids[b, j]:
                    want[b, i] = tokens[b, j]
        assert torch.equal(mtp_labels(labels, doc_ids, depth), want)


def test_cross_entropy_matches_torch_and_handles_all_ignored():
    _, doc_ids, labels = _packed()
    logits = torch.randn(*labels.shape, 7)
    ref = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=IGNORE)
    assert torch.allclose(cross_entropy(logits, labels), ref, atol=1e-6)
    assert cross_entropy(logits, torch.full_like(labels, IGNORE)).item() == 0.0
    lm, mtp = lm_and_mtp_loss(logits, [logits, logits], labels, doc_ids)
    m0, m1 = (cross_entropy(logits, mtp_labels(labels, doc_ids, k)) for k in (0, 1))
    assert torch.allclose(lm, ref, atol=1e-6) and torch.allclose(mtp, (m0 + m1) / 2)
    assert lm_and_mtp_loss(logits, [], labels, doc_ids)[1] is None


def test_guard_skips_spikes_and_nans_then_rolls_back():
    g = SpikeGuard(factor=2.0, ema_beta=0.5, warmup_steps=2, max_bad_steps=2)
    assert g.check(5.0, 1.0) is Verdict.OK
    assert g.check(20.0, 1.0) is Verdict.OK  # not judged during warm-up
    assert g.check(10.0, 1.0) is Verdict.OK  # ema = 12.5 -> 11.25
    assert g.check(30.0, 1.0) is Verdict.SKIP  # > 2 x 11.25
    assert g.check(11.0, 1.0) is Verdict.OK  # a good step resets the count
    assert g.check(math.nan, 1.0) is Verdict.SKIP
    state = g.state_dict()
    assert g.check(1.0, math.inf) is Verdict.ROLLBACK
    g.load_state_dict(state)
    assert g.check(1.0, math.inf) is Verdict.ROLLBACK
    assert SpikeGuard(2.0, 0.5, 0, 1, enabled=False).check(math.nan, 1.0) is Verdict.OK
