"""GRPO loss pieces against hand-computed numbers and a plain-Python-loop reference."""

import math

import pytest
import torch

from model.errors import ConfigError, MoeforgeError
from rl.grpo_loss import (
    AGG_MODES,
    GRPOLossConfig,
    aggregate,
    dynamic_sampling_keep,
    group_advantages,
    grpo_loss,
    k3_kl,
)


def loop_loss(logp, old, adv, mask, clip_low, clip_high, beta, ref, mode, max_len):
    """The GRPO objective written out token by token with Python floats."""
    B, T = len(logp), len(logp[0])
    per = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            ratio = math.exp(logp[b][t] - old[b][t])
            a = adv[b][t]
            clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
            per[b][t] = -min(ratio * a, clipped * a)
            if beta:
                d = ref[b][t] - logp[b][t]
                per[b][t] += beta * (math.exp(d) - d - 1)
    if mode == "token_mean":
        n = sum(mask[b][t] for b in range(B) for t in range(T))
        return sum(per[b][t] * mask[b][t] for b in range(B) for t in range(T)) / n
    if mode == "seq_mean_token_mean":
        seqs = [sum(per[b][t] * mask[b][t] for t in range(T)) / sum(mask[b]) for b in range(B)]
        return sum(seqs) / B
    return sum(per[b][t] * mask[b][t] for b in range(B) for t in range(T)) / (B * (max_len or T))


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    adv = group_advantages(r, 4, eps=0.0)
    s1 = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    s2 = math.sqrt((1 + 1 + 0 + 0) / 3)  # of (3, 1, 2, 2), mean 2
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 1 / s2, -1 / s2, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    dr = group_advantages(r, 4, scale_by_std=False)
    assert dr.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 1, -1, 0, 0])
    same = group_advantages(torch.tensor([1.0, 1.0, 1.0]), 3)
    assert same.tolist() == [0.0, 0.0, 0.0]  # eps keeps a uniform group finite
    with pytest.raises(ConfigError, match="grpo.group_size"):
        group_advantages(r, 3)


def test_k3_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.1)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.1)]])
    # d = log(0.25/0.5) = -log 2: 0.5 + log 2 - 1; identical probabilities give 0
    assert k3_kl(logp, ref).tolist()[0] == pytest.approx([0.5 + math.log(2) - 1, 0.0])
    assert (k3_kl(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


RATIO = [[1.5, 0.5, 2.0], [0.5, 1.5, 1.0]]
ADV = [[1.0, -1.0, 1.0], [1.0, -1.0, 5.0]]
MASK = [[1, 1, 1], [1, 0, 0]]


def _hand_batch():
    old = torch.full((2, 3), math.log(0.3))
    logp = (old + torch.tensor(RATIO).log()).requires_grad_(True)
    return logp, old, torch.tensor(ADV), torch.tensor(MASK)


@pytest.mark.parametrize(
    "mode, max_len, expected",
    [
        # per-token losses (masked): -1.28 (clipped high), 0.8 (clipped low), -1.28, -0.5
        ("token_mean", None, -2.26 / 4),
        ("seq_mean_token_mean", None, (-1.76 / 3 + -0.5) / 2),
        ("seq_sum_const", None, -2.26 / 6),
        ("seq_sum_const", 5, -2.26 / 10),
    ],
)
def test_clipped_loss_by_hand(mode, max_len, expected):
    logp, old, adv, mask = _hand_batch()
    loss, m = grpo_loss(logp, old, adv, mask, GRPOLossConfig(loss_agg=mode, max_len=max_len))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_frac_high"].item() == pytest.approx(0.5)
    assert m["clip_frac_low"].item() == pytest.approx(0.25)
    assert m["ratio_mean"].item() == pytest.approx(1.125)
    assert (m["ratio_max"].item(), m["ratio_min"].item()) == pytest.approx((2.0, 0.5))
    assert "kl_ref" not in m and "entropy" not in m


def test_gradient_only_through_unclipped_tokens():
    logp, old, adv, mask = _hand_batch()
    loss, _ = grpo_loss(logp, old, adv, mask, GRPOLossConfig(loss_agg="token_mean"))
    loss.backward()
    # d/dlogp of -ratio*A/N at the one unclipped masked token (ratio 0.5, A=1); clipped + masked give 0
    expected = [[0.0, 0.0, 0.0], [-0.5 / 4, 0.0, 0.0]]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in expected]


def test_on_policy_first_epoch_is_plain_policy_gradient():
    logp = torch.randn(3, 4).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.ones(3, 4)
    loss, m = grpo_loss(logp, logp.detach().clone(), adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert m["approx_kl_old"].item() == 0.0 and m["clip_frac_low"].item() == 0.0
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None].expand(3, 4) / 12)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_random_batches_match_the_loop(mode, beta):
    g = torch.Generator().manual_seed(AGG_MODES.index(mode) * 10 + int(beta > 0))
    B, T = 4, 6
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g)
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, beta=beta, loss_agg=mode, max_len=8)
    loss, m = grpo_loss(logp, old, adv, mask, cfg, ref_logp_BT=ref if beta else None,
                        entropy_BT=torch.ones(B, T))
    adv_bt = [[a] * T for a in adv.tolist()]
    want = loop_loss(logp.tolist(), old.tolist(), adv_bt, mask.tolist(), 0.2, 0.28, beta, ref.tolist(),
                     mode, 8)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert m["entropy"].item() == pytest.approx(1.0)
    assert ("kl_ref" in m) == (beta > 0)


def test_beta_needs_reference_only_when_positive():
    logp = torch.zeros(1, 2)
    grpo_loss(logp, logp, torch.ones(1), torch.ones(1, 2), GRPOLossConfig(beta=0.0))
    with pytest.raises(MoeforgeError, match="ref_logp"):
        grpo_loss(logp, logp, torch.ones(1), torch.ones(1, 2), GRPOLossConfig(beta=0.1))


def test_aggregate_modes_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(v, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate(v, mask, "seq_mean_token_mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(v, mask, "seq_sum_const", 4).item() == pytest.approx(7 / 8)
    with pytest.raises(ConfigError, match="grpo.loss_agg"):
        aggregate(v, mask, "mean")


def test_dynamic_sampling_drops_uniform_groups():
    r = torch.tensor([1.0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    keep = dynamic_sampling_keep(r, 4)
    assert keep.tolist() == [True] * 4 + [False] * 8


@pytest.mark.parametrize(
    "kwargs, key",
    [({"clip_low": 1.5}, "grpo.clip_low"), ({"clip_high": 0}, "grpo.clip_high"), ({"beta": -1}, "grpo.beta"),
     ({"loss_agg": "sum"}, "grpo.loss_agg"), ({"max_len": 0}, "grpo.max_len")],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        GRPOLossConfig(**kwargs).validate()
