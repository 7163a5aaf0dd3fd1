"""Expert parallelism: experts sharded over the `ep` axis, tokens dispatched and combined with
`all_to_all_single` (uneven splits) behind a `Dispatcher` interface, so that DeepEP can be added later.

`ExpertParallel` replaces a model's `ffn.experts` (same call signature and parameter names `w1/w2/w3`,
holding the experts [offset, offset + local) whole); the model code stays free of process groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.moe import Experts, swiglu
from train.parallel.env import collective


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with split sizes; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    with collective(f"all_to_all_single(ep, send {send_splits}, recv {recv_splits})"):
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


@dataclass
class DispatchHandle:
    """What combine needs to undo a dispatch."""

    token_N: torch.Tensor  # source token of each sent row (rows sorted by global expert)
    send_splits: list[int]
    recv_splits: list[int]
    local_expert_M: torch.Tensor  # local expert of each received row
    local_counts: list[int]  # received rows per local expert


class Dispatcher:
    """Interface: `dispatch` sends each (token, expert) pair to the expert's rank; `combine` brings the
    expert outputs back in the order of the dispatch (weights are applied by the caller)."""

    def dispatch(self, x_ND: torch.Tensor, indices_NK: torch.Tensor) -> tuple[torch.Tensor, DispatchHandle]:
        raise NotImplementedError

    def combine(self, y_MD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        raise NotImplementedError


class AllToAllDispatcher(Dispatcher):
    """Experts [r * local, (r + 1) * local) live on ep rank r; two all_to_all_single calls per direction."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group, self.n_experts = group, n_experts
        self.ep = dist.get_world_size(group)
        self.local = n_experts // self.ep

    def dispatch(self, x_ND, indices_NK):
        flat = indices_NK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts_E = torch.bincount(flat, minlength=self.n_experts)
        recv_counts = all_to_all(counts_E, [self.local] * self.ep, [self.local] * self.ep, self.group)
        send_splits = counts_E.view(self.ep, self.local).sum(1).tolist()
        recv_SL = recv_counts.view(self.ep, self.local)
        recv_splits = recv_SL.sum(1).tolist()
        token = order // indices_NK.shape[1]
        received = _AllToAll.apply(x_ND[token], send_splits, recv_splits, self.group)
        experts = torch.arange(self.local, device=x_ND.device).repeat(self.ep)
        local_expert = torch.repeat_interleave(experts, recv_SL.reshape(-1))
        handle = DispatchHandle(token, send_splits, recv_splits, local_expert, recv_SL.sum(0).tolist())
        return received, handle

    def combine(self, y_MD, handle):
        return _AllToAll.apply(y_MD, handle.recv_splits, handle.send_splits, self.group)


class ExpertParallel(nn.Module):
    """This rank's whole experts w1/w3 [local, I, d], w2 [local, d, I]; forward = `Experts.forward`."""

    def __init__(self, experts: Experts, dispatcher: Dispatcher, ep_rank: int):
        super().__init__()
        n = experts.w1.shape[0]
        self.limit, self.n_experts = experts.limit, n
        self.dispatcher = dispatcher
        self.local = n // dispatcher.ep
        self.offset = ep_rank * self.local
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            part = full.detach()[self.offset : self.offset + self.local].clone()
            setattr(self, name, nn.Parameter(part, requires_grad=full.requires_grad))

    def forward(self, x_ND, indices_NK, weights_NK):
        received, handle = self.dispatcher.dispatch(x_ND, indices_NK)
        order = torch.argsort(handle.local_expert_M, stable=True)
        grouped = received[order]
        outs, start = [], 0
        for e, n in enumerate(handle.local_counts):
            outs.append(swiglu(grouped[start : start + n], self.w1[e], self.w3[e], self.w2[e], self.limit))
            start += n
        y = torch.cat(outs)[torch.argsort(order)] if outs else received
        back = self.dispatcher.combine(y, handle)
        w = weights_NK.reshape(-1)[torch.argsort(indices_NK.reshape(-1), stable=True)]
        out = torch.zeros_like(x_ND)
        return out.index_add(0, handle.token_N, (back * w[:, None]).to(out.dtype))


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup, ep_rank: int) -> int:
    """Swap every `Experts` module under `model` for an `ExpertParallel` shard; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Experts):
                dispatcher = AllToAllDispatcher(group, child.w1.shape[0])
                setattr(module, name, ExpertParallel(child, dispatcher, ep_rank))
                swapped += 1
    return swapped
