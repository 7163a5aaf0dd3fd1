"""V4 attention: low-rank queries, one shared K=V head, window + compressed entries (CSA/HCA), sink."""

import torch
from torch import nn

from model.compressor import Compressor
from model.config import CSA, SLIDING, ModelConfig
from model.context import ForwardContext, rope_label
from model.indexer import Indexer, select_topk, selection_mask
from model.norm import RMSNorm, rms_norm
from model.rope import apply_rope


def attention_core(
    q_BSHC: torch.Tensor,
    kv_BSC: torch.Tensor,
    window_mask_BSS: torch.Tensor,
    comp_BTC: torch.Tensor | None,
    comp_mask_BST: torch.Tensor | None,
    sink_H: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dense masked reference: softmax over {window keys} U {allowed compressed entries} U {sink}.

    K = V for both key sets; the per-head sink logit only enters the denominator. Returns [B, S, H, C].
    """
    b, s, h, _ = q_BSHC.shape
    logits = torch.einsum("bshc,btc->bhst", q_BSHC, kv_BSC) * scale
    logits = logits.masked_fill(~window_mask_BSS.unsqueeze(1), float("-inf"))
    parts = [logits]
    if comp_BTC is not None:
        comp_logits = torch.einsum("bshc,btc->bhst", q_BSHC, comp_BTC) * scale
        parts.append(comp_logits.masked_fill(~comp_mask_BST.unsqueeze(1), float("-inf")))
    sink = sink_H.to(logits.dtype).view(1, h, 1, 1).expand(b, h, s, 1)
    probs = torch.softmax(torch.cat([*parts, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    probs = probs.to(kv_BSC.dtype)
    out = torch.einsum("bhst,btc->bshc", probs[..., :s], kv_BSC)
    if comp_BTC is not None:
        out = out + torch.einsum("bhst,btc->bshc", probs[..., s:], comp_BTC)
    return out


class Attention(nn.Module):
    """One attention layer: sliding-only, CSA (compressed + indexer top-k) or HCA (all causal entries)."""

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        c, d, h = config.head_dim, config.hidden_size, config.num_attention_heads
        self.layer_type, self.rope_label = layer_type, rope_label(layer_type)
        self.n_heads, self.head_dim, self.groups = h, c, config.o_groups
        self.eps, self.scale, self.index_topk = config.rms_norm_eps, c**-0.5, config.index_topk
        self.wq_a = nn.Linear(d, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = nn.Linear(config.q_lora_rank, h * c, bias=False)
        self.wkv = nn.Linear(d, c, bias=False)
        self.kv_norm = RMSNorm(c, config.rms_norm_eps)
        self.wo_a = nn.Linear(h * c // config.o_groups, config.o_groups * config.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(config.o_groups * config.o_lora_rank, d, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(h, dtype=torch.float32))
        self.rate = config.compress_rate(layer_type) if layer_type != SLIDING else 0
        self.compressor = (
            Compressor(d, c, self.rate, overlap=layer_type == CSA, eps=config.rms_norm_eps)
            if layer_type != SLIDING
            else None
        )
        self.indexer = (
            Indexer(d, config.q_lora_rank, config.index_n_heads, config.index_head_dim, self.rate, self.eps)
            if layer_type == CSA
            else None
        )

    def select(self, scores_BST: torch.Tensor, visible_BST: torch.Tensor) -> torch.Tensor:
        """The one place where CSA picks its entries: top-k of the visible ones -> bool mask [B, S, T]."""
        idx, ok = select_topk(scores_BST, visible_BST, self.index_topk)
        return selection_mask(idx, ok, visible_BST.shape[-1])

    def forward(self, x_BSD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        cos, sin = ctx.token_rope(self.rope_label)
        qr = self.q_norm(self.wq_a(x_BSD))
        q = rms_norm(self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim)), self.eps)
        q = apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2))
        kv = apply_rope(self.kv_norm(self.wkv(x_BSD)), cos, sin)
        comp = comp_mask = None
        if self.compressor is not None:
            entries = ctx.entries(self.rate)
            ecos, esin = ctx.entry_rope(self.rope_label, self.rate)
            comp = self.compressor(x_BSD, entries, ecos, esin)
            comp_mask = entries.visible_BST
            if self.indexer is not None:
                scores = self.indexer(x_BSD, qr, cos, sin, entries, ecos, esin)
                comp_mask = self.select(scores, comp_mask)
        o = attention_core(q, kv, ctx.window_mask(), comp, comp_mask, self.attn_sink, self.scale)
        o = apply_rope(o, cos.unsqueeze(2), sin.unsqueeze(2), inverse=True)
        return self.wo_b(self.grouped_out(o))

    def grouped_out(self, o_BSHC: torch.Tensor) -> torch.Tensor:
        """Block-diagonal `wo_a`: each of the g head groups is projected by its own [d_g, H*C/g] block."""
        b, s = o_BSHC.shape[:2]
        groups = o_BSHC.reshape(b, s, self.groups, -1)
        w = self.wo_a.weight.view(self.groups, -1, groups.shape[-1])
        return torch.einsum("bsgi,goi->bsgo", groups, w).flatten(2)
