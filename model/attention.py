"""V4 attention: low-rank queries, one shared K=V head, window + compressed entries (CSA/HCA), sink."""

import torch
from torch import nn

from model.compressor import Compressor
from model.config import CSA, SLIDING, ModelConfig
from model.context import ForwardContext, rope_label
from model.errors import ConfigError
from model.indexer import Indexer, select_topk, selection_mask
from model.indexer_loss import indexer_kl
from model.norm import RMSNorm, rms_norm
from model.rope import apply_rope
from model.sparse_attention import sparse_layer


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
        self.window = config.sliding_window
        self.topk_active = True  # False in the dense training phase: CSA attends to every visible entry
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

    def select(self, scores_BST: torch.Tensor, visible_BST: torch.Tensor):
        """The one place where CSA picks entries: top-k of the visible ones -> (indices, ok) [B, S, k']."""
        k = self.index_topk if self.topk_active else scores_BST.shape[-1]
        return select_topk(scores_BST, visible_BST, k)

    def project(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(queries [B, S, H, C], K=V [B, S, C], low-rank query c_Q [B, S, d_c]), RoPE applied."""
        qr = self.q_norm(self.wq_a(x_BSD))
        q = rms_norm(self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim)), self.eps)
        q = apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2))
        return q, apply_rope(self.kv_norm(self.wkv(x_BSD)), cos, sin), qr

    def forward(self, x_BSD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.decode is not None:
            o = ctx.decode.attend(self, x_BSD, ctx)
        else:
            o = self.attend(x_BSD, ctx)
        return self.output(o, *ctx.token_rope(self.rope_label))

    def output(self, o_BSHC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """De-rotate each head's output, then the grouped low-rank output projection."""
        o = apply_rope(o_BSHC, cos.unsqueeze(2), sin.unsqueeze(2), inverse=True)
        return self.wo_b(self.grouped_out(o))

    def attend(self, x_BSD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Core attention of a whole (packed) sequence -> [B, S, H, C]; adds the indexer KL to `ctx`."""
        cfg = ctx.config
        cos, sin = ctx.token_rope(self.rope_label)
        q, kv, qr = self.project(x_BSD, cos, sin)
        comp = entries = index = None
        if self.compressor is not None:
            entries = ctx.entries(self.rate)
            ecos, esin = ctx.entry_rope(self.rope_label, self.rate)
            comp = self.compressor(x_BSD, entries, ecos, esin)
            if self.indexer is not None:  # detached inputs: the indexer learns only from its own loss
                x_d = x_BSD.detach()
                iq, iw = self.indexer.queries(x_d, qr.detach(), cos, sin)
                index = (iq, iw, self.indexer.keys(x_d, entries, ecos, esin))
        mode = cfg.indexer_loss_mode if index is not None else "off"
        if cfg.attn_impl == "sparse":
            pos = ctx.layout.positions_BS
            o, kl = sparse_layer(self, q, kv, comp, entries, index, pos, mode, cfg.attn_chunk_tokens)
        elif cfg.attn_impl == "triton":  # Triton kernels; imported here so TRITON_INTERPRET is read late
            if not self.topk_active:
                raise ConfigError("model.attn_impl", "the dense CSA phase (trainer.sparse_from_step) runs on "
                                  "attn_impl=sparse or dense, not triton")
            from model.kernels.attn_layer import triton_layer

            pos = ctx.layout.positions_BS
            o, kl = triton_layer(self, q, kv, comp, entries, index, pos, mode, cfg.attn_chunk_tokens)
        else:
            o, kl = self.dense(q, kv, comp, entries, index, mode, ctx.window_mask())
        if kl is not None:
            ctx.indexer_losses.append(kl)
        return o

    def dense(self, q, kv, comp, entries, index, mode: str, window_BSS):
        """The masked S x S reference (HF's math) -> (output [B, S, H, C], indexer KL or None)."""
        mask = sel = scores = None
        if comp is not None:
            mask = sel = entries.visible_BST
            if index is not None:
                scores = self.indexer.score(*index)
                sel = selection_mask(*self.select(scores, mask), entries.count)
        o = attention_core(q, kv, window_BSS, comp, sel, self.attn_sink, self.scale)
        if mode == "off":
            return o, None
        keep = mask if mode == "dense" else sel
        win = torch.einsum("bshc,btc->bhst", q, kv) * self.scale
        win = win.masked_fill(~window_BSS.unsqueeze(1), float("-inf"))
        entry = torch.einsum("bshc,btc->bhst", q, comp) * self.scale
        entry = entry.masked_fill(~keep.unsqueeze(1), float("-inf"))
        total, n = indexer_kl(win, entry, self.attn_sink, scores, keep)
        return o, total / n.clamp_min(1)

    def grouped_out(self, o_BSHC: torch.Tensor) -> torch.Tensor:
        """Block-diagonal `wo_a`: each of the g head groups is projected by its own [d_g, H*C/g] block."""
        b, s = o_BSHC.shape[:2]
        groups = o_BSHC.reshape(b, s, self.groups, -1)
        w = self.wo_a.weight.view(self.groups, -1, groups.shape[-1])
        return torch.einsum("bsgi,goi->bsgo", groups, w).flatten(2)
