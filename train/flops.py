"""FLOP model of a V4 config, for MFU: matmul FLOPs per training step, counting the attention actually done.

Counted (forward multiply-adds x 2, then x 3 for forward + backward): the attention projections (wq_a, wq_b,
wkv, grouped wo_a, wo_b), the compressors, the indexer (its compressor, query projection, head weights and
the scores over every causal candidate), the core attention over the keys each position really attends
(window <= sliding_window plus the top-k CSA entries, or every causal entry when dense, or every causal HCA
entry), the mHC mixes, the MoE router, the active experts (top-k + shared), hc_head, the LM head and MTP.
Norms, softmaxes and the Sinkhorn iterations are element-wise and left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp8": 1979.0, "fp32": 494.0},  # dense; fp32 = TF32
               "H100": {"bf16": 989.0, "fp8": 1979.0, "fp32": 494.0}}


def doc_lengths(doc_ids_BS: torch.Tensor) -> list[int]:
    """Lengths of the document segments of every row (a row's segments attend independently)."""
    out = []
    for row in doc_ids_BS:
        out += torch.unique_consecutive(row, return_counts=True)[1].tolist()
    return out


@dataclass
class Attended:
    """Totals over all positions of a batch: keys each query attends, and indexer candidates scored."""

    window: int
    entries: int
    candidates: int


def attended(lengths: Iterable[int], window: int, ratio: int, topk: int | None) -> Attended:
    """Window keys (<= window, inside the document), compressed entries (causal: w < (t+1)//ratio; at most
    `topk` of them when sparse, topk None = all) and causal indexer candidates, summed over positions."""
    lengths = [n for n in lengths if n > 0]
    if not lengths:
        return Attended(0, 0, 0)
    t = torch.cat([torch.arange(1, n + 1) for n in lengths])  # 1 + position inside the document
    w = int(torch.clamp(t, max=window).sum())
    if not ratio:
        return Attended(w, 0, 0)
    causal = t // ratio
    e = causal if topk is None else torch.clamp(causal, max=topk)
    return Attended(w, int(e.sum()), int(causal.sum()))


class FlopModel:
    """Training FLOPs of a V4 config (any object with the HF `DeepseekV4Config` attribute names)."""

    def __init__(self, cfg):
        self.c = cfg
        self.rates = dict(getattr(cfg, "compress_rates", None) or {CSA: 4, HCA: 128})

    def _attn_proj(self, kind: str) -> int:
        c = self.c
        d, hd, nh = c.hidden_size, c.head_dim, c.num_attention_heads
        macs = d * c.q_lora_rank + c.q_lora_rank * nh * hd + d * hd + nh * hd * c.o_lora_rank
        macs += c.o_groups * c.o_lora_rank * d
        if kind == CSA:
            ci, ni = c.index_head_dim, c.index_n_heads
            macs += 2 * d * 2 * hd  # compressor wkv + wgate, overlapping halves
            macs += 2 * d * 2 * ci + c.q_lora_rank * ni * ci + d * ni  # indexer: compressor, wq_b, weights
        elif kind == HCA:
            macs += 2 * d * hd
        return macs

    def _mhc(self) -> int:
        n, d = self.c.hc_mult, self.c.hidden_size
        return 2 * ((2 + n) * n * n * d + n * d + n * n * d + n * d)  # two sublayers: fn, collapse, mix, post

    def _moe(self) -> int:
        c = self.c
        active = c.num_experts_per_tok + c.n_shared_experts
        return c.hidden_size * c.n_routed_experts + active * 3 * c.hidden_size * c.moe_intermediate_size

    def _head(self) -> int:
        n, d = self.c.hc_mult, self.c.hidden_size
        return n * n * d + d * self.c.vocab_size

    def _mtp_extra(self) -> int:
        d, n = self.c.hidden_size, self.c.hc_mult
        return d * d + n * d * d  # e_proj, h_proj per stream

    def token_macs(self) -> int:
        """Forward multiply-adds per token of everything but the core attention and indexer scores."""
        kinds = list(self.c.layer_types)
        depth = getattr(self.c, "num_nextn_predict_layers", 0) or 0
        block = self._mhc() + self._moe()
        macs = sum(self._attn_proj(k) + block for k in kinds) + self._head()
        macs += depth * (self._mtp_extra() + self._attn_proj(SWA) + block + self._head())
        return macs

    def attention_macs(self, lengths: list[int], sparse: bool) -> int:
        """Forward multiply-adds of core attention (QK and PV) and indexer scoring for these documents."""
        c = self.c
        per_key = 2 * c.num_attention_heads * c.head_dim
        kinds = list(c.layer_types) + [SWA] * (getattr(c, "num_nextn_predict_layers", 0) or 0)
        macs = 0
        for kind in kinds:
            ratio = self.rates.get(kind, 0) if kind != SWA else 0
            topk = c.index_topk if (kind == CSA and sparse) else None
            a = attended(lengths, c.sliding_window, ratio, topk)
            macs += per_key * (a.window + a.entries)
            if kind == CSA:
                macs += c.index_n_heads * (c.index_head_dim + 1) * a.candidates
        return macs

    def step_flops(self, lengths: list[int], sparse: bool) -> float:
        """Training FLOPs (forward + backward = 3 x forward, 2 FLOPs per multiply-add) for these documents."""
        tokens = sum(lengths)
        return 3 * 2 * float(self.token_macs() * tokens + self.attention_macs(lengths, sparse))


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of the device for this precision; None when unknown (CPU without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "fp8" if precision.startswith("fp8") else ("fp32" if precision == "fp32" else "bf16")
    for gpu, table in PEAK_TFLOPS.items():
        if gpu in name:
            return table[kind] * 1e12
    return None
