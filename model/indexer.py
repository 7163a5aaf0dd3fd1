"""Lightning indexer (CSA): scores compressed entries per query; top-k selection lives here too."""

import torch
from torch import nn

from model.compressor import Compressor
from model.layout import Entries
from model.rope import apply_rope


class Indexer(nn.Module):
    """I[s, t] = sum_h w[s, h] * ReLU(q[s, h] . K[t]) with its own overlapping compressor of width c_I."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rate: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.compressor = Compressor(dim, head_dim, rate, overlap=True, eps=eps)
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)

    def keys(self, x_BSD, entries: Entries, cos_BTR, sin_BTR) -> torch.Tensor:
        """Indexer keys [B, T, c_I] of the layout's compressed entries."""
        return self.compressor(x_BSD, entries, cos_BTR, sin_BTR)

    def queries(self, x_BSD, qr_BSR, cos_BSR, sin_BSR) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [B, S, n_I, c_I] fp32 with RoPE, head weights [B, S, n_I] fp32 incl. 1/sqrt(n_I))."""
        q = self.wq_b(qr_BSR).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(q, cos_BSR.unsqueeze(2), sin_BSR.unsqueeze(2)).float()
        weights = self.weights_proj(x_BSD).float() * self.n_heads**-0.5
        return q, weights

    @staticmethod
    def score(q_BSHC: torch.Tensor, w_BSH: torch.Tensor, keys_BTC: torch.Tensor) -> torch.Tensor:
        """I[s, t] = sum_h w[s, h] ReLU(q[s, h] . K[t]) -> [B, S, T] fp32 (not masked)."""
        scores = torch.einsum("bshc,btc->bsht", q_BSHC, keys_BTC.float()).relu() * q_BSHC.shape[-1] ** -0.5
        return (scores * w_BSH.unsqueeze(-1)).sum(dim=2)

    @staticmethod
    def score_at(q_BSHC: torch.Tensor, w_BSH: torch.Tensor, keys_BSKC: torch.Tensor) -> torch.Tensor:
        """The same scores for per-query gathered keys [B, S, K, c_I] -> [B, S, K] fp32."""
        scores = torch.einsum("bshc,bskc->bshk", q_BSHC, keys_BSKC.float()).relu() * q_BSHC.shape[-1] ** -0.5
        return (scores * w_BSH.unsqueeze(-1)).sum(dim=2)

    def forward(self, x_BSD, qr_BSR, cos_BSR, sin_BSR, entries: Entries, cos_BTR, sin_BTR) -> torch.Tensor:
        """Index scores [B, S, T] in fp32 (not yet masked)."""
        q, w = self.queries(x_BSD, qr_BSR, cos_BSR, sin_BSR)
        return self.score(q, w, self.keys(x_BSD, entries, cos_BTR, sin_BTR))


def select_topk(scores_BST: torch.Tensor, visible_BST: torch.Tensor, k: int):
    """Top-k visible entries per query: (indices [B, S, k'], ok [B, S, k']) with k' = min(k, T).

    `ok` is False where a query has fewer than k' visible entries (those picks are not to be used).
    """
    k = min(k, scores_BST.shape[-1])
    idx = scores_BST.masked_fill(~visible_BST, float("-inf")).topk(k, dim=-1).indices
    return idx, visible_BST.gather(-1, idx)


def selection_mask(idx_BSK: torch.Tensor, ok_BSK: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean [B, S, T] mask of the selected entries."""
    mask = torch.zeros(*idx_BSK.shape[:-1], count + 1, dtype=torch.bool, device=idx_BSK.device)
    mask.scatter_(-1, torch.where(ok_BSK, idx_BSK, count), True)
    return mask[..., :count]
