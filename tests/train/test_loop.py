"""The Trainer on a tiny model: accumulation and recompute equal their plain twins; the NaN guard."""

import pytest
import torch

from model.errors import MoeforgeError
from train.config import validate
from train.loop import Trainer, expert_balance
from train.pretrain import build_data

from .conftest import TINY


@pytest.fixture
def make_trainer(compose_cfg, tmp_path):
    def _make(*overrides):
        cfg = validate(compose_cfg(*TINY, "trainer.max_steps=20", *overrides))
        return Trainer(cfg, tmp_path, build_data)

    return _make


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_grad_accumulation_equals_one_big_batch(make_trainer):
    big = make_trainer("trainer.batch_size=2", "trainer.grad_accum=1")
    acc = make_trainer("trainer.batch_size=1", "trainer.grad_accum=2")
    sa = big.accumulate([big.data.train.next_batch()], 0.3)
    sb = acc.accumulate([acc.data.train.next_batch(), acc.data.train.next_batch()], 0.3)
    for key in ("loss", "mtp_loss", "balance_loss", "expert_loads"):
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-8, msg=key)
    scale = max(p.grad.abs().max().item() for p in big.model.parameters() if p.grad is not None)
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
    big.optimizer.zero_grad()
    record = big.train_step()  # the full step on top: one record with the step's numbers
    assert record["step"] == 1 and big.data.train.position == 4


def test_activation_checkpointing_changes_nothing(make_trainer):
    plain = make_trainer()
    recompute = make_trainer("trainer.activation_checkpointing=true")
    ra, rb = plain.train_step(), recompute.train_step()
    assert ra["loss"] == rb["loss"]
    pa, pb = _params(plain), _params(recompute)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["mhc", "blocks"])
def test_compiled_parts_train_like_eager(make_trainer, what):
    """trainer.compile=mhc and =blocks (Inductor) give the eager gradients and, over two steps, the eager
    losses, and compile at most two graphs per compiled function for all layers (shared functions, not one
    compilation per module: v4-tiny's blocks alone would give more). Parameters
    are not compared: AdamW's normalised step turns float-rounding differences of near-zero gradients
    into visible ones."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plain = make_trainer()
    compiled = make_trainer(f"trainer.compile={what}")
    for t in (plain, compiled):
        t.accumulate([t.data.train.next_batch()], 0.3)
    scale = max(p.grad.abs().max().item() for p in plain.model.parameters() if p.grad is not None)
    for (name, p), q in zip(plain.model.named_parameters(), compiled.model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
    for t in (plain, compiled):
        t.optimizer.zero_grad()
    for _ in range(2):
        ra, rb = plain.train_step(), compiled.train_step()
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    from train.compile import BLOCK_METHODS

    functions = 4 + (len(BLOCK_METHODS) if what == "blocks" else 0)  # hc_pre, hc_post, collapse, norm
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 * functions, dict(counters["stats"])


def test_nan_steps_are_skipped_then_rolled_back(make_trainer, tmp_path):
    t = make_trainer("trainer.spike.max_bad_steps=2")
    t.train_step()
    t.train_step()
    t.save()
    good = _params(t)
    with torch.no_grad():
        t.model.head.weight[0, 0] = float("nan")  # a real NaN through the real model
    first = t.train_step()
    assert first["skipped"] == "skip" and t.step == 3
    position = t.data.train.position
    second = t.train_step()
    assert second["skipped"] == "rollback" and second["rolled_back_to"] == 2 and t.step == 2
    assert t.data.train.position == position + 2  # the batches that went bad are not replayed
    for name, p in _params(t).items():
        assert torch.equal(p, good[name]), name
    assert "skipped" not in t.train_step()


def test_divergence_without_checkpoint_is_an_error(make_trainer):
    t = make_trainer("trainer.spike.max_bad_steps=1")
    with torch.no_grad():
        t.model.embed.weight.fill_(float("inf"))
    with pytest.raises(MoeforgeError, match="no checkpoint to roll back to"):
        t.train_step()


def test_expert_balance():
    assert expert_balance(torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])) == [1.0, 4.0]
