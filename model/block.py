"""One transformer block: mHC -> RMSNorm -> attention -> mHC-post, mHC -> RMSNorm -> MoE -> mHC-post."""

import torch
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.context import ForwardContext
from model.mhc import HyperConnection
from model.moe import MoE, Routing
from model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, mlp_type: str):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.hc_attn = HyperConnection(d, config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, eps)
        self.hc_ffn = HyperConnection(d, config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, eps)
        self.attn_norm = RMSNorm(d, eps)
        self.ffn_norm = RMSNorm(d, eps)
        self.attn = Attention(config, layer_type)
        self.ffn = MoE(config, mlp_type)

    def forward(
        self,
        streams_BSND: torch.Tensor,
        ctx: ForwardContext,
        input_ids_BS: torch.Tensor | None,
        replay_BSK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Routing]:
        x, post, res = self.hc_attn(streams_BSND)
        streams_BSND = self.hc_attn.post(self.attn(self.attn_norm(x), ctx), streams_BSND, post, res)
        x, post, res = self.hc_ffn(streams_BSND)
        y, routing = self.ffn(self.ffn_norm(x), input_ids_BS, replay_BSK)
        return self.hc_ffn.post(y, streams_BSND, post, res), routing
