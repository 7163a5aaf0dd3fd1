"""Frozen teachers: a domain expert's checkpoint as a model in eval mode that never takes a gradient.

`hidden(ids)` runs the teacher up to its final hidden states (the head is bypassed for that pass), and
`head(hidden_NH, v0, v1)` turns a block of them into the logits of vocabulary entries v0:v1, so a
distillation step never holds the teacher's full [B, S, V] logits, only [chunk_rows, chunk_vocab] blocks
(DeepSeek-V4 caches only the teachers' last hidden states). `source(ids, positions, cfg)` is what the loss
reads: the teacher's log-prob chunks at the response positions. The teacher may live on another device
than the student (`distill.teacher_device`) or on another rank (distill.remote).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import DistillLossConfig, RowSource, head_source
from distill.objective import gather_positions
from model import ModelConfig, Transformer
from model.errors import ConfigError, MoeforgeError
from train import checkpoint
from train.precision import autocast


@contextlib.contextmanager
def _without_head(model: Transformer):
    """The model's forward returns its final hidden states in `logits` while this is open."""
    head = model.head
    model.head = nn.Identity()
    try:
        yield
    finally:
        model.head = head


def model_config_of(path: Path, key: str) -> ModelConfig:
    """The model config a checkpoint was written with; a ConfigError naming `key` if it has none."""
    try:
        saved = checkpoint.config_of(path)
    except MoeforgeError as e:
        raise ConfigError(key, str(e)) from e
    if not isinstance(saved.get("model"), dict):
        raise ConfigError(key, f"checkpoint {path} records no model config in its manifest")
    return ModelConfig.from_dict(saved["model"])


class Teacher:
    """Domain `name`'s expert loaded from checkpoint `path` onto `device`, frozen, in eval mode."""

    def __init__(self, name: str, path: Path, device: torch.device, precision: str = "fp32"):
        self.name, self.path, self.device, self.precision = name, Path(path), device, precision
        key = f"teachers.{name}"
        self.model = Transformer(model_config_of(self.path, key))
        try:
            ck = checkpoint.load(self.path, self.model)
        except MoeforgeError as e:
            raise ConfigError(key, str(e)) from e
        self.tokenizer_hash = ck.tokenizer_hash
        self.model.to(device).eval().requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.no_grad()
    def hidden(self, ids_BS: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Final hidden states [B, S, H] (after the last norm, before the head), on `device` (default
        `ids_BS`'s)."""
        self.model.eval()
        with _without_head(self.model), autocast(self.precision, self.device):
            out = self.model(ids_BS.to(self.device), with_mtp=False)
        return out.logits.float().to(ids_BS.device if device is None else device)

    @torch.no_grad()
    def head(self, hidden_NH: torch.Tensor, v0: int = 0, v1: int | None = None) -> torch.Tensor:
        """Logits [N, v1 - v0] of vocabulary entries v0:v1 (default all) of a block of final hidden states
        (float32, on the teacher's device)."""
        w = self.model.head.weight[v0:v1]
        return F.linear(hidden_NH.to(self.device, w.dtype), w).float()

    def source(self, ids_BS: torch.Tensor, pos_BT: torch.Tensor, cfg: DistillLossConfig) -> RowSource:
        """The teacher's log-prob chunks (on its device) at positions `pos_BT` of `ids_BS`, flattened
        row-major: hidden states of the whole batch, logits one [chunk_rows, chunk_vocab] block at a time."""
        h = gather_positions(self.hidden(ids_BS, self.device), pos_BT.to(self.device))
        return head_source(h.reshape(-1, h.shape[-1]), self.head, self.vocab_size, cfg)
