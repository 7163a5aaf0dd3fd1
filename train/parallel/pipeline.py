"""Pipeline parallelism: the V4 stack split into stages for `torch.distributed.pipelining`.

Stage 0 holds the embedding (and embeds the MTP's later tokens, which travel with the 4-stream mHC state);
the last stage holds hc_head, norm, head and the MTP blocks. `input_ids`/`doc_ids` reach every stage as
keyword arguments (hash routing and the packed-document layout need them). Each stage's sequence-wise
balance loss enters the backward through `AuxLoss` on its output, so no scalar crosses stages.
Stage modules keep the global parameter names (`layers.<i>.`, `mtp.<k>.`), so checkpoints do not depend
on the split.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.context import ForwardContext
from model.layout import SeqLayout
from model.transformer import Transformer
from train.parallel.layout import SCHEDULES, Layout
from train.parallel.loss import GlobalCounts, LossParts, lm_objective, sequence_share


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, as even as possible; earlier stages take the extra layers (the last one has the head
    and the MTP blocks)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class AuxLoss(torch.autograd.Function):
    """Identity on `x`; in backward, `aux` receives gradient `scale` (adds scale * aux to the loss)."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale, ctx.shape, ctx.dtype = scale, aux.shape, aux.dtype
        return x.clone()  # not a view: zero-bubble schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.shape, ctx.scale, dtype=ctx.dtype, device=grad.device), None


class StageModule(nn.Module):
    """Layers `layer_ids` of `model` (plus embedding on the first stage, heads and MTP on the last)."""

    def __init__(self, model: Transformer, stage: int, n_stages: int, layer_ids: range):
        super().__init__()
        self.config = model.config
        self.stage, self.is_first, self.is_last = stage, stage == 0, stage == n_stages - 1
        self.embed = model.embed if self.is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if self.is_last:
            self.hc_head, self.norm, self.head, self.mtp = model.hc_head, model.norm, model.head, model.mtp
        self.counts: GlobalCounts | None = None  # set by the step before the schedule runs
        self.parts = LossParts()
        self.loads: torch.Tensor | None = None  # this stage's expert loads, summed over microbatches
        self.mtp_weight = 0.0

    def embed_dtype(self) -> torch.dtype:
        """dtype of the activations between stages (the embedding's)."""
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def _n_mtp(self) -> int:
        return self.config.num_nextn_predict_layers

    def forward(self, *args: torch.Tensor, input_ids: torch.Tensor, doc_ids: torch.Tensor):
        cfg = self.config
        batch, seq = input_ids.shape
        if self.is_first:
            streams = self.embed(input_ids).unsqueeze(2).expand(-1, -1, cfg.hc_mult, -1).contiguous()
            later = [self.embed(F.pad(input_ids[:, 1 + k :], (0, min(1 + k, seq))))  # token i+1+k
                     for k in range(self._n_mtp())]
        else:
            streams, later = args[0], list(args[1:])
        ctx = ForwardContext(cfg, SeqLayout.build(batch, seq, input_ids.device, doc_ids), streams.dtype)
        routings = []
        for layer in self.layers.values():
            streams, routing = layer(streams, ctx, input_ids)
            routings.append(routing)
        if not self.is_last:
            return self._with_aux(streams, routings, ctx, batch), *[e.clone() for e in later]
        logits = [self.head(self.norm(self.hc_head(streams)))]
        for block, emb in zip(self.mtp, later):
            streams, hidden, routing = block(streams, emb, ctx)
            logits.append(self.head(hidden))
            routings.append(routing)
        logits[0] = self._with_aux(logits[0], routings, ctx, batch)
        return tuple(logits)

    def _with_aux(self, out: torch.Tensor, routings: list, ctx: ForwardContext, batch: int) -> torch.Tensor:
        """Record this stage's expert loads; add its balance and indexer losses (global-batch share)."""
        balance, loads = Transformer._balance(self, routings, batch)
        if loads is not None:
            self.loads = loads if self.loads is None else self.loads + loads
        ctx_losses = {"balance_loss": balance, "indexer_loss": Transformer._indexer_loss(self, ctx)}
        aux = [v for v in ctx_losses.values() if v is not None]
        if not aux or not torch.is_grad_enabled():
            return out
        share = sequence_share(batch, self.counts)
        for name, value in ctx_losses.items():
            if value is not None:
                self.parts.add(name, value * share)
        return AuxLoss.apply(out, sum(aux), share)


def stage_loss_fn(stage: StageModule):
    """loss_fn(output, target) of the last stage: the global-batch-normalised LM + MTP objective."""

    def loss_fn(output, target):
        logits = list(output) if isinstance(output, (tuple, list)) else [output]
        return lm_objective(logits, target, stage.counts, stage.mtp_weight, stage.parts)

    return loss_fn


def build_stages(model: Transformer, layout: Layout, pp_rank: int) -> list[StageModule]:
    """The stage modules of pipeline rank `pp_rank` (two per rank for interleaved and V schedules)."""
    ranges = split_layers(model.config.num_hidden_layers, layout.n_stages)
    return [StageModule(model, s, layout.n_stages, ranges[s]) for s in layout.stage_ids(pp_rank)]


@torch.no_grad()
def sequential_forward(stage_modules: list[StageModule], layout: Layout, group, pp_rank: int,
                       input_ids: torch.Tensor, doc_ids: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Forward only, one stage after the other, for any stage placement (evaluation): returns the last
    stage's outputs on the rank that holds it, else None. Activations travel with send/recv."""
    holder = {s: r for r in range(layout.pp) for s in layout.stage_ids(r)}
    mine = {m.stage: m for m in stage_modules}
    rows, seq = input_ids.shape
    first = stage_modules[0]
    between, _ = stage_io(first.config, rows, seq, first.embed_dtype(), input_ids.device)
    acts: tuple[torch.Tensor, ...] = ()
    for s in range(layout.n_stages):
        if holder[s] != pp_rank:
            if s + 1 < layout.n_stages and holder[s + 1] == pp_rank:  # our next stage needs its output
                acts = tuple(torch.empty_like(t, requires_grad=False) for t in between)
                for t in acts:
                    dist.recv(t, src=dist.get_global_rank(group, holder[s]), group=group)
            continue
        acts = mine[s](*acts, input_ids=input_ids, doc_ids=doc_ids)
        if s + 1 < layout.n_stages and holder[s + 1] != pp_rank:
            for t in acts:
                dist.send(t.contiguous(), dst=dist.get_global_rank(group, holder[s + 1]), group=group)
    return acts if layout.n_stages - 1 in mine else None


def stage_io(model_cfg, rows: int, seq: int, dtype: torch.dtype, device) -> tuple[tuple, tuple]:
    """Example (between-stage activations, last-stage outputs) of one microbatch: static shapes, so the
    pipeline needs no shape-inference pass (which would run the model on placeholder data)."""
    d, n_mtp = model_cfg.hidden_size, model_cfg.num_nextn_predict_layers
    empty = functools.partial(torch.empty, dtype=dtype, device=device, requires_grad=True)
    between = (empty(rows, seq, model_cfg.hc_mult, d), *[empty(rows, seq, d) for _ in range(n_mtp)])
    return between, tuple(empty(rows, seq, model_cfg.vocab_size) for _ in range(1 + n_mtp))


def build_schedule(stage_modules: list[StageModule], layout: Layout, group, device: torch.device, loss_fn,
                   rows: int, seq: int, dtype: torch.dtype = torch.float32) -> object:
    """A torch.distributed.pipelining schedule of `parallel.pp_schedule` over this rank's stages, for
    microbatches of `rows` x `seq` tokens."""
    from torch.distributed import pipelining
    from torch.distributed.pipelining import schedules

    from model.errors import ConfigError

    name, per_rank, _ = SCHEDULES[layout.pp_schedule]
    cls = getattr(schedules, name, None)
    if cls is None:
        raise ConfigError("parallel.pp_schedule", f"{layout.pp_schedule} needs {name}, which this torch "
                                                  f"({torch.__version__}) does not have")
    between, final = stage_io(stage_modules[0].config, rows, seq, dtype, device)
    stages = [pipelining.PipelineStage(m, m.stage, layout.n_stages, device, group=group,
                                       input_args=() if m.is_first else between,
                                       output_args=final if m.is_last else between)
              for m in stage_modules]
    kwargs = dict(n_microbatches=layout.microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], **kwargs) if per_rank == 1 else cls(stages, **kwargs)
