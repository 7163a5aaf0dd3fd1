"""Gather attention: each query attends to its own key list (window + chosen compressed entries) and the sink.

Nothing here is S x S: keys are gathered per query ([B, S, K, C] with K = window + top-k or causal entries),
and callers process queries in chunks, so memory grows linearly with the sequence length.
"""

import torch
from torch.utils.checkpoint import checkpoint

from model.compressor import gather_tokens
from model.indexer_loss import indexer_kl

# Largest per-chunk intermediate (elements) when `attn_chunk_tokens` is 0, by device type.
CHUNK_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 27}


def window_index(query_src_S: torch.Tensor, pos_BS: torch.Tensor, window: int):
    """Keys of a sliding window: (indices [B, S, W] into the key source, ok [B, S, W]).

    `query_src_S[i]` is query i's own row in the key source, `pos_BS` its document-local position: key j
    steps back is valid iff j <= position (same document, not before the start) and j < window.
    """
    j = torch.arange(window, device=pos_BS.device)
    idx = (query_src_S[:, None] - j).clamp(min=0).expand(pos_BS.shape[0], -1, -1)
    return idx, j <= pos_BS.unsqueeze(-1)


def range_index(first_BS: torch.Tensor, count_BS: torch.Tensor, total: int, width: int | None = None):
    """Entries first .. first + count - 1 of each query: (indices [B, S, width], ok); width >= max count."""
    if width is None:
        width = int(count_BS.max().item()) if count_BS.numel() else 0
    j = torch.arange(width, device=first_BS.device)
    idx = (first_BS.unsqueeze(-1) + j).clamp(max=max(total - 1, 0))
    return idx, j < count_BS.unsqueeze(-1)


def gather_keys(sources, index_pairs):
    """Concatenate gathered keys [B, S, K, C] and their ok masks from (source [B, N, C], (idx, ok)) pairs."""
    keys = [gather_tokens(src, idx) for src, (idx, _) in zip(sources, index_pairs)]
    return torch.cat(keys, dim=2), torch.cat([ok for _, ok in index_pairs], dim=2)


def attend(q_BSHC, keys_BSKC, ok_BSK, sink_H, scale: float):
    """softmax over each query's keys plus the per-head sink (denominator only); K = V.

    Returns (output [B, S, H, C], masked logits [B, H, S, K]).
    """
    b, s, h, _ = q_BSHC.shape
    logits = torch.einsum("bshc,bskc->bhsk", q_BSHC, keys_BSKC) * scale
    logits = logits.masked_fill(~ok_BSK.unsqueeze(1), float("-inf"))
    sink = sink_H.to(logits.dtype).view(1, h, 1, 1).expand(b, h, s, 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    out = torch.einsum("bhsk,bskc->bshc", probs.to(keys_BSKC.dtype), keys_BSKC)
    return out, logits


def chunk_size(configured: int, seq: int, per_query: int, device: torch.device) -> int:
    """Queries per chunk: the configured number, or as many as keep `per_query` elements each in budget."""
    if configured > 0:
        return min(configured, max(seq, 1))
    budget = CHUNK_BUDGET.get(device.type, CHUNK_BUDGET["cpu"])
    return max(1, min(max(seq, 1), budget // max(per_query, 1)))


def sparse_layer(attn, q_BSHC, kv_BSC, comp_BTC, entries, index, pos_BS, mode: str, chunk_tokens: int):
    """One layer's attention over query chunks (recomputed in backward): (output [B, S, H, C], KL or None).

    `index` = (indexer queries, head weights, keys) for CSA, else None; `mode` = indexer_loss_mode.
    """
    b, seq, h, c = q_BSHC.shape
    window = min(attn.window, seq)
    count = comp_BTC.shape[1] if comp_BTC is not None else 0
    width = window + (min(attn.index_topk, count) if index is not None else count)
    n_index = index[0].shape[2] if index is not None else 0
    gathered = count * (c + h + index[0].shape[3]) if index is not None and mode == "dense" else 0
    per_query = b * max(width * (h + c), (n_index + h) * count, gathered)  # largest per-query tensor
    step = chunk_size(chunk_tokens, seq, per_query, q_BSHC.device)

    def chunk(lo, hi, q, kv, comp, iq, iw, ikeys, sink):
        pairs, sources = [window_index(torch.arange(lo, hi, device=q.device), pos_BS[:, lo:hi], window)], [kv]
        scores = None
        if comp is not None:
            if ikeys is not None:
                t0, t1 = entries.span(lo, hi)
                with torch.no_grad():  # selection only; the KL below rescores its set with gradients
                    scores = attn.indexer.score(iq[:, lo:hi], iw[:, lo:hi], ikeys[:, t0:t1])
                    idx, ok = attn.select(scores, entries.visible(lo, hi, t0, t1))
                pairs.append((idx + t0, ok))
            else:
                pairs.append(range_index(entries.first_BS[:, lo:hi], entries.nvis_BS[:, lo:hi], count))
            sources.append(comp)
        keys, ok = gather_keys(sources, pairs)
        out, logits = attend(q[:, lo:hi], keys, ok, sink, attn.scale)
        if scores is None or mode == "off":
            return out, None, None
        if mode == "sparse":
            (idx, set_ok), set_logits = pairs[1], logits[..., window:]
        else:
            idx, set_ok = range_index(entries.first_BS[:, lo:hi], entries.nvis_BS[:, lo:hi], count)
            set_logits = torch.einsum("bshc,bskc->bhsk", q[:, lo:hi], gather_tokens(comp, idx)) * attn.scale
            set_logits = set_logits.masked_fill(~set_ok.unsqueeze(1), float("-inf"))
        set_scores = attn.indexer.score_at(iq[:, lo:hi], iw[:, lo:hi], gather_tokens(ikeys, idx))
        kl, n = indexer_kl(logits[..., :window], set_logits, sink, set_scores, set_ok)
        return out, kl, n

    index = index if index is not None else (None, None, None)
    tensors = (q_BSHC, kv_BSC, comp_BTC, *index, attn.attn_sink)
    outs, kls, ns = [], [], []
    recompute = torch.is_grad_enabled() and seq > step
    for lo in range(0, seq, step):
        hi = min(lo + step, seq)
        if recompute:
            res = checkpoint(chunk, lo, hi, *tensors, use_reentrant=False, preserve_rng_state=False)
        else:
            res = chunk(lo, hi, *tensors)
        outs.append(res[0])
        if res[1] is not None:
            kls.append(res[1])
            ns.append(res[2])
    kl = torch.stack(kls).sum() / torch.stack(ns).sum().clamp_min(1) if kls else None
    return torch.cat(outs, dim=1), kl
