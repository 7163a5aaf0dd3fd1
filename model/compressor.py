"""Token-level KV compressor: one entry per window of m tokens (overlapping windows of 2m for CSA)."""

import torch
from torch import nn

from model.layout import Entries
from model.norm import RMSNorm
from model.rope import apply_rope


def gather_tokens(x_BSF: torch.Tensor, idx_B_: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, ...]] -> [B, *idx.shape[1:], F].

    One `index_select` over the flattened rows: its backward is an `index_add_` (atomic adds on CUDA), where
    advanced indexing's backward is a sort-based `index_put_` several times slower at attention sizes."""
    b, n = x_BSF.shape[:2]
    rows = torch.arange(b, device=x_BSF.device).view(-1, *([1] * (idx_B_.dim() - 1))) * n
    flat = (idx_B_.long() + rows).reshape(-1)
    return x_BSF.flatten(0, 1).index_select(0, flat).view(*idx_B_.shape, *x_BSF.shape[2:])


class Compressor(nn.Module):
    """Softmax-gated pooling of each window with a learned position bias `ape`, then RMSNorm and RoPE.

    With `overlap` (CSA, m = 4) `wkv`/`wgate` produce two series: the first `head_dim` channels feed the
    *next* window's entry, the last `head_dim` channels the window's own entry (2m slots per entry).
    """

    def __init__(self, dim: int, head_dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.rate, self.overlap = head_dim, rate, overlap
        width = (2 if overlap else 1) * head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.empty(rate, width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps)

    def project(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (values, gate logits) [B, S, width], before the position bias."""
        return self.wkv(x_BSD), self.wgate(x_BSD)

    def pool(self, kv_BNW, gate_BNW, idx_BTM, has_prev_BT, cos_BTR, sin_BTR) -> torch.Tensor:
        """Entries [B, T, head_dim] from projected tokens; idx_BTM: rows of each window's m tokens."""
        values = gather_tokens(kv_BNW, idx_BTM)
        logits = gather_tokens(gate_BNW, idx_BTM) + self.ape
        if self.overlap:
            c = self.head_dim
            prev = (idx_BTM - self.rate).clamp(min=0)
            prev_logits = (gather_tokens(gate_BNW, prev)[..., :c] + self.ape[:, :c]).masked_fill(
                ~has_prev_BT[..., None, None], float("-inf")
            )
            values = torch.cat([gather_tokens(kv_BNW, prev)[..., :c], values[..., c:]], dim=2)
            logits = torch.cat([prev_logits, logits[..., c:]], dim=2)
        weights = logits.softmax(dim=2, dtype=torch.float32).to(values.dtype)
        pooled = self.norm((values * weights).sum(dim=2))
        return apply_rope(pooled, cos_BTR, sin_BTR)

    def forward(self, x_BSD: torch.Tensor, entries: Entries, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor):
        """Compressed entries [B, T, head_dim] for the layout's windows (padding rows: junk, masked later)."""
        idx = entries.start_BT.unsqueeze(-1) + torch.arange(self.rate, device=x_BSD.device)  # [B, T, m]
        return self.pool(*self.project(x_BSD), idx, entries.has_prev_BT, cos_BTR, sin_BTR)
