"""Muon as in DeepSeek-V4: Nesterov momentum, hybrid Newton-Schulz per logical matrix, RMS-matched update.

Per parameter W (a matrix, or a stack [..., rows, cols] such as experts [E, out, in]) with gradient G:

    M <- mu M + G;  U = mu M + G (Nesterov) or M
    O = NS(U_block) * sqrt(max(rows_block, cols)) * update_rms      for each row block of each matrix
    W <- W (1 - lr wd) - lr O

A param group may carry `row_splits` (row counts of the logical blocks along dim -2, e.g. (4, 4, 16) for
an mHC `fn`); each block is orthogonalised on its own. Every leading index (expert) is independent.
"""

from __future__ import annotations

import math

import torch

from model.errors import ConfigError, MoeforgeError
from optim.batched import check_splits, orthogonalize_many
from optim.newton_schulz import hybrid_schedule, newton_schulz

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # torch built without distributed support
    DTensor, Replicate = None, None


def resolve_ns_dtype(ns_dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on GPU, fp32 on CPU; also accepts `bf16`, `fp32` or a torch dtype."""
    if isinstance(ns_dtype, torch.dtype):
        return ns_dtype
    table = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if ns_dtype not in table:
        raise ConfigError("optim.ns_dtype", f"expected auto, bf16 or fp32, got {ns_dtype!r}")
    return table[ns_dtype]


def check_whole_matrix(p: torch.Tensor, name: str) -> None:
    """Muon needs every matrix whole: refuse shards (DTensor with any non-Replicate placement) and vectors."""
    if DTensor is not None and isinstance(p, DTensor):
        partial = [pl for pl in p.placements if not isinstance(pl, Replicate)]
        if partial:
            raise MoeforgeError(
                f"Muon got parameter {name!r} as a DTensor with placements {p.placements}: it sees only a "
                "shard, and orthogonalising a shard is wrong. Use optim=adamw or a replicated layout; "
                "distributed Muon is not implemented yet."
            )
    if p.ndim < 2:
        raise MoeforgeError(f"Muon needs a matrix, but parameter {name!r} has shape {tuple(p.shape)}")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def orthogonalized_update(
    u: torch.Tensor,
    row_splits: tuple[int, ...] | None,
    update_rms: float,
    coeffs: tuple[tuple[float, float, float], ...],
    ns_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference: NS of every row block of every matrix in u, one 2-D matrix at a time, each scaled by
    sqrt(max(block rows, cols)) * update_rms. `optim.batched.orthogonalize_many` is the fast twin."""
    splits = check_splits(u.shape, row_splits)
    cols = u.shape[-1]
    mats = u.reshape(-1, u.shape[-2], cols)
    out = torch.empty_like(mats)
    for i, mat in enumerate(mats):
        start = 0
        for r in splits:
            scale = math.sqrt(max(r, cols)) * update_rms
            out[i, start : start + r] = newton_schulz(mat[start : start + r], coeffs, ns_dtype) * scale
            start += r
    return out.reshape(u.shape)


class Muon(torch.optim.Optimizer):
    """Muon for whole matrices and stacks of matrices; see the module docstring for the update.

    Group options: lr, weight_decay, momentum, nesterov, update_rms, row_splits, ns_dtype. `ns_coeffs` is
    the list of (a, b, c) per Newton-Schulz step (default: V4's 8 + 2 hybrid schedule). With
    `batched=True` all same-shape blocks of all parameters go through Newton-Schulz as one batch
    (`orthogonalize_many`); `batched=False` uses the per-matrix reference loop.
    """

    def __init__(
        self,
        params,
        lr: float = 2.7e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        update_rms: float = 0.18,
        ns_coeffs: tuple[tuple[float, float, float], ...] | None = None,
        ns_dtype: str = "auto",
        row_splits: tuple[int, ...] | None = None,
        batched: bool = True,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or update_rms <= 0:
            raise MoeforgeError(
                f"Muon: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1, update_rms > 0; got lr={lr}, "
                f"weight_decay={weight_decay}, momentum={momentum}, update_rms={update_rms}"
            )
        coeffs = tuple(tuple(float(v) for v in c) for c in (ns_coeffs or hybrid_schedule()))
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            update_rms=update_rms,
            ns_coeffs=coeffs,
            ns_dtype=ns_dtype,
            row_splits=row_splits,
        )
        super().__init__(params, defaults)
        self.batched = batched
        self._check_params()

    def _check_params(self) -> None:
        for group in self.param_groups:
            names = group.get("names") or [f"<param {i}>" for i in range(len(group["params"]))]
            for p, name in zip(group["params"], names):
                self._check_param(p, name)

    def _check_param(self, p: torch.Tensor, name: str) -> None:
        check_whole_matrix(p, name)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_params()  # parallelism applied after construction must not slip shards in
        jobs = []  # (weight, u, group)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            jobs += zip(params, self._momentum(params, group), [group] * len(params))
        self._apply(jobs, self._updates(jobs))
        return loss

    def _momentum(self, params: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Update the group's momentum buffers with this step's gradients (one multi-tensor kernel per
        operation); returns U of each parameter (Nesterov or plain)."""
        if not params:
            return []
        grads, bufs = [_local(p.grad) for p in params], []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)  # a DTensor like p: checkpoints see it whole
            bufs.append(_local(state["momentum_buffer"]))
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        return torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs

    def _updates(self, jobs: list) -> list[torch.Tensor]:
        """The orthogonalised update of each (weight, u, group) job."""
        return self._orthogonalize([(u, g) for _, u, g in jobs])

    def _orthogonalize(self, items: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
        specs = [(u, g["row_splits"], g["update_rms"], g["ns_coeffs"],
                  resolve_ns_dtype(g["ns_dtype"], u.device)) for u, g in items]
        return orthogonalize_many(specs) if self.batched else [orthogonalized_update(*s) for s in specs]

    def _apply(self, jobs: list, updates: list[torch.Tensor]) -> None:
        """W <- W (1 - lr wd) - lr O, one multi-tensor kernel per operation and group."""
        groups: dict[int, tuple[dict, list, list]] = {}
        for (p, _, group), o in zip(jobs, updates):
            w = _local(p)
            _, ws, outs = groups.setdefault(id(group), (group, [], []))
            ws.append(w)
            outs.append(o.to(w.dtype))
        for group, ws, outs in groups.values():
            torch._foreach_mul_(ws, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(ws, outs, alpha=-group["lr"])
