"""The lightning indexer's training loss: KL(main attention over compressed entries || softmax(index scores)).

Target p_s: the main attention's probabilities (softmax over window keys, the entry set and the sink) of
query s on the entries of its set, summed over heads, L1-normalised and detached. The set is every visible
entry (dense warm-up) or the selected top-k (sparse stage). The indexer's own distribution is the softmax of
its scores over the same set. Queries with an empty set do not count.
"""

import torch


def set_probs(win_logits_BHSW, set_logits_BHSK, sink_H, set_ok_BSK) -> torch.Tensor:
    """The target before normalisation: the main attention's probabilities of each query's set entries
    (softmax over window keys, the set and the sink), summed over heads -> [B, S, K] fp32, detached."""
    b, h, s, _ = win_logits_BHSW.shape
    sink = sink_H.detach().float().view(1, h, 1, 1).expand(b, h, s, 1)
    logits = torch.cat([win_logits_BHSW.detach().float(), set_logits_BHSK.detach().float(), sink], dim=-1)
    width = win_logits_BHSW.shape[-1]
    probs = torch.softmax(logits, dim=-1)[..., width : width + set_ok_BSK.shape[-1]].sum(dim=1)
    return probs.masked_fill(~set_ok_BSK, 0.0)


def kl_from_probs(probs_BSK, scores_BSK, set_ok_BSK):
    """(sum over queries of KL(p_s || q_s), number of queries with a non-empty set); both fp32.

    `probs_BSK`: the set's attention probabilities summed over heads (0 where not ok; L1-normalised here);
    `scores_BSK`: the index scores of the set's entries (grad flows only here)."""
    probs = probs_BSK.detach().float()
    total = probs.sum(dim=-1, keepdim=True)
    has = set_ok_BSK.any(dim=-1) & (total.squeeze(-1) > 0)
    p = probs / total.clamp_min(torch.finfo(torch.float32).tiny)
    masked = scores_BSK.float().masked_fill(~set_ok_BSK, float("-inf")).masked_fill(~has.unsqueeze(-1), 0.0)
    log_q = torch.log_softmax(masked, dim=-1).masked_fill(~set_ok_BSK, 0.0)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)
    return torch.where(has, kl, 0.0).sum(), has.sum()


def indexer_kl(win_logits_BHSW, set_logits_BHSK, sink_H, scores_BSK, set_ok_BSK):
    """(sum over queries of KL(p_s || q_s), number of queries with a non-empty set); both fp32.

    Masked logits are -inf; `scores_BSK` are the index scores of the set's entries (grad flows only here).
    """
    probs = set_probs(win_logits_BHSW, set_logits_BHSK, sink_H, set_ok_BSK)
    return kl_from_probs(probs, scores_BSK, set_ok_BSK)
