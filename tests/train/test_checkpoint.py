"""Checkpoint round trip, atomicity, keep-last-N and corruption errors."""

import random
import shutil

import numpy as np
import pytest
import torch

from model.errors import MoeforgeError
from optim import CombinedOptimizer
from train import checkpoint, rng


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _optimizer(net, lrs=(1e-2, 3e-3)):
    """The project's optimizer object (name-keyed state) over two AdamW groups."""
    groups = [{"params": list(net[i].parameters()), "label": f"g{i}", "lr": lr,
               "names": [f"{i}.{n}" for n, _ in net[i].named_parameters()]} for i, lr in zip((0, 2), lrs)]
    return CombinedOptimizer({"adamw": torch.optim.AdamW(groups)})


def _trained(steps=3):
    net = _net()
    opt = _optimizer(net)
    for _ in range(steps):
        _step(net, opt)
    return net, opt


def _step(net, opt):
    loss = net(torch.randn(4, 6)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    net, opt = _trained()
    path = checkpoint.save(tmp_path, 3, net, opt, state={"data": {"position": 12}}, config={"a": 1},
                           tokenizer_hash="abc")
    assert path == tmp_path / "step-3" and not list(tmp_path.glob(".tmp-*"))
    x_after = (random.random(), np.random.rand(), torch.rand(3))

    net2 = _net(seed=1)
    opt2 = _optimizer(net2, lrs=(5.0, 5.0))
    ck = checkpoint.load(path, net2, opt2)
    assert (ck.step, ck.state, ck.config) == (3, {"data": {"position": 12}}, {"a": 1})
    assert ck.tokenizer_hash == "abc"
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt2.param_groups] == [1e-2, 3e-3]
    rng.restore(ck.rng)
    x_again = (random.random(), np.random.rand(), torch.rand(3))
    assert x_after[:2] == x_again[:2] and torch.equal(x_after[2], x_again[2])

    torch.manual_seed(7)
    _step(net, opt)
    torch.manual_seed(7)
    _step(net2, opt2)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_keep_last_n_and_find_latest_skips_incomplete(tmp_path):
    net, opt = _trained(1)
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, net, opt, keep=2)
    assert [s for s, _ in checkpoint.checkpoint_dirs(tmp_path)] == [3, 4]
    # a crash mid-write leaves a temporary dir; a dir without a manifest is not complete either
    shutil.copytree(tmp_path / "step-4", tmp_path / ".tmp-step-9")
    shutil.copytree(tmp_path / "step-4", tmp_path / "step-8")
    (tmp_path / "step-8" / checkpoint.MANIFEST).unlink()
    assert checkpoint.find_latest(tmp_path) == tmp_path / "step-4"
    assert checkpoint.find_latest(tmp_path / "nothing-here") is None
    checkpoint.save(tmp_path, 5, net, opt, keep=2)
    assert not (tmp_path / ".tmp-step-9").exists()
    assert checkpoint.find_latest(tmp_path) == tmp_path / "step-5"


@pytest.mark.parametrize("victim", [checkpoint.MODEL_FILE, checkpoint.OPTIM_FILE, checkpoint.MANIFEST])
def test_flipped_byte_names_the_file(tmp_path, victim):
    net, opt = _trained(1)
    path = checkpoint.save(tmp_path, 1, net, opt)
    target = path / victim
    data = bytearray(target.read_bytes())
    i = len(data) // 2
    data[i] = data[i] ^ 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(MoeforgeError, match=str(target)):
        checkpoint.load(path, _net(), None)


@pytest.mark.parametrize("victim", [checkpoint.MODEL_FILE, checkpoint.OPTIM_FILE, checkpoint.MANIFEST])
def test_missing_file_names_the_file(tmp_path, victim):
    net, opt = _trained(1)
    path = checkpoint.save(tmp_path, 1, net, opt)
    (path / victim).unlink()
    with pytest.raises(MoeforgeError, match=f"{path / victim} is missing"):
        checkpoint.load(path, _net(), None)


def test_wrong_model_names_the_file(tmp_path):
    net, opt = _trained(1)
    path = checkpoint.save(tmp_path, 1, net, opt)
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    with pytest.raises(MoeforgeError, match=f"{path / checkpoint.MODEL_FILE} does not fit"):
        checkpoint.load(path, other)
