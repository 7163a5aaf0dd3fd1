"""Frozen teachers: a domain expert's checkpoint as a model in eval mode that never takes a gradient.

`hidden(ids)` runs the teacher up to its final hidden states (the head is bypassed for that pass), and
`head(hidden_NH)` turns a chunk of them into logits, so a distillation step never holds the teacher's
full [B, S, V] logits (DeepSeek-V4 caches only the teachers' last hidden states). The teacher may live on
another device than the student (`distill.teacher_device`); results come back on the caller's device.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
    def hidden(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, S, H] (after the last norm, before the head), on `ids_BS`'s device."""
        self.model.eval()
        with _without_head(self.model), autocast(self.precision, self.device):
            out = self.model(ids_BS.to(self.device), with_mtp=False)
        return out.logits.float().to(ids_BS.device)

    @torch.no_grad()
    def head(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] of a chunk of final hidden states (float32, on the teacher's device)."""
        w = self.model.head.weight
        return F.linear(hidden_NH.to(self.device, w.dtype), w).float()
