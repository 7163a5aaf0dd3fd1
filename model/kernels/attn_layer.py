"""One attention layer on the Triton kernels (`model.attn_impl: triton`); same contract as
`model.sparse_attention.sparse_layer`, which stays the reference and the CPU path.

CSA picks its entries with the Triton indexer (top-k of the visible entries, as `Attention.select`); HCA
passes each query's visible range; the attention itself is one kernel call over the whole sequence. The
indexer KL (when on) is computed in query chunks. In the sparse stage its target, the attention's
probabilities of the selected entries, comes from the kernel's log-sum-exp: only the top-k logits are
recomputed (no window keys, no second softmax), and only the index scores are recomputed in backward. The
dense warm-up's target spans every visible entry, outside the kernel's softmax, so it recomputes the
logits as the reference does.
"""

import torch
from torch.utils.checkpoint import checkpoint

from model.compressor import gather_tokens
from model.indexer_loss import indexer_kl, kl_from_probs
from model.sparse_attention import chunk_size, range_index, window_index

from .indexer_topk import index_topk
from .sparse_attn import sparse_attention


def _masked_logits(q_BSHC, keys_BSKC, ok_BSK, scale: float) -> torch.Tensor:
    logits = torch.einsum("bshc,bskc->bhsk", q_BSHC, keys_BSKC) * scale
    return logits.masked_fill(~ok_BSK.unsqueeze(1), float("-inf"))


def _dense_kl_chunk(attn, lo, hi, q, kv, comp, pos, first, nvis, iq, iw, ikeys):
    """Dense warm-up KL of queries lo .. hi-1 (the set: every visible entry); gradients reach only the
    index scores."""
    window = min(attn.window, q.shape[1])
    with torch.no_grad():
        q_c = q[:, lo:hi]
        w_idx, w_ok = window_index(torch.arange(lo, hi, device=q.device), pos[:, lo:hi], window)
        win = _masked_logits(q_c, gather_tokens(kv, w_idx), w_ok, attn.scale)
        set_idx, set_ok = range_index(first[:, lo:hi], nvis[:, lo:hi], comp.shape[1])
        entry = _masked_logits(q_c, gather_tokens(comp, set_idx), set_ok, attn.scale)
    scores = attn.indexer.score_at(iq[:, lo:hi], iw[:, lo:hi], gather_tokens(ikeys, set_idx))
    return indexer_kl(win, entry, attn.attn_sink, scores, set_ok)


def _selected_probs(attn, q_BSHC, comp_BTC, lse_BSH, sel_BSK, ok_BSK) -> torch.Tensor:
    """sum over heads of exp(logit - lse) of the selected entries [B, S, K] fp32 (0 where not ok): the
    probabilities the kernel's softmax gave them. Logits in fp32 from the kernel's inputs."""
    with torch.no_grad(), torch.autocast(q_BSHC.device.type, enabled=False):
        keys = gather_tokens(comp_BTC, sel_BSK).float()
        logits = torch.einsum("bshc,bskc->bshk", q_BSHC.float(), keys) * attn.scale
        return torch.exp(logits - lse_BSH.unsqueeze(-1)).sum(dim=2).masked_fill(~ok_BSK, 0.0)


def _scored_kl(attn, probs_BSK, sel_BSK, ok_BSK, iq, iw, ikeys):
    """(summed KL, non-empty queries) of one chunk; gradients reach only the index scores."""
    scores = attn.indexer.score_at(iq, iw, gather_tokens(ikeys, sel_BSK))
    return kl_from_probs(probs_BSK, scores, ok_BSK)


def _sparse_kl(attn, q_BSHC, comp_BTC, lse_BSH, idx, index, chunk_tokens: int) -> torch.Tensor:
    """Indexer KL on the selected set from the kernel's log-sum-exp, over query chunks."""
    b, seq, h, c = q_BSHC.shape
    iq, iw, ikeys = index
    per_query = b * idx.shape[2] * (h + c + iq.shape[-1] + iq.shape[2])
    step = chunk_size(chunk_tokens, seq, per_query, q_BSHC.device)
    kls, ns = [], []
    for lo in range(0, seq, step):
        hi = min(lo + step, seq)
        sel = idx[:, lo:hi].long()
        sel, ok = sel.clamp(min=0), sel >= 0
        probs = _selected_probs(attn, q_BSHC[:, lo:hi], comp_BTC, lse_BSH[:, lo:hi], sel, ok)
        args = (attn, probs, sel, ok, iq[:, lo:hi], iw[:, lo:hi], ikeys)
        if torch.is_grad_enabled() and seq > step:
            kl, n = checkpoint(_scored_kl, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            kl, n = _scored_kl(*args)
        kls.append(kl)
        ns.append(n)
    return torch.stack(kls).sum() / torch.stack(ns).sum().clamp_min(1)


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
    out, lse = sparse_attention(q_BSHC, kv_BSC, attn.attn_sink, pos_BS, attn.window, attn.scale, comp_BTC,
                                idx, None if idx is not None else first, None if idx is not None else nvis,
                                return_lse=True)
    if index is None or mode == "off" or comp_BTC.shape[1] == 0:
        return out, None
    if mode == "sparse":
        return out, _sparse_kl(attn, q_BSHC, comp_BTC, lse, idx, index, chunk_tokens)
    b, seq, h, c = q_BSHC.shape
    width = min(attn.window, seq) + comp_BTC.shape[1]
    step = chunk_size(chunk_tokens, seq, b * width * (h + c + index[0].shape[-1]), q_BSHC.device)
    tensors = (q_BSHC, kv_BSC, comp_BTC, pos_BS, first, nvis, *index)
    kls, ns = [], []
    for lo in range(0, seq, step):
        hi = min(lo + step, seq)
        if torch.is_grad_enabled() and seq > step:
            kl, n = checkpoint(_dense_kl_chunk, attn, lo, hi, *tensors, use_reentrant=False,
                               preserve_rng_state=False)
        else:
            kl, n = _dense_kl_chunk(attn, lo, hi, *tensors)
        kls.append(kl)
        ns.append(n)
    return out, torch.stack(kls).sum() / torch.stack(ns).sum().clamp_min(1)
