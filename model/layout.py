"""Where documents start in a packed batch: doc-local positions, window masks, compressed-entry layouts.

Every document is compressed on its own from its first token (a tail shorter than the rate is dropped);
positions restart at each document; nothing a query sees crosses a document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class Entries:
    """Compressed entries of one rate, per batch row, padded to the longest row (T entries)."""

    rate: int
    start_BT: torch.Tensor  # token index of the entry's first token (0 on padding)
    pos_BT: torch.Tensor  # doc-local position of that token (= w * rate): the entry's RoPE position
    has_prev_BT: torch.Tensor  # bool: the previous window of the same document exists (w > 0)
    valid_BT: torch.Tensor  # bool: a real entry, not padding
    first_BS: torch.Tensor  # slot of the first entry of query s's document
    nvis_BS: torch.Tensor  # how many entries query s may use: slots first .. first + nvis - 1

    @property
    def count(self) -> int:
        return self.start_BT.shape[1]

    def visible(self, lo: int = 0, hi: int | None = None, t0: int = 0, t1: int | None = None) -> torch.Tensor:
        """bool [B, hi-lo, t1-t0]: query s in [lo, hi) may use entry t in [t0, t1) (same doc, complete)."""
        t = torch.arange(t0, self.count if t1 is None else t1, device=self.start_BT.device)
        first, nvis = self.first_BS[:, lo:hi, None], self.nvis_BS[:, lo:hi, None]
        return (t >= first) & (t < first + nvis)

    @cached_property
    def visible_BST(self) -> torch.Tensor:
        """The whole [B, S, T] visibility mask (dense reference only: quadratic in S)."""
        return self.visible()

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """The entry range [t0, t1) that queries lo .. hi-1 can see at all."""
        first, nvis = self.first_BS[:, lo:hi], self.nvis_BS[:, lo:hi]
        return int(first.min().item()), int((first + nvis).max().item())


@dataclass
class SeqLayout:
    """Per-forward description of the batch's documents; built once and shared by all layers."""

    positions_BS: torch.Tensor  # doc-local positions
    run_BS: torch.Tensor | None  # document index per token (None: one document per row)
    _entries: dict = field(default_factory=dict)

    @classmethod
    def build(cls, batch: int, seq: int, device: torch.device, doc_ids_BS: torch.Tensor | None) -> SeqLayout:
        t = torch.arange(seq, device=device)
        if doc_ids_BS is None:
            return cls(t.unsqueeze(0).expand(batch, seq), None)
        starts = torch.ones(batch, seq, dtype=torch.bool, device=device)
        starts[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
        first = torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=1).values
        return cls(t - first, torch.cumsum(starts.long(), dim=1))

    def same_doc(self, a_BX: torch.Tensor | None, b_BY: torch.Tensor | None) -> torch.Tensor | None:
        if a_BX is None:
            return None
        return a_BX.unsqueeze(-1) == b_BY.unsqueeze(-2)

    def window_mask(self, window: int) -> torch.Tensor:
        """[B|1, S, S] bool: key s visible to query t iff same document and 0 <= t - s < window."""
        seq = self.positions_BS.shape[1]
        t = torch.arange(seq, device=self.positions_BS.device)
        delta = t[:, None] - t[None, :]
        mask = ((delta >= 0) & (delta < window)).unsqueeze(0)
        if self.run_BS is not None:
            mask = mask & self.same_doc(self.run_BS, self.run_BS)
        return mask

    def entries(self, rate: int) -> Entries:
        if rate not in self._entries:
            self._entries[rate] = self._build_entries(rate)
        return self._entries[rate]

    def _build_entries(self, rate: int) -> Entries:
        batch, seq = self.positions_BS.shape
        device = self.positions_BS.device
        t = torch.arange(seq, device=device)
        if self.run_BS is None:
            count = seq // rate
            start = (torch.arange(count, device=device) * rate).unsqueeze(0).expand(batch, count)
            valid = torch.ones(batch, count, dtype=torch.bool, device=device)
            pos = start
            first = torch.zeros(batch, seq, dtype=torch.long, device=device)
        else:
            is_end = (self.positions_BS + 1) % rate == 0
            count = int(is_end.sum(dim=1).max().item()) if seq else 0
            slot = torch.cumsum(is_end.long(), dim=1) - 1
            b_idx, t_idx = is_end.nonzero(as_tuple=True)
            start = torch.zeros(batch, count, dtype=torch.long, device=device)
            valid = torch.zeros(batch, count, dtype=torch.bool, device=device)
            start[b_idx, slot[b_idx, t_idx]] = t_idx - rate + 1
            valid[b_idx, slot[b_idx, t_idx]] = True
            pos = self.positions_BS.gather(1, start)
            # entries completed before the document's first token = the document's first slot
            doc_start = t - self.positions_BS
            done_before = torch.cumsum(is_end.long(), dim=1) - is_end.long()
            first = done_before.gather(1, doc_start)
        nvis = (self.positions_BS + 1) // rate
        return Entries(rate, start, pos, pos >= rate, valid, first, nvis)
