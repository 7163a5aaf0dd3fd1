"""Decode cache: per row and main layer, the window K=V, compressor state, compressed entries, indexer keys.

Rows are independent and have their own lengths. Appending n_b tokens to row b (prefill: the prompt; decode:
one token) processes exactly what a full forward pass would compute for those positions:
- window: the last `sliding_window` K=V vectors, right-aligned (slot j holds position length - W + j);
- compressor state: the last m (HCA) or 2m (CSA: the overlap half of the previous window) projected tokens,
  right-aligned the same way, so that a window that completes can be pooled;
- compressed entries and indexer keys [B, T, C], T = the longest row's count (stored with one scratch slot).
All tensors live on the model's device in its compute dtype. Use under `torch.no_grad()`.
"""

from __future__ import annotations

import torch

from model.compressor import Compressor, gather_tokens
from model.config import ModelConfig
from model.rope import cos_sin
from model.sparse_attention import attend, gather_keys, range_index, window_index


class CompressorState:
    """The recent projected tokens of one compressor and the entries it emitted so far."""

    def __init__(self, comp: Compressor, batch: int, device, dtype):
        self.rate, self.keep = comp.rate, comp.rate * (2 if comp.overlap else 1)
        width = comp.ape.shape[1]  # the projected width: head_dim, or 2 * head_dim with overlap
        self.kv = torch.zeros(batch, self.keep, width, device=device, dtype=dtype)
        self.gate = torch.zeros(batch, self.keep, width, device=device, dtype=dtype)
        # entries [B, T, C] plus one scratch slot that absorbs the writes of rows without a new entry
        self.store = torch.zeros(batch, 1, comp.head_dim, device=device, dtype=dtype)

    @property
    def entries(self) -> torch.Tensor:
        return self.store[:, :-1]

    def append(self, comp: Compressor, x_BSD, step: DecodeStep, freqs) -> torch.Tensor:
        """Add the step's tokens; pool every window they complete; return all entries [B, T, C]."""
        m, keep, device = self.rate, self.keep, x_BSD.device
        kv_new, gate_new = comp.project(x_BSD)
        kv, gate = torch.cat([self.kv, kv_new], dim=1), torch.cat([self.gate, gate_new], dim=1)
        before_h, after_h = step.lengths_host // m, (step.lengths_host + step.n_host) // m
        most, grown = int((after_h - before_h).max()), int(after_h.max())  # host values: no device sync
        if most > 0:
            before, after = step.lengths_B // m, (step.lengths_B + step.n_B) // m
            e = torch.arange(most, device=device)
            w = before.unsqueeze(1) + e  # window index of each new entry [B, E]
            first = w * m - step.lengths_B.unsqueeze(1) + keep  # row of its first token in (kv, gate)
            idx = (first.unsqueeze(-1) + torch.arange(m, device=device)).clamp(0, kv.shape[1] - 1)
            cos, sin = cos_sin(freqs, w * m, x_BSD.dtype)
            new = comp.pool(kv, gate, idx, w > 0, cos, sin).to(self.store.dtype)
            count = self.store.shape[1] - 1
            if grown > count:
                pad = self.store.new_zeros(self.store.shape[0], grown - count + 1, self.store.shape[-1])
                self.store = torch.cat([self.store[:, :-1], pad], dim=1)
            slot = torch.where(w < after.unsqueeze(1), w, grown)  # no new entry -> the scratch slot
            self.store.scatter_(1, slot.unsqueeze(-1).expand_as(new), new)
        self.kv = gather_tokens(kv, step.n_B.unsqueeze(1) + torch.arange(keep, device=device))
        self.gate = gather_tokens(gate, step.n_B.unsqueeze(1) + torch.arange(keep, device=device))
        return self.entries


class LayerCache:
    def __init__(self, attn, batch: int, device, dtype):
        self.window = torch.zeros(batch, attn.window, attn.head_dim, device=device, dtype=dtype)
        self.comp = CompressorState(attn.compressor, batch, device, dtype) if attn.compressor else None
        self.index = CompressorState(attn.indexer.compressor, batch, device, dtype) if attn.indexer else None


class DecodeCache:
    """`Transformer.new_cache(batch_size)`: decode state of every main layer, with per-row `lengths`."""

    def __init__(self, model, batch_size: int):
        emb = model.embed.weight
        self.config: ModelConfig = model.config
        self.batch_size = batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=emb.device)
        self.host_lengths = torch.zeros(batch_size, dtype=torch.long)  # a CPU copy: shapes without syncs
        self.layers = [LayerCache(layer.attn, batch_size, emb.device, emb.dtype) for layer in model.layers]


class DecodeStep:
    """One append of n_B[b] tokens to every row of `cache` (the part of a forward that touches the cache)."""

    def __init__(self, cache: DecodeCache, layers, n_B: torch.Tensor, n_host: torch.Tensor):
        self.cache, self.n_B, self.n_host = cache, n_B, n_host
        self.lengths_B, self.lengths_host = cache.lengths.clone(), cache.host_lengths.clone()
        self.slot = {layer.attn: i for i, layer in enumerate(layers)}

    def finish(self) -> None:
        """Advance the rows' lengths (after every layer has appended)."""
        self.cache.lengths += self.n_B
        self.cache.host_lengths += self.n_host

    def attend(self, attn, x_BSD: torch.Tensor, ctx) -> torch.Tensor:
        """Core attention [B, S, H, C] of the new tokens over cached and new keys; updates the layer cache."""
        state = self.cache.layers[self.slot[attn]]
        seq = x_BSD.shape[1]
        pos = ctx.layout.positions_BS
        cos, sin = ctx.token_rope(attn.rope_label)
        q, kv, qr = attn.project(x_BSD, cos, sin)
        window = state.window.shape[1]
        keys_src = torch.cat([state.window, kv.to(state.window.dtype)], dim=1)  # row j: position L - W + j
        rows = torch.arange(window, window + seq, device=pos.device)
        pairs, sources = [window_index(rows, pos, window)], [keys_src]
        if attn.compressor is not None:
            freqs = ctx.freqs(attn.rope_label)
            comp = state.comp.append(attn.compressor, x_BSD, self, freqs)
            nvis = ((pos + 1) // attn.rate).clamp(max=comp.shape[1])  # padding queries: clamp
            if attn.indexer is not None:
                keys = state.index.append(attn.indexer.compressor, x_BSD, self, freqs)
                iq, iw = attn.indexer.queries(x_BSD, qr, cos, sin)
                scores = attn.indexer.score(iq, iw, keys)
                visible = torch.arange(keys.shape[1], device=pos.device) < nvis.unsqueeze(-1)
                pairs.append(attn.select(scores, visible))
            else:
                pairs.append(range_index(torch.zeros_like(nvis), nvis, comp.shape[1], comp.shape[1]))
            sources.append(comp)
        keys, ok = gather_keys(sources, pairs)
        out, _ = attend(q, keys.to(q.dtype), ok, attn.attn_sink, attn.scale)
        keep = self.n_B.unsqueeze(1) + torch.arange(window, device=pos.device)  # the last W positions
        state.window = gather_tokens(keys_src, keep)
        return out
