"""Routing-bias update: b_i += speed * sign(mean load - load_i), hash layers skipped, MTP last."""

import pytest
import torch

from model.errors import MoeforgeError
from optim.balance import RoutingBiasUpdater, routing_bias_buffers
from tests.optim.v4_tree import v4_tree


def test_finds_learned_layers_in_order():
    names = [n for n, _ in routing_bias_buffers(v4_tree())]
    assert names == ["layers.1.ffn.gate.bias", "mtp.0.ffn.gate.bias"]


def test_mtp_after_main_even_if_registered_first():
    model = v4_tree()
    model._modules = {"mtp": model._modules.pop("mtp"), **model._modules}
    assert [n for n, _ in routing_bias_buffers(model)] == ["layers.1.ffn.gate.bias", "mtp.0.ffn.gate.bias"]


def test_hand_computed_update():
    model = v4_tree()
    model.mtp[0].ffn.gate.bias.fill_(0.5)
    loads = torch.tensor([[10.0, 2.0, 6.0, 6.0], [0.0, 8.0, 1.0, 3.0]])  # means 6 and 3
    updater = RoutingBiasUpdater(model, speed=0.001)
    updater(loads)
    torch.testing.assert_close(model.layers[1].ffn.gate.bias, torch.tensor([-0.001, 0.001, 0.0, 0.0]))
    torch.testing.assert_close(model.mtp[0].ffn.gate.bias, torch.tensor([0.501, 0.499, 0.501, 0.5]))
    updater(loads)
    torch.testing.assert_close(model.layers[1].ffn.gate.bias, torch.tensor([-0.002, 0.002, 0.0, 0.0]))


def test_wrong_shape_refused():
    with pytest.raises(MoeforgeError, match="learned-routing"):
        RoutingBiasUpdater(v4_tree()).update(torch.ones(3, 4))


def test_speed_zero_is_a_no_op():
    model = v4_tree()
    RoutingBiasUpdater(model, speed=0.0)(torch.tensor([[1.0, 9.0, 0.0, 2.0]] * 2))
    assert all((b == 0).all() for _, b in routing_bias_buffers(model))
