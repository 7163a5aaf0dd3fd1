"""Auxiliary-loss-free load balancing: after each optimizer step, b_i += speed * sign(mean load - load_i).

The biases are the `ffn.gate.bias` buffers of the learned-routing MoE layers (hash layers have none), in
the order of the loads tensor: main-model layers in module order, then the MTP layers.
"""

from __future__ import annotations

import torch
from torch import nn

from model.errors import MoeforgeError

BIAS_SUFFIX = "ffn.gate.bias"


def routing_bias_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, bias buffer) of every learned-routing layer: main layers in module order, then `mtp.*`."""
    found = [(n, b) for n, b in model.named_buffers() if n == BIAS_SUFFIX or n.endswith("." + BIAS_SUFFIX)]
    return [x for x in found if not x[0].startswith("mtp.")] + [x for x in found if x[0].startswith("mtp.")]


class RoutingBiasUpdater:
    """Call `update(loads)` once per optimizer step with the step's expert loads [n_layers, E].

    `loads` are token counts summed over micro-batches (and all-reduced over ranks by the caller).
    """

    def __init__(self, model: nn.Module, speed: float = 0.001):
        if speed < 0:
            raise MoeforgeError(f"optim.bias_update_speed must be >= 0, got {speed}")
        self.speed = speed
        self.buffers = routing_bias_buffers(model)

    @torch.no_grad()
    def update(self, loads: torch.Tensor) -> None:
        if not self.buffers:
            return
        expected = (len(self.buffers), self.buffers[0][1].numel())
        if tuple(loads.shape) != expected:
            raise MoeforgeError(
                f"expert loads have shape {tuple(loads.shape)}, but the model has {expected[0]} "
                f"learned-routing layers with {expected[1]} experts ({', '.join(n for n, _ in self.buffers)})"
            )
        loads = loads.detach().float()
        delta = self.speed * torch.sign(loads.mean(dim=1, keepdim=True) - loads)
        for (_, bias), d in zip(self.buffers, delta):
            bias.add_(d.to(device=bias.device, dtype=bias.dtype))

    __call__ = update
