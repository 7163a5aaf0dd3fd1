"""Packing documents into fixed-length rows, and the document ids and labels of packed rows.

Each document becomes `<|bos|> tokens <|eos|>`; documents are concatenated and cut every `seq_len` tokens,
so a document longer than a row (or crossing a row boundary) continues in the next row, where its
remainder counts as a separate document. The final partial row is padded with `<|pad|>`.

Document ids are recomputed from the tokens: inside a row a new document starts after each `<|eos|>`
(ids 0, 1, 2, ... per row; trailing padding gets the next id). Labels are the next token when it belongs
to the same document, and -100 at each document's last position, at the row's last position and on
padding. Documents never contain special ids (see data.tokenizer), so `<|eos|>` marks ends exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from data.tokenizer import BOS, EOS, PAD

IGNORE = -100


class Packer:
    """Accumulates documents and emits full rows of `seq_len` tokens."""

    def __init__(self, seq_len: int, dtype=np.int64):
        self.seq_len = seq_len
        self.dtype = dtype
        self.buf: list[int] = []

    def add(self, ids: list[int]) -> list[np.ndarray]:
        """Append one document (without bos/eos); return the rows it completed."""
        self.buf += [BOS, *ids, EOS]
        n = len(self.buf) // self.seq_len
        rows = [np.asarray(self.buf[i * self.seq_len:(i + 1) * self.seq_len], dtype=self.dtype)
                for i in range(n)]
        del self.buf[: n * self.seq_len]
        return rows

    def flush(self) -> list[np.ndarray]:
        """The padded final row, if any tokens remain."""
        if not self.buf:
            return []
        row = np.full(self.seq_len, PAD, dtype=self.dtype)
        row[: len(self.buf)] = self.buf
        self.buf = []
        return [row]


def pack(documents: Iterable[list[int]], seq_len: int, dtype=np.int64) -> Iterator[np.ndarray]:
    """Rows `[seq_len]` of the packed token stream of `documents` (lists of ids)."""
    packer = Packer(seq_len, dtype)
    for ids in documents:
        yield from packer.add(ids)
    yield from packer.flush()


def doc_ids_of(tokens_BS: torch.Tensor) -> torch.Tensor:
    """Per-row document ids: a new document starts after every `<|eos|>`."""
    starts = torch.zeros_like(tokens_BS)
    starts[:, 1:] = (tokens_BS[:, :-1] == EOS).to(tokens_BS.dtype)
    return starts.cumsum(dim=1)


def next_token_labels(tokens_BS: torch.Tensor, doc_ids_BS: torch.Tensor, keep_BS: torch.Tensor | None = None):
    """Next token within the same document, else -100; `keep_BS` (bool) additionally masks targets."""
    labels = torch.full_like(tokens_BS, IGNORE)
    same = (doc_ids_BS[:, 1:] == doc_ids_BS[:, :-1]) & (tokens_BS[:, 1:] != PAD) & (tokens_BS[:, :-1] != PAD)
    if keep_BS is not None:
        same &= keep_BS[:, 1:]
    labels[:, :-1] = torch.where(same, tokens_BS[:, 1:], torch.full_like(tokens_BS[:, 1:], IGNORE))
    return labels


def pretrain_batch(tokens_BS: torch.Tensor) -> dict[str, torch.Tensor]:
    """The training batch of packed rows: `input_ids`, `doc_ids`, `labels` (all long)."""
    tokens_BS = tokens_BS.long()
    doc_ids = doc_ids_of(tokens_BS)
    return {"input_ids": tokens_BS, "doc_ids": doc_ids, "labels": next_token_labels(tokens_BS, doc_ids)}
