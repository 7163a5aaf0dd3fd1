"""DeepSeekMoE: learned (sqrt-softplus, selection-only bias) or hash routing, stacked + shared experts."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import HASH_MOE, ModelConfig
from model.errors import MoeforgeError


def score_fn(logits: torch.Tensor, name: str) -> torch.Tensor:
    if name == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if name == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, limit: float):
    """w2(silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit))."""
    gate = F.linear(x, w1).clamp(max=limit)
    up = F.linear(x, w3).clamp(min=-limit, max=limit)
    return F.linear(F.silu(gate) * up, w2)


def make_tid2eid(vocab: int, n_experts: int, k: int, seed: int) -> torch.Tensor:
    """Frozen hash table [V, k]: k distinct, uniformly random experts per token id, fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    rows = [
        torch.rand(min(4096, vocab - i), n_experts, generator=gen).topk(k, dim=-1).indices
        for i in range(0, vocab, 4096)
    ]
    return torch.cat(rows).long()


@dataclass
class Routing:
    """What one MoE layer decided, for the balance loss and the bias update."""

    indices_NK: torch.Tensor
    scores_NE: torch.Tensor  # unbiased router scores (score_fn of the logits)
    learned: bool


class Gate(nn.Module):
    """Router: `weight` [E, d]; `bias` [E] fp32 selection bias (learned layers) or `tid2eid` [V, k] (hash)."""

    def __init__(self, config: ModelConfig, is_hash: bool):
        super().__init__()
        self.is_hash, self.top_k = is_hash, config.num_experts_per_tok
        self.score_func, self.route_scale = config.scoring_func, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if is_hash:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor, ids_N: torch.Tensor | None, replay_NK: torch.Tensor | None = None):
        """(weights [N, k], indices [N, k], scores [N, E]); weights are renormalised and scaled.

        `replay_NK`: use these expert choices (router replay); the weights still come from current scores.
        """
        scores = score_fn(F.linear(x_ND.float(), self.weight.float()), self.score_func)
        if replay_NK is not None:
            indices = replay_NK.long()
        elif self.is_hash:
            if ids_N is None:
                raise ValueError("hash-routed layers need input_ids")
            indices = self.tid2eid[ids_N].long()
        else:
            indices = torch.topk(scores + self.bias.float(), self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


def expert_counts(flat_indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows per expert [E] (long), on the indices' device without a host sync (CUDA `bincount` syncs)."""
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat_indices.device)
    return counts.scatter_add_(0, flat_indices, torch.ones_like(flat_indices))


def autocast_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows in the autocast dtype when autocast is on for their device: autocast leaves the gathered rows
    in fp32, and the grouped path wants them in the low-precision dtype its products run in."""
    device = rows.device.type
    if rows.is_floating_point() and torch.is_autocast_enabled(device):
        return rows.to(torch.get_autocast_dtype(device))
    return rows


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward for `dtype` on this kind of device (probed once
    on tiny operands: CUDA support depends on the GPU and the build, CPU support on the torch version)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            x = torch.ones(16, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            y.backward(torch.ones_like(y))
        return bool(torch.equal(y, torch.full_like(y, 16.0)))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


class Experts(nn.Module):
    """Routed experts stored stacked: w1/w3 [E, I, d], w2 [E, d, I]."""

    def __init__(self, n: int, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Parameter(torch.empty(n, inter, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter))
        self.w3 = nn.Parameter(torch.empty(n, inter, dim))

    def forward(
        self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor, impl: str | None = None
    ) -> torch.Tensor:
        """Sort (token, slot) pairs by expert, run each expert on its rows, scatter back weighted.

        `impl`: "grouped" (`torch._grouped_mm`, no host sync) or "loop" (reference, one sync for the counts);
        default: grouped where usable (bf16 rows, e.g. under a bf16 autocast; `grouped_usable`).
        """
        flat = indices_NK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = expert_counts(flat, self.w1.shape[0])
        token = order // indices_NK.shape[1]
        rows = autocast_rows(x_ND.index_select(0, token))
        impl = impl or ("grouped" if self.grouped_usable(rows) else "loop")
        if impl == "grouped":
            y = self.grouped(rows, torch.cumsum(counts, 0).to(torch.int32))
        else:
            y = self.loop(rows, counts.tolist())
        y = y * weights_NK.reshape(-1).index_select(0, order).unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token, y.to(x_ND.dtype))

    def grouped_usable(self, rows: torch.Tensor) -> bool:
        """bf16 rows (the autocast dtype) whose matrix rows are 16-byte aligned, on a device where
        `torch._grouped_mm` runs; fp32 stays on the loop (the reference)."""
        aligned = all(n * rows.element_size() % 16 == 0 for n in self.w2.shape[1:])
        return rows.dtype == torch.bfloat16 and aligned and grouped_mm_supported(rows.device.type, rows.dtype)

    def loop(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Reference: one SwiGLU per expert on its contiguous block of rows."""
        outs, start = [], 0
        for e, n in enumerate(counts):
            outs.append(swiglu(rows[start : start + n], self.w1[e], self.w3[e], self.w2[e], self.limit))
            start += n
        return torch.cat(outs) if outs else rows.new_zeros(0, self.w2.shape[1])

    def grouped(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """The same with two `torch._grouped_mm` calls, w1 and w3 stacked (offs: cumulative row ends, int32)."""
        w13 = torch.cat([self.w1, self.w3], dim=1).to(rows.dtype)  # [E, 2I, d]: both products in one
        gate, up = torch._grouped_mm(rows, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        act = F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)
        return torch._grouped_mm(act, self.w2.to(rows.dtype).transpose(-2, -1), offs=offs)


class SharedExpert(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1.weight, self.w3.weight, self.w2.weight, self.limit)


class MoE(nn.Module):
    """Routed experts (top-k) plus one always-on shared expert; both use the clamped SwiGLU."""

    def __init__(self, config: ModelConfig, mlp_type: str):
        super().__init__()
        d, inter, limit = config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
        self.gate = Gate(config, mlp_type == HASH_MOE)
        self.experts = Experts(config.n_routed_experts, d, inter, limit)
        self.shared_experts = SharedExpert(d, inter, limit)

    def forward(
        self, x_BSD: torch.Tensor, input_ids_BS: torch.Tensor | None, replay_BSK: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing]:
        flat = x_BSD.reshape(-1, x_BSD.shape[-1])
        ids = input_ids_BS.reshape(-1) if input_ids_BS is not None else None
        replay = None
        if replay_BSK is not None:
            if replay_BSK.shape != (*x_BSD.shape[:2], self.gate.top_k):
                raise MoeforgeError(
                    f"routing replay: expected expert ids of shape {(*x_BSD.shape[:2], self.gate.top_k)}, "
                    f"got {tuple(replay_BSK.shape)}"
                )
            replay = replay_BSK.reshape(-1, self.gate.top_k).to(flat.device)
        weights, indices, scores = self.gate(flat, ids, replay)
        routed = self.experts(flat, indices, weights.to(flat.dtype)).view_as(x_BSD)
        return routed + self.shared_experts(x_BSD), Routing(indices, scores, not self.gate.is_hash)
