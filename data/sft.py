"""SFT data: conversations (a `messages` column, or task records) rendered with data.chat, then packed or
padded into rows with `input_ids`, `doc_ids`, `labels` and `loss_mask`.

`labels[i]` is token i+1 when it is in the same conversation and is an assistant token (content or its
`<|end|>`), else -100; `loss_mask` is `labels != -100` as float (aligned with `labels`, not with tokens).
A conversation is never split: one longer than the row is skipped with a warning (all skipped is an
error naming trainer.seq_len). Packed rows hold several whole conversations (doc ids 0, 1, ...; padding
gets its own id); padded rows hold one each.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from data.chat import ROLES, render
from data.config import DataConfig
from data.loader import Loader
from data.packing import next_token_labels
from data.sources import make_source
from data.tokenizer import PAD
from model.errors import MoeforgeError

log = logging.getLogger(__name__)


def as_messages(value: Any, field: str, where: str) -> list[dict] | None:
    """Validate one conversation value (a list of {role, content}); empty lists are skipped."""
    if not value:
        return None
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise MoeforgeError(f"data.messages_field: column {field!r} of {where} must be a list of "
                            f"{{role: system|user|assistant, content: str}}, got {value!r:.200}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_conversations(cfg: DataConfig, split: str = "train") -> list[list[dict]]:
    """Conversations of `split` from `data.path` (files or hub) in the `data.messages_field` column."""
    if cfg.source == "builtin":
        raise MoeforgeError("data.source: SFT conversations need data=files or data=hf (a messages column)")
    source = make_source(cfg)
    return [m for _, m in source.values(split, cfg.messages_field, as_messages, "data.messages_field")]


def task_conversations(records: list[dict], system: str | None = None) -> list[list[dict]]:
    """SFT conversations from task records: user = `prompt`, assistant = `solution`."""
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["solution"]}]
            for r in records]


class SFTRows:
    """In-memory rows of tokens, doc ids and token loss masks; `batch(idx)` gives the SFT batch."""

    def __init__(self, tokens: np.ndarray, doc_ids: np.ndarray, assistant: np.ndarray):
        self.tokens, self.doc_ids, self.assistant = tokens, doc_ids, assistant

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.tokens[idx]).long()
        doc_ids = torch.from_numpy(self.doc_ids[idx]).long()
        labels = next_token_labels(tokens, doc_ids, torch.from_numpy(self.assistant[idx]))
        loss_mask = (labels != -100).float()
        return {"input_ids": tokens, "doc_ids": doc_ids, "labels": labels, "loss_mask": loss_mask}


def pack_conversations(encoded: list[tuple[list[int], list[int]]], seq_len: int,
                       packed: bool = True) -> SFTRows:
    """Rows from rendered `(ids, mask)` pairs in order: greedy packing (new row when full) or one per row."""
    fits = [e for e in encoded if len(e[0]) <= seq_len]
    if len(fits) < len(encoded):
        log.warning("skipped %d of %d conversations longer than seq_len %d", len(encoded) - len(fits),
                    len(encoded), seq_len)
    if not fits:
        raise MoeforgeError(f"trainer.seq_len: every conversation is longer than {seq_len} tokens")
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len + 1
    for e in fits:
        if not packed or used + len(e[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e[0])
    tokens = np.full((len(rows), seq_len), PAD, dtype=np.int64)
    doc_ids = np.zeros((len(rows), seq_len), dtype=np.int64)
    assistant = np.zeros((len(rows), seq_len), dtype=bool)
    for r, row in enumerate(rows):
        pos = 0
        for d, (ids, mask) in enumerate(row):
            tokens[r, pos:pos + len(ids)] = ids
            doc_ids[r, pos:pos + len(ids)] = d
            assistant[r, pos:pos + len(ids)] = np.asarray(mask, dtype=bool)
            pos += len(ids)
        doc_ids[r, pos:] = len(row)
    return SFTRows(tokens, doc_ids, assistant)


def build_sft_loader(conversations: list[list[dict]], tok: Tokenizer, *, seq_len: int, batch_size: int,
                     seed: int = 0, rank: int = 0, world: int = 1, packed: bool = True,
                     shuffle: bool = True) -> Loader:
    """Render, pack and wrap conversations in a resumable loader."""
    encoded = [render(m, tok, "data.messages_field") for m in conversations]
    rows = pack_conversations(encoded, seq_len, packed)
    return Loader(rows, batch_size, seed=seed, rank=rank, world=world, shuffle=shuffle)
