"""Multi-token prediction block: combines the previous depth's streams with the embedding of a later token."""

import torch
from torch import nn

from model.block import Block
from model.config import MOE, SLIDING, ModelConfig
from model.context import ForwardContext
from model.mhc import HyperHead
from model.moe import Routing
from model.norm import RMSNorm


class MTPBlock(Block):
    """Sliding-only attention, learned routing; own `hc_head` and `norm`; embedding and head are shared."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, SLIDING, MOE)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, eps)
        self.hnorm = RMSNorm(d, eps)
        self.norm = RMSNorm(d, eps)
        self.hc_head = HyperHead(d, config.hc_mult, config.hc_eps, eps)

    def forward(
        self, streams_BSND: torch.Tensor, emb_BSD: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """(new streams for the next depth, normed hidden state [B, S, D] for the head, routing)."""
        x = self.e_proj(self.enorm(emb_BSD)).unsqueeze(2) + self.h_proj(self.hnorm(streams_BSND))
        streams, routing = super().forward(x, ctx, None)
        return streams, self.norm(self.hc_head(streams)), routing
