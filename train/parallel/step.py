"""`ParallelModel`: this rank's part of the model and one step's forward/backward over the global batch.

Loss parts and expert loads come back already reduced: loss parts summed over dp and pp (so every rank
reports the global-batch value), expert loads summed over dp for the layers this rank holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from optim import RoutingBiasUpdater
from train.parallel.env import collective, comm_device
from train.parallel.grads import clip_, grad_norm
from train.parallel.layout import Layout
from train.parallel.loss import (
    LossParts,
    global_counts,
    lm_objective,
    sequence_share,
    targets,
    token_loss_sum,
)
from train.parallel.mesh import ParallelMesh
from train.parallel.pipeline import sequential_forward

PART_NAMES = ("loss", "mtp_loss", "balance_loss", "indexer_loss")


@dataclass
class ParallelModel:
    """`modules`: the whole (FSDP/EP-wrapped) model, or this rank's pipeline stage modules."""

    pmesh: ParallelMesh
    modules: list[nn.Module]
    n_mtp: int
    schedule_for: Callable | None = None  # (microbatch rows, seq) -> pipelining schedule, when pp > 1
    updaters: list[RoutingBiasUpdater] = field(default_factory=list)
    _schedules: dict = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return self.pmesh.layout

    def parameters(self) -> list[torch.Tensor]:
        return [p for m in self.modules for p in m.parameters()]

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    # ------------------------------------------------------------------ forward/backward
    def forward_backward(self, batches: list[dict[str, torch.Tensor]], mtp_weight: float,
                         forward_ctx: Callable = contextlib.nullcontext) -> dict:
        """Forward and backward of this data rank's rows of the global batch (a list of grad-accumulation
        batches); returns the global loss parts and this rank's layers' expert loads (summed over dp).
        `forward_ctx()` wraps each forward (e.g. autocast); a pipeline schedule runs entirely inside it."""
        tgts = [targets(b, self.n_mtp) for b in batches]
        counts = global_counts(torch.cat(tgts), self.pmesh.group("dp"))
        parts = LossParts()
        if self.schedule_for is None:
            loads = self._plain(batches, tgts, counts, mtp_weight, parts, forward_ctx)
        else:
            loads = self._pipelined(batches, tgts, counts, mtp_weight, parts, forward_ctx)
        return {"parts": self._reduce_parts(parts), "expert_loads": self._reduce_loads(loads)}

    def _plain(self, batches, tgts, counts, mtp_weight, parts, forward_ctx) -> list:
        model, loads = self.modules[0], None
        micro = [(b, t, i) for b, t in zip(batches, tgts) for i in range(self.layout.microbatches)]
        for n, (batch, tgt, i) in enumerate(micro):
            rows = _rows(batch["input_ids"].shape[0], self.layout.microbatches, i)
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(n == len(micro) - 1)
            with forward_ctx():
                out = self._forward(batch["input_ids"][rows], batch["doc_ids"][rows])
            total = lm_objective([out.logits, *out.mtp_logits], tgt[rows], counts, mtp_weight, parts)
            share = sequence_share(out.logits.shape[0], counts)
            for name in ("balance_loss", "indexer_loss"):
                value = getattr(out, name, None)
                if value is not None:
                    parts.add(name, value * share)
                    total = total + value * share
            self._backward(total, last=n == len(micro) - 1)
            if out.expert_loads is not None:
                loads = out.expert_loads.detach() if loads is None else loads + out.expert_loads.detach()
        return [loads]

    def _forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor):
        """One forward of the whole model (engine=deepspeed runs it through its engine)."""
        return self.modules[0](input_ids, doc_ids)

    def _backward(self, total: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; `last`: the step's final one (engine=deepspeed reduces there)."""
        total.backward()

    def _pipelined(self, batches, tgts, counts, mtp_weight, parts, forward_ctx) -> list:
        for m in self.modules:
            m.counts, m.parts, m.loads, m.mtp_weight = counts, parts, None, mtp_weight
        holds_last = any(m.is_last for m in self.modules)
        for batch, tgt in zip(batches, tgts):
            kwargs = {"input_ids": batch["input_ids"], "doc_ids": batch["doc_ids"]}
            if holds_last:
                kwargs["target"] = tgt
            with forward_ctx():
                self.schedule(*batch["input_ids"].shape).step(**kwargs)
        return [m.loads for m in self.modules]

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor], forward_ctx: Callable = contextlib.nullcontext
                  ) -> tuple[float, float]:
        """(next-token CE over the global batch of which `batch` is this data rank's part, its targets)."""
        tgt = targets(batch, self.n_mtp)
        counts = global_counts(tgt, self.pmesh.group("dp"))
        parts = LossParts()
        with forward_ctx():
            if self.schedule_for is None:
                out = self.modules[0](batch["input_ids"], batch["doc_ids"], with_mtp=False)
                parts.add("loss", token_loss_sum(out.logits, tgt[..., 0]) / max(counts.tokens, 1.0))
            else:
                pp = self.pmesh
                out = sequential_forward(self.modules, self.layout, pp.group("pp"), pp.pp_rank,
                                         batch["input_ids"], batch["doc_ids"])
                if out is not None:
                    parts.add("loss", token_loss_sum(out[0], tgt[..., 0]) / max(counts.tokens, 1.0))
        return self._reduce_parts(parts).get("loss", 0.0), counts.tokens

    def schedule(self, rows: int, seq: int):
        """The pipeline schedule for batches of `rows` x `seq` (built once per shape: static stage I/O)."""
        key = (rows // self.layout.microbatches, seq)
        if key not in self._schedules:
            self._schedules[key] = self.schedule_for(*key)
        return self._schedules[key]

    def _reduce_parts(self, parts: LossParts) -> dict[str, float]:
        vec = torch.tensor([float(parts.sums[k]) if k in parts.sums else 0.0 for k in PART_NAMES]
                           + [float(k in parts.sums) for k in PART_NAMES], dtype=torch.float64)
        if dist.get_world_size() > 1:
            vec = vec.to(comm_device(self.pmesh.group("dp")))  # NCCL reduces no host tensor
            with collective("all_reduce(loss parts)"):
                dist.all_reduce(vec, group=self.pmesh.group("dp"))
                if self.layout.pp > 1:
                    dist.all_reduce(vec, group=self.pmesh.group("pp"))
        present = vec[len(PART_NAMES):]
        return {k: float(vec[i]) for i, k in enumerate(PART_NAMES) if present[i] > 0}

    def _reduce_loads(self, loads: list) -> list:
        out = []
        for t in loads:
            if t is not None and self.layout.dp > 1:
                t = t.clone()
                with collective("all_reduce(expert loads)"):
                    dist.all_reduce(t, group=self.pmesh.group("dp"))
            out.append(t)
        return out

    # ------------------------------------------------------------------ after backward
    def clip_grad_norm_(self, max_norm: float) -> float:
        params = self.parameters()
        norm = grad_norm(params)
        clip_(params, max_norm, norm)
        return float(norm)

    def update_biases(self, loads: list) -> None:
        for updater, t in zip(self.updaters, loads):
            if t is not None:
                updater.update(t)


def _rows(batch: int, microbatches: int, i: int) -> slice:
    size = batch // microbatches
    return slice(i * size, (i + 1) * size)
