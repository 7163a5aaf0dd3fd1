"""One attention layer on the Triton kernels (`model.attn_impl: triton`); same contract as
`model.sparse_attention.sparse_layer`, which stays the reference and the CPU path.

CSA picks its entries with the Triton indexer (top-k of the visible entries, as `Attention.select`); HCA
passes each query's visible range; the attention itself is one kernel call over the whole sequence. The
indexer KL (when on) is computed in query chunks from detached attention logits, as in the reference.
"""

import torch
from torch.utils.checkpoint import checkpoint

from model.compressor import gather_tokens
from model.indexer_loss import indexer_kl
from model.sparse_attention import chunk_size, range_index, window_index

from .indexer_topk import index_topk
from .sparse_attn import sparse_attention


def _masked_logits(q_BSHC, keys_BSKC, ok_BSK, scale: float) -> torch.Tensor:
    logits = torch.einsum("bshc,bskc->bhsk", q_BSHC, keys_BSKC) * scale
    return logits.masked_fill(~ok_BSK.unsqueeze(1), float("-inf"))


def _kl_chunk(attn, lo, hi, q, kv, comp, idx, pos, first, nvis, mode, iq, iw, ikeys):
    """(summed KL, non-empty queries) of queries lo .. hi-1; gradients reach only the index scores."""
    window = min(attn.window, q.shape[1])
    with torch.no_grad():
        q_c = q[:, lo:hi]
        w_idx, w_ok = window_index(torch.arange(lo, hi, device=q.device), pos[:, lo:hi], window)
        win = _masked_logits(q_c, gather_tokens(kv, w_idx), w_ok, attn.scale)
        if mode == "sparse":
            sel = idx[:, lo:hi].long()
            set_idx, set_ok = sel.clamp(min=0), sel >= 0
        else:
            set_idx, set_ok = range_index(first[:, lo:hi], nvis[:, lo:hi], comp.shape[1])
        entry = _masked_logits(q_c, gather_tokens(comp, set_idx), set_ok, attn.scale)
    scores = attn.indexer.score_at(iq[:, lo:hi], iw[:, lo:hi], gather_tokens(ikeys, set_idx))
    return indexer_kl(win, entry, attn.attn_sink, scores, set_ok)


def kernel_dtype(q_BSHC: torch.Tensor) -> torch.dtype:
    """The one dtype the attention kernel takes: autocast's where it is on (the products the reference's
    einsums run in), else the queries'. Under autocast the keys can arrive in fp32 (a norm or the
    compressor's pooling) while the queries come from a bf16 projection."""
    device = q_BSHC.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q_BSHC.dtype


def triton_layer(attn, q_BSHC, kv_BSC, comp_BTC, entries, index, pos_BS, mode: str, chunk_tokens: int):
    """One layer's attention on the kernels: (output [B, S, H, C], indexer KL or None)."""
    dtype = kernel_dtype(q_BSHC)
    q_BSHC, kv_BSC = q_BSHC.to(dtype), kv_BSC.to(dtype)
    comp_BTC = comp_BTC.to(dtype) if comp_BTC is not None else None
    idx = first = nvis = None
    if comp_BTC is not None:
        first, nvis = entries.first_BS, entries.nvis_BS
        if index is not None:
            with torch.no_grad():
                idx = index_topk(*(t.detach() for t in index), first, nvis, attn.index_topk, chunk_tokens)
    out = sparse_attention(q_BSHC, kv_BSC, attn.attn_sink, pos_BS, attn.window, attn.scale, comp_BTC,
                           idx, None if idx is not None else first, None if idx is not None else nvis)
    if index is None or mode == "off" or comp_BTC.shape[1] == 0:
        return out, None
    b, seq, h, c = q_BSHC.shape
    width = min(attn.window, seq) + (idx.shape[2] if mode == "sparse" else comp_BTC.shape[1])
    step = chunk_size(chunk_tokens, seq, b * width * (h + c + index[0].shape[-1]), q_BSHC.device)
    tensors = (q_BSHC, kv_BSC, comp_BTC, idx, pos_BS, first, nvis, mode, *index)
    kls, ns = [], []
    for lo in range(0, seq, step):
        hi = min(lo + step, seq)
        if torch.is_grad_enabled() and seq > step:
            kl, n = checkpoint(_kl_chunk, attn, lo, hi, *tensors, use_reentrant=False,
                               preserve_rng_state=False)
        else:
            kl, n = _kl_chunk(attn, lo, hi, *tensors)
        kls.append(kl)
        ns.append(n)
    return out, torch.stack(kls).sum() / torch.stack(ns).sum().clamp_min(1)
