"""The DeepSeek-V4 model: embedding -> n_hc streams -> blocks -> hc_head -> norm -> head, plus MTP."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention
from model.balance import expert_load, sequence_balance_loss
from model.block import Block
from model.cache import DecodeCache, DecodeStep
from model.config import ModelConfig
from model.context import ForwardContext
from model.errors import MoeforgeError
from model.layout import SeqLayout
from model.mhc import HyperConnection, HyperHead
from model.moe import Experts, Gate, make_tid2eid
from model.mtp import MTPBlock
from model.norm import RMSNorm

# Prompt tokens per cached step (unless `attn_chunk_tokens` is set): prefill runs in chunks.
PREFILL_CHUNK = 256
# Parameters/buffers kept in fp32 by `Transformer.cast_` (mHC, norms, sinks, ape, gate bias).
FP32_PATTERN = re.compile(r"(^|\.)(hc_\w+|\w*norm)\.|(^|\.)(attn_sink|ape)$|\.gate\.bias$")


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k at i predicts token i+2+k
    balance_loss: torch.Tensor | None = None  # alpha already applied; None without learned routing
    expert_loads: torch.Tensor | None = None  # [learned-routing layers (+MTP), E] token counts
    indexer_loss: torch.Tensor | None = None  # indexer KL (coefficient applied); None when off / no CSA
    routing: list[torch.Tensor] | None = None  # with return_routing: expert ids [B, S, k] per main layer


class Transformer(nn.Module):
    """`Transformer(config)(input_ids, doc_ids=None)` -> `ModelOutput`; names as in docs/interfaces.md."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(
            Block(config, lt, mt) for lt, mt in zip(config.layer_types, config.mlp_layer_types, strict=True)
        )
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.hc_head = HyperHead(d, config.hc_mult, config.hc_eps, config.rms_norm_eps)
        self.mtp = nn.ModuleList(MTPBlock(config) for _ in range(config.num_nextn_predict_layers))
        self.init_weights()

    # ------------------------------------------------------------------ initialisation
    def init_weights(self, seed: int | None = None) -> None:
        """Spec §11.6 init; matrices ~ N(0, initializer_range). With `seed`, independent of the global RNG.

        Values are drawn on the CPU and copied, so the result is the same on every device; meta tensors are
        skipped (build on meta, `to_empty`, then call this).
        """
        init_module_(self, self.config, torch.Generator().manual_seed(seed) if seed is not None else None)

    def cast_(self, dtype: torch.dtype) -> Transformer:
        """Cast floating parameters to `dtype`, keeping mHC, norms, sinks, `ape` and the gate bias in fp32."""
        for name, p in self.named_parameters():
            if p.is_floating_point() and not FP32_PATTERN.search(name):
                p.data = p.data.to(dtype)
        return self

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        *,
        with_mtp: bool = True,
        cache: DecodeCache | None = None,
        lengths: torch.Tensor | None = None,
        return_routing: bool = False,
        routing: list[torch.Tensor] | None = None,
    ) -> ModelOutput:
        """input_ids [B, S]; doc_ids [B, S] (equal ids in a run = one packed document) -> `ModelOutput`.

        `cache` (from `new_cache`): append row b's first `lengths[b]` tokens (all S by default) to the cache
        and return their logits (no MTP, no losses). `return_routing`: `out.routing`, the expert ids
        [B, S, k] of every main layer; `routing`: replay such a list (weights from the current scores).
        """
        n_layers = len(self.layers)
        if routing is not None and len(routing) != n_layers:
            raise MoeforgeError(f"routing: need one tensor per layer ({n_layers}), got {len(routing)}")
        if cache is not None:
            return self._append(input_ids, doc_ids, cache, lengths, return_routing, routing)
        if lengths is not None:
            raise MoeforgeError("lengths: only meaningful with cache= (prefill); pad and mask otherwise")
        cfg = self.config
        batch, seq = input_ids.shape
        layout = SeqLayout.build(batch, seq, input_ids.device, doc_ids)
        ctx = ForwardContext(cfg, layout, self.embed.weight.dtype)
        streams, routings = self._trunk(input_ids, ctx, routing)
        logits = self.head(self.norm(self.hc_head(streams)))
        mtp_logits = []
        if with_mtp:
            for k, block in enumerate(self.mtp):
                later = F.pad(input_ids[:, 1 + k :], (0, min(1 + k, seq)))  # token i+1+k (0 past the end)
                streams, hidden, r = block(streams, self.embed(later), ctx)
                mtp_logits.append(self.head(hidden))
                routings.append(r)
        out = ModelOutput(logits, mtp_logits, *self._balance(routings, batch), self._indexer_loss(ctx))
        if return_routing:
            out.routing = [r.indices_NK.view(batch, seq, -1) for r in routings[: len(self.layers)]]
        return out

    def _trunk(self, input_ids: torch.Tensor, ctx: ForwardContext, replay: list | None):
        """Embedding -> streams -> every main block: (streams [B, S, n_hc, D], routing per layer)."""
        emb = self.embed(input_ids)
        streams = emb.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        routings = []
        for i, layer in enumerate(self.layers):
            streams, r = layer(streams, ctx, input_ids, replay[i] if replay is not None else None)
            routings.append(r)
        return streams, routings

    def set_sparse_attention(self, sparse: bool, train_indexer: bool = True) -> None:
        """Training phases of CSA: before the indexer is trusted every query attends to all visible entries
        (`sparse=False`, indexer KL over all of them when `train_indexer`), then to the indexer's top-k with
        the KL on the selected set. A configured `indexer_loss_mode="off"` stays off."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.topk_active = sparse
        enabled = self.__dict__.setdefault("_indexer_enabled", self.config.indexer_loss_mode != "off")
        if enabled:
            self.config.indexer_loss_mode = ("sparse" if sparse else "dense") if train_indexer else "off"

    # ------------------------------------------------------------------ generation
    def new_cache(self, batch_size: int) -> DecodeCache:
        """An empty decode cache for `batch_size` rows on the model's device and in its dtype."""
        return DecodeCache(self, batch_size)

    def _append(self, input_ids, doc_ids, cache: DecodeCache, lengths, return_routing: bool, replay):
        batch, seq = input_ids.shape
        if doc_ids is not None:
            raise MoeforgeError("doc_ids: packed documents cannot be used with a decode cache")
        if batch != cache.batch_size:
            raise MoeforgeError(f"cache: built for {cache.batch_size} rows, input has {batch}")
        device = input_ids.device
        n_host = torch.full((batch,), seq, dtype=torch.long) if lengths is None else lengths.long().cpu()
        if n_host.shape != (batch,) or bool(((n_host < 0) | (n_host > seq)).any()):
            raise MoeforgeError(f"lengths: need {batch} values in [0, {seq}], got {n_host.tolist()}")
        n_B = n_host.to(device)
        logits, routings = [], []
        chunk = self.config.attn_chunk_tokens or PREFILL_CHUNK
        for lo in range(0, max(seq, 1), chunk):  # long prompts in chunks: bounded memory
            hi = min(lo + chunk, seq)
            part = [r[:, lo:hi] for r in replay] if replay is not None else None
            n_part = [(n - lo).clamp(0, hi - lo) for n in (n_B, n_host)]
            out, r = self._append_step(input_ids[:, lo:hi], cache, *n_part, part)
            logits.append(out)
            routings.append(r)
        out = ModelOutput(torch.cat(logits, dim=1))
        if return_routing:
            out.routing = [torch.cat(parts, dim=1) for parts in zip(*routings)]
        return out

    def _append_step(self, input_ids, cache: DecodeCache, n_B: torch.Tensor, n_host: torch.Tensor, replay):
        batch, seq = input_ids.shape
        positions = cache.lengths.unsqueeze(1) + torch.arange(seq, device=input_ids.device)
        step = DecodeStep(cache, self.layers, n_B, n_host)
        ctx = ForwardContext(self.config, SeqLayout(positions, None), self.embed.weight.dtype, decode=step)
        streams, routings = self._trunk(input_ids, ctx, replay)
        step.finish()
        logits = self.head(self.norm(self.hc_head(streams)))
        return logits, [r.indices_NK.view(batch, seq, -1) for r in routings]

    def _indexer_loss(self, ctx: ForwardContext) -> torch.Tensor | None:
        """Sum over CSA layers of each layer's mean KL, times `indexer_loss_coef`; None when off."""
        if not ctx.indexer_losses:
            return None
        return self.config.indexer_loss_coef * torch.stack(ctx.indexer_losses).sum()

    def _balance(self, routings, batch: int):
        cfg = self.config
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        used = [r for r in routings if r.learned or cfg.balance_loss_on_hash_layers]
        loss = None
        if used:
            loss = cfg.balance_loss_alpha * sum(sequence_balance_loss(r, batch, e, k) for r in used)
        learned = [expert_load(r, e) for r in routings if r.learned]
        return loss, (torch.stack(learned) if learned else None)


@torch.no_grad()
def init_module_(root: nn.Module, cfg: ModelConfig, gen: torch.Generator | None = None) -> None:
    """Initialise every non-meta parameter/buffer under `root` (hash tables numbered in module order)."""
    std = cfg.initializer_range

    def normal(t: torch.Tensor) -> None:
        if not t.is_meta:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)

    def fill(t: torch.Tensor, value: float) -> None:
        if not t.is_meta:
            t.fill_(value)

    hash_index = 0
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            normal(module.weight)
        elif isinstance(module, RMSNorm):
            fill(module.weight, 1.0)
        elif isinstance(module, (HyperConnection, HyperHead)):
            normal(module.fn)
            fill(module.base, 0.0)
            fill(module.scale, cfg.hc_scale_init)
        elif isinstance(module, Experts):
            for w in (module.w1, module.w2, module.w3):
                normal(w)
        elif isinstance(module, Gate):
            normal(module.weight)
            if not module.is_hash:
                fill(module.bias, 0.0)
            else:
                if not module.tid2eid.is_meta:
                    seed = cfg.tid2eid_seed + hash_index
                    table = make_tid2eid(cfg.vocab_size, cfg.n_routed_experts, module.top_k, seed)
                    module.tid2eid.copy_(table)
                hash_index += 1
        for name in ("attn_sink", "ape"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                fill(getattr(module, name), 0.0)
