"""Per-forward tables shared by all layers: document layout, RoPE tables, masks (computed lazily, cached)."""

from __future__ import annotations

import torch

from model.config import SLIDING, ModelConfig
from model.layout import Entries, SeqLayout
from model.rope import cos_sin, inv_freq


def rope_label(layer_type: str) -> str:
    """Sliding-only layers use the "main" RoPE; CSA/HCA layers use "compress" (with YaRN) for everything."""
    return "main" if layer_type == SLIDING else "compress"


class ForwardContext:
    """Everything attention needs besides its input; one per forward call."""

    def __init__(self, config: ModelConfig, layout: SeqLayout, dtype: torch.dtype, decode=None):
        self.config, self.layout, self.dtype = config, layout, dtype
        self.decode = decode  # a `model.cache.DecodeStep` when appending to a decode cache, else None
        self.indexer_losses: list[torch.Tensor] = []  # per CSA layer, appended by the attention layers
        self._cache: dict = {}

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def freqs(self, label: str) -> torch.Tensor:
        cfg = self.config
        return self._cached(("freqs", label), lambda: inv_freq(cfg.rope_parameters[label], cfg.rope_head_dim))

    def token_rope(self, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, S, rope/2] at the tokens' doc-local positions."""
        positions = self.layout.positions_BS
        return self._cached(("tok", label), lambda: cos_sin(self.freqs(label), positions, self.dtype))

    def entries(self, rate: int) -> Entries:
        return self.layout.entries(rate)

    def entry_rope(self, label: str, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, rope/2] at each compressed entry's position w * rate."""
        return self._cached(
            ("ent", label, rate), lambda: cos_sin(self.freqs(label), self.entries(rate).pos_BT, self.dtype)
        )

    def window_mask(self) -> torch.Tensor:
        return self._cached("window", lambda: self.layout.window_mask(self.config.sliding_window))
