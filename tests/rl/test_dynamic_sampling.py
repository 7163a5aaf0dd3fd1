"""DAPO dynamic sampling with refill (rl.dynamic_sampling) on hand-made rounds, and rollout concatenation
against per-part training passes on a real model (routing replay included)."""

import pytest
import torch
from omegaconf import OmegaConf

from launch.compose import CONFIG_DIR
from model import ModelConfig, Transformer
from model.errors import ConfigError
from rl.config import GRPOConfig
from rl.dynamic_sampling import GroupCollector
from rl.grpo_loss import group_advantages
from rl.rollout import Rollout, SamplingConfig, concat_rollouts, generate, token_logprobs

G = 2


def hand_round(tag: int, n_groups: int, width: int = 3) -> Rollout:
    """A rollout of `n_groups` groups whose prompt ids say (round tag, row)."""
    b = n_groups * G
    tokens = torch.arange(b * width).view(b, width) + 100 * tag
    return Rollout([[tag, i] for i in range(b)], tokens, torch.zeros(b, width), torch.ones(b, width),
                   torch.ones(b, dtype=torch.bool))


def test_refill_collects_informative_groups_in_order_and_truncates():
    c = GroupCollector(3, G)
    rounds = [torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]),  # equal, kept, equal
              torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),  # kept, equal, kept
              torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])]  # never needed
    added, sizes = [], []
    for tag, rewards in enumerate(rounds):
        sizes.append(c.next_round_size())
        added.append(c.add(hand_round(tag, 3), rewards))
        if c.full:
            break
    assert added == [1, 2] and c.full and c.next_round_size() == 0
    assert sizes == [3, 3]  # 2 groups missing at 1 informative in 3: 6 prompts wanted, capped at 3
    assert c.stats() == {"sampling_rounds": 2, "groups_sampled": 6, "groups_dropped": 3, "groups_refilled": 2,
                         "groups_trained": 3}
    roll, adv = c.batch()
    assert roll.prompts == [[0, 2], [0, 3], [1, 0], [1, 1], [1, 4], [1, 5]]
    expected = torch.cat([group_advantages(rounds[0], G)[2:4], group_advantages(rounds[1], G)[[0, 1, 4, 5]]])
    torch.testing.assert_close(adv, expected)
    assert torch.equal(roll.tokens[2], torch.arange(3) + 100)

    over = GroupCollector(1, G)  # a round with more informative groups than needed: the first ones
    assert over.add(hand_round(0, 3), torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0])) == 1
    assert over.batch()[0].prompts == [[0, 0], [0, 1]] and over.stats()["groups_dropped"] == 0


def test_without_dropping_every_group_is_kept_and_nothing_kept_gives_no_batch():
    keep_all = GroupCollector(3, G, drop_equal=False, scale_by_std=False)
    keep_all.add(hand_round(0, 3), torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]))
    roll, adv = keep_all.batch()
    assert keep_all.full and len(roll.prompts) == 6
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -0.5, 0.5, 0.0, 0.0]))
    none = GroupCollector(2, G)
    none.add(hand_round(0, 2), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert not none.full and none.batch() == (None, None) and none.stats()["groups_dropped"] == 2
    assert none.next_round_size() == 2  # nothing informative yet: a whole batch


def test_refill_rounds_ask_for_what_the_missing_groups_need():
    c = GroupCollector(8, G)
    assert c.next_round_size() == 8
    c.add(hand_round(0, 8), torch.tensor([0.0, 1.0] * 6 + [1.0, 1.0] * 2))  # 6 of 8 informative
    assert c.groups == 6 and c.next_round_size() == 3  # 2 missing / (6 / 8) = 2.67 -> 3
    c.add(hand_round(1, 3), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))  # none informative
    assert c.next_round_size() == 4  # 2 missing at 6 in 11 -> 3.67 -> 4


def test_refill_cap_is_validated():
    with pytest.raises(ConfigError, match="grpo.max_refill_rounds"):
        GRPOConfig(max_refill_rounds=-1).validate()
    with pytest.raises(ConfigError, match="grpo.eval_samples"):
        GRPOConfig(eval_samples=4).validate()  # greedy evaluation has one response per task


@pytest.fixture(scope="module")
def model():
    d = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "v4-tiny.yaml"))
    d.update(vocab_size=300, num_hidden_layers=2, num_nextn_predict_layers=0,
             layer_types=["sliding_attention", "compressed_sparse_attention"],
             mlp_layer_types=["hash_moe", "moe"], initializer_range=0.2)
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_dict(d)).eval()


def test_concatenated_rollouts_give_the_parts_log_probs_with_routing_replay(model):
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, record_routing=True, stop_ids=(7,))
    gen = torch.Generator().manual_seed(0)
    short = generate(model, [[11, 12, 13], [14, 15, 16]], cfg, gen)
    long = generate(model, [[20 + i for i in range(9)], [40, 41, 42, 43, 44, 45]], cfg, gen)
    both = concat_rollouts([short, long])
    assert both.routing[0].shape[1] == both.sequences()[0].shape[1] - 1
    with torch.no_grad():
        joint = token_logprobs(model, both, replay=True)[0]
        parts = torch.cat([token_logprobs(model, r, replay=True)[0] for r in (short, long)])
    torch.testing.assert_close(joint, parts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint, torch.cat([short.logp, long.logp]), atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="routing"):
        concat_rollouts([short, generate(model, [[1, 2]], SamplingConfig(max_new_tokens=2), gen)])
