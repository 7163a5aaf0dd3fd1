"""CombinedOptimizer: one object steps Muon + AdamW; its name-keyed state round-trips bit-exactly."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.errors import MoeforgeError
from optim import build_optimizer
from tests.optim.v4_tree import v4_tree


def fake_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def train(model, opt, seeds):
    for s in seeds:
        fake_grads(model, s)
        opt.step()
        opt.zero_grad()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_steps_both_and_zero_grad():
    model = v4_tree()
    opt, _ = build_optimizer(model, {"name": "muon"})
    before = params(model)
    fake_grads(model, 0)
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.set_lr_factor(0.5)
    assert all(g["lr"] == 0.5 * g["base_lr"] for g in opt.param_groups)


def test_flat_state_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = v4_tree()
    opt, _ = build_optimizer(model, {"name": "muon", "lr": 1e-2})
    train(model, opt, [1, 2])
    opt.set_lr_factor(0.7)
    tensors, meta = opt.flat_state_dict()
    assert "muon/layers.1.ffn.experts.w2/momentum_buffer" in tensors
    assert "adamw/embed.weight/exp_avg_sq" in tensors
    save_file(tensors, str(tmp_path / "optim.safetensors"))
    (tmp_path / "optim.json").write_text(json.dumps(meta))
    saved_params = params(model)

    model2 = v4_tree()
    model2.load_state_dict(model.state_dict())
    opt2, _ = build_optimizer(model2, {"name": "muon", "lr": 1e-2})
    opt2.load_flat_state_dict(load_file(str(tmp_path / "optim.safetensors")),
                              json.loads((tmp_path / "optim.json").read_text()))
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    train(model, opt, [3, 4])
    train(model2, opt2, [3, 4])
    for n, p in model2.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n]), n
        assert not torch.equal(p, saved_params[n]), n


def test_layout_change_exact_steps():
    """Parameters registered in another order (other indices) load by name and step identically."""
    model = v4_tree()
    opt, _ = build_optimizer(model, {"name": "muon"})
    train(model, opt, [1])
    tensors, meta = opt.flat_state_dict()
    model2 = v4_tree()
    model2.load_state_dict(model.state_dict())
    model2._modules = dict(reversed(list(model2._modules.items())))
    assert [n for n, _ in model2.named_parameters()] != [n for n, _ in model.named_parameters()]
    opt2, _ = build_optimizer(model2, {"name": "muon"})
    opt2.load_flat_state_dict(tensors, meta)
    fake_grads(model, 9)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in model2.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    opt2.step()
    p1 = dict(model.named_parameters())
    for n, p in model2.named_parameters():
        assert torch.equal(p, p1[n]), n


def test_unknown_names_refused():
    model = v4_tree()
    opt, _ = build_optimizer(model, {"name": "muon"})
    train(model, opt, [1])
    tensors, meta = opt.flat_state_dict()
    model2 = v4_tree(with_mtp=False)
    opt2, _ = build_optimizer(model2, {"name": "muon"})
    with pytest.raises(MoeforgeError, match="mtp.0"):
        opt2.load_flat_state_dict(tensors, meta)
    opt2.load_flat_state_dict(tensors, meta, strict=False)


def test_torch_state_dict_round_trip():
    model = v4_tree()
    opt, _ = build_optimizer(model, {"name": "muon"})
    train(model, opt, [1])
    model2 = v4_tree()
    model2.load_state_dict(model.state_dict())
    opt2, _ = build_optimizer(model2, {"name": "muon"})
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares state tensors otherwise
    train(model, opt, [2])
    train(model2, opt2, [2])
    p1 = dict(model.named_parameters())
    assert all(torch.equal(p, p1[n]) for n, p in model2.named_parameters())
