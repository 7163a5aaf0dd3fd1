"""Sequence-wise balance loss (alpha * sum_i f_i P_i per sequence, averaged) and expert loads."""

import torch

from model.moe import Routing, expert_counts


def sequence_balance_loss(routing: Routing, batch: int, n_experts: int, top_k: int) -> torch.Tensor:
    """Mean over sequences of sum_i f_i P_i; f_i = E/(k T) * #picks of i, P_i = mean_t s_it / sum_j s_jt."""
    scores = routing.scores_NE.view(batch, -1, n_experts)
    seq = scores.shape[1]
    probs = scores / scores.sum(dim=-1, keepdim=True)
    picks = routing.indices_NK.reshape(batch, -1)
    chosen = torch.zeros(batch, n_experts, device=scores.device, dtype=torch.float32)
    chosen.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float32))
    f = chosen * n_experts / (top_k * seq)
    return (f * probs.mean(dim=1)).sum(dim=-1).mean()


def expert_load(routing: Routing, n_experts: int) -> torch.Tensor:
    """Number of (token, slot) assignments per expert over the whole batch, as float [E] (no host sync)."""
    return expert_counts(routing.indices_NK.reshape(-1), n_experts).float()
