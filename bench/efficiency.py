"""Long-context efficiency of V4-Flash/Pro against DeepSeek-V3.2 (MLA + DSA) and a dense GQA-8 baseline.

Closed-form KV-cache bytes and FLOPs per generated token, computed from the configs. Run
`python bench/efficiency.py` to write docs/efficiency.md and bench/results/efficiency.json (table printed
last).

Conventions: the generated token is the query at position S-1 of an S-token context, so it sees min(S, window)
window keys, S // m compressed entries (the causal rule w < (t+1) // m at t = S-1) and S indexer candidates.
FLOPs are 2 per multiply-add. "FP8-equivalent" FLOPs weight each FLOP by its precision's cost relative to FP8
(`FP8_COST`); "plain" FLOPs weight all alike. KV bytes per token = bytes held after S tokens / S.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from model.config import CSA, SLIDING, ModelConfig
from model.errors import ConfigError
from train.flops import FlopModel

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = {"128K": 128 * 1024, "256K": 256 * 1024, "512K": 512 * 1024, "1M": 1024 * 1024}
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
# Cost of one FLOP relative to FP8, from dense tensor-core peaks (Hopper: TF32 1/4 and BF16 1/2 of FP8;
# Blackwell: FP4 twice FP8).
FP8_COST = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "fp4": 0.5}

# The report's headline figures at 1M tokens, relative to V3.2 (spec §8.6), and the tolerance we claim.
REPORT = {"v4-flash": {"flops": 0.10, "kv": 0.07}, "v4-pro": {"flops": 0.27, "kv": 0.10}}
REPORT_KV_VS_GQA = 0.02
TOLERANCE = 0.20

# DeepSeek-V3.2-Exp, HF DeepseekV3Config-style names plus the DSA indexer fields. Source: the public
# `deepseek-ai/DeepSeek-V3.2-Exp` config.json on the Hugging Face hub (same backbone as DeepSeek-V3) and the
# V3.2 report (MLA in MQA/absorbed mode for decoding; lightning indexer 64 x 128, top-2048).
V32_CONFIG = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
    "first_k_dense_replace": 3,
    "intermediate_size": 18432,
}
GQA_KV_HEADS, GQA_HEAD_DIM = 8, 128


@dataclass(frozen=True)
class Precision:
    """Storage (KV) and compute precisions, each a key of `BYTES` / `FP8_COST`."""

    kv_nope: str = "fp8"  # non-rope dims of cached entries (MLA latent for V3.2)
    kv_rope: str = "bf16"  # rope dims of cached entries
    index_key: str = "fp4"  # cached indexer keys
    linear: str = "fp8"  # weight matmuls (FP4 experts x FP8 activations run at the FP8 rate)
    attention: str = "bf16"  # QK and PV over the cached keys
    indexer: str = "fp4"  # indexer q.k scores


# The report's precisions (spec §8.4): V4 KV rope BF16 / rest FP8, indexer QK in FP4. V3.2: the same KV layout
# (FP8 latent + BF16 rope, as its FP8 sparse-MLA cache) with its FP8 indexer. GQA: BF16 everywhere.
V4_REPORT = Precision()
V32_REPORT = Precision(index_key="fp8", indexer="fp8")
GQA_BF16 = Precision(kv_nope="bf16", kv_rope="bf16", index_key="bf16", linear="bf16", indexer="bf16")


def as_model_config(cfg: Mapping | ModelConfig) -> ModelConfig:
    """A `ModelConfig` from a config object or a ModelConfig-like dict (HF `DeepseekV4Config` names)."""
    return cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)


def load_model_yaml(name: str, root: Path = ROOT) -> ModelConfig:
    """Read `configs/model/<name>.yaml` as a plain dict (Hydra's `defaults` and `_..._` keys dropped)."""
    path = root / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("model", f"{path} does not exist")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError("model", f"{path} is not a mapping")
    return as_model_config({k: v for k, v in raw.items() if k != "defaults" and not k.startswith("_")})


# ---------------------------------------------------------------------------------------------- KV cache
def _entry_bytes(width: int, rope: int, p: Precision) -> float:
    return (width - rope) * BYTES[p.kv_nope] + rope * BYTES[p.kv_rope]


def v4_kv_cache_bytes(cfg: Mapping | ModelConfig, seq_len: int, p: Precision = V4_REPORT) -> dict[str, float]:
    """Bytes the V4 decode cache holds after `seq_len` tokens, by component, over all main layers.

    window: min(S, sliding_window) K=V entries per layer; compressed: S // m entries per CSA/HCA layer;
    indexer: S // m indexer keys per CSA layer. Compressor tail buffers (< 2m tokens) are bounded and are not
    counted.
    """
    c = as_model_config(cfg)
    entry = _entry_bytes(c.head_dim, c.rope_head_dim, p)
    out = {"window": 0.0, "compressed": 0.0, "indexer": 0.0}
    for kind in c.layer_types:
        out["window"] += min(seq_len, c.sliding_window) * entry
        if kind != SLIDING:
            out["compressed"] += seq_len // c.compress_rate(kind) * entry
        if kind == CSA:
            out["indexer"] += seq_len // c.compress_rate(CSA) * c.index_head_dim * BYTES[p.index_key]
    out["total"] = sum(out.values())
    return out


def v32_kv_cache_bytes(cfg: Mapping, seq_len: int, p: Precision = V32_REPORT) -> dict[str, float]:
    """MLA latent (kv_lora_rank + rope) and DSA indexer key per token per layer."""
    n = cfg["num_hidden_layers"] * seq_len
    latent = n * _entry_bytes(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], cfg["qk_rope_head_dim"], p)
    indexer = n * cfg["index_head_dim"] * BYTES[p.index_key]
    return {"window": 0.0, "compressed": latent, "indexer": indexer, "total": latent + indexer}


def gqa_kv_cache_bytes(layers: int, seq_len: int, p: Precision = GQA_BF16) -> dict[str, float]:
    """Dense GQA: K and V, GQA_KV_HEADS x GQA_HEAD_DIM per token per layer."""
    total = layers * seq_len * 2 * GQA_KV_HEADS * GQA_HEAD_DIM * BYTES[p.kv_nope]
    return {"window": 0.0, "compressed": total, "indexer": 0.0, "total": total}


# ---------------------------------------------------------------------------------------------- FLOPs
def v4_decode_flops(cfg: Mapping | ModelConfig, seq_len: int) -> dict[str, float]:
    """Plain FLOPs of one generated token at context `seq_len`: core attention, indexer, weight matmuls.

    Core attention: QK and PV over one shared K=V head, 2 * n_h * head_dim MACs per attended key. Indexer:
    n_I * (c_I + 1) MACs per causal CSA entry (scores and head weighting). Weight matmuls: `train.flops`'s
    per-token count of the main model (mHC, projections, compressors, MoE, head), MTP left out.
    """
    c = as_model_config(cfg)
    window = min(seq_len, c.sliding_window)
    keys = indexed = 0
    for kind in c.layer_types:
        entries = seq_len // c.compress_rate(kind) if kind != SLIDING else 0
        keys += window + (min(entries, c.index_topk) if kind == CSA else entries)
        indexed += entries if kind == CSA else 0
    linear = FlopModel(replace(c, num_nextn_predict_layers=0)).token_macs()
    return {
        "attention": 2.0 * 2 * c.num_attention_heads * c.head_dim * keys,
        "indexer": 2.0 * c.index_n_heads * (c.index_head_dim + 1) * indexed,
        "linear": 2.0 * linear,
    }


def v32_linear_macs(cfg: Mapping) -> int:
    """Weight multiply-adds per token of V3.2 (MLA with W_UK/W_UV absorbed costs the same as wkv_b)."""
    d, h, r = cfg["hidden_size"], cfg["num_attention_heads"], cfg["qk_rope_head_dim"]
    nope, v, lat, ql = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"], cfg["q_lora_rank"]
    attn = d * ql + ql * h * (nope + r) + d * (lat + r) + lat * h * (nope + v) + h * v * d
    ni, ci = cfg["index_n_heads"], cfg["index_head_dim"]
    attn += ql * ni * ci + d * ci + d * ni  # indexer wq_b, wk, weights_proj
    active = cfg["num_experts_per_tok"] + cfg["n_shared_experts"]
    moe = d * cfg["n_routed_experts"] + active * 3 * d * cfg["moe_intermediate_size"]
    layers, dense = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    ffn = dense * 3 * d * cfg["intermediate_size"] + (layers - dense) * moe
    return layers * attn + ffn + d * cfg["vocab_size"]


def v32_decode_flops(cfg: Mapping, seq_len: int) -> dict[str, float]:
    """V3.2 decode: absorbed MLA over min(S, top-k) selected tokens (QK over latent+rope, PV over the latent),
    the indexer over all S tokens, and the weight matmuls."""
    layers, h = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    per_key = h * (2 * cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
    return {
        "attention": 2.0 * layers * per_key * min(seq_len, cfg["index_topk"]),
        "indexer": 2.0 * layers * cfg["index_n_heads"] * (cfg["index_head_dim"] + 1) * seq_len,
        "linear": 2.0 * v32_linear_macs(cfg),
    }


def gqa_attention_flops(layers: int, hidden_size: int, seq_len: int) -> float:
    """Dense GQA core attention with hidden_size // GQA_HEAD_DIM query heads over all S keys."""
    heads = hidden_size // GQA_HEAD_DIM
    return 2.0 * layers * 2 * heads * GQA_HEAD_DIM * seq_len


def fp8_equivalent(flops: Mapping[str, float], p: Precision) -> float:
    """Weight each FLOP component by the cost of its precision relative to FP8."""
    cost = {"attention": p.attention, "indexer": p.indexer, "linear": p.linear}
    return sum(FP8_COST[cost[k]] * v for k, v in flops.items())


def attention_only(flops: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in flops.items() if k != "linear"}


# ---------------------------------------------------------------------------------------------- the table
def compare(name: str, cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """One row: V4 against V3.2 and against a GQA-8 model of the same depth and width, at `seq_len`."""
    layers = cfg.num_hidden_layers
    kv = v4_kv_cache_bytes(cfg, seq_len)["total"] / seq_len
    kv32 = v32_kv_cache_bytes(V32_CONFIG, seq_len)["total"] / seq_len
    kvg = gqa_kv_cache_bytes(layers, seq_len)["total"] / seq_len
    f, f32 = v4_decode_flops(cfg, seq_len), v32_decode_flops(V32_CONFIG, seq_len)
    gqa_attn = gqa_attention_flops(layers, cfg.hidden_size, seq_len)
    row = {
        "model": name,
        "context": seq_len,
        "kv_bytes_per_token": kv,
        "v32_kv_bytes_per_token": kv32,
        "gqa_kv_bytes_per_token": kvg,
        "kv_vs_v32": kv / kv32,
        "kv_vs_gqa": kv / kvg,
    }
    for label, mine, theirs in (("whole", f, f32), ("attn", attention_only(f), attention_only(f32))):
        row[f"{label}_flops_fp8eq"] = fp8_equivalent(mine, V4_REPORT)
        row[f"{label}_flops_plain"] = sum(mine.values())
        row[f"v32_{label}_flops_fp8eq"] = fp8_equivalent(theirs, V32_REPORT)
        row[f"v32_{label}_flops_plain"] = sum(theirs.values())
        for kind in ("fp8eq", "plain"):
            row[f"{label}_{kind}_vs_v32"] = row[f"{label}_flops_{kind}"] / row[f"v32_{label}_flops_{kind}"]
    row["gqa_attn_flops_fp8eq"] = FP8_COST[GQA_BF16.attention] * gqa_attn
    row["attn_fp8eq_vs_gqa"] = row["attn_flops_fp8eq"] / row["gqa_attn_flops_fp8eq"]
    return row


def build_rows(models: Mapping[str, ModelConfig]) -> list[dict[str, float]]:
    return [compare(name, cfg, s) for name, cfg in models.items() for s in CONTEXTS.values()]


def report_check(rows: list[dict]) -> list[dict]:
    """At 1M tokens, every counting against the report's figure: value, deviation, within TOLERANCE."""
    out = []
    for row in rows:
        if row["context"] != CONTEXTS["1M"] or row["model"] not in REPORT:
            continue
        ref = REPORT[row["model"]]
        for metric, key, target in (
            ("KV cache", "kv_vs_v32", ref["kv"]),
            ("KV cache vs GQA-8", "kv_vs_gqa", REPORT_KV_VS_GQA),
            ("FLOPs, whole model, FP8-equivalent", "whole_fp8eq_vs_v32", ref["flops"]),
            ("FLOPs, whole model, plain", "whole_plain_vs_v32", ref["flops"]),
            ("FLOPs, attention only, FP8-equivalent", "attn_fp8eq_vs_v32", ref["flops"]),
            ("FLOPs, attention only, plain", "attn_plain_vs_v32", ref["flops"]),
        ):
            dev = row[key] / target - 1
            out.append({"model": row["model"], "metric": metric, "key": key, "ours": row[key],
                        "report": target, "deviation": dev, "within": abs(dev) <= TOLERANCE})
    return out


def _ctx(n: int) -> str:
    return next(k for k, v in CONTEXTS.items() if v == n)


def _g(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def main_table(rows: list[dict]) -> str:
    head = ("| model | context | KV B/token | vs V3.2 | vs GQA-8 | GFLOPs/token (FP8-eq, whole) | vs V3.2 "
            "| attention GFLOPs (FP8-eq) | vs V3.2 | vs GQA-8 |\n|" + " --- |" * 10)
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {_ctx(r['context'])} | {r['kv_bytes_per_token']:,.0f} | {r['kv_vs_v32']:.1%} "
            f"| {r['kv_vs_gqa']:.2%} | {_g(r['whole_flops_fp8eq'])} | {r['whole_fp8eq_vs_v32']:.1%} "
            f"| {_g(r['attn_flops_fp8eq'])} | {r['attn_fp8eq_vs_v32']:.1%} | {r['attn_fp8eq_vs_gqa']:.1%} |"
        )
    return "\n".join(lines)


def baseline_table(rows: list[dict]) -> str:
    lines = ["| context | V3.2 KV B/token | V3.2 GFLOPs/token (FP8-eq, whole) "
             "| V3.2 attention GFLOPs (FP8-eq) |", "| --- | --- | --- | --- |"]
    for r in rows:
        if r["model"] == rows[0]["model"]:
            lines.append(f"| {_ctx(r['context'])} | {r['v32_kv_bytes_per_token']:,.0f} "
                         f"| {_g(r['v32_whole_flops_fp8eq'])} | {_g(r['v32_attn_flops_fp8eq'])} |")
    return "\n".join(lines)


def check_table(checks: list[dict]) -> str:
    lines = ["| model | quantity (ratio to V3.2 at 1M unless stated) | ours | report | deviation "
             "| within ±20% |", "| --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        lines.append(f"| {c['model']} | {c['metric']} | {c['ours']:.1%} | {c['report']:.0%} "
                     f"| {c['deviation']:+.0%} | {'yes' if c['within'] else 'no'} |")
    return "\n".join(lines)


DOC = """# Long-context efficiency: V4 against V3.2 and GQA-8

Generated by `python bench/efficiency.py` (closed-form counts from `configs/model/{models}.yaml`; no
hardware involved) — do not edit by hand. The same numbers are in `bench/results/efficiency.json`.

## What is counted

* **KV cache bytes per token** = bytes the decode cache holds after S tokens, divided by S, over all main
  layers (MTP excluded). V4: every layer keeps min(S, 128) sliding-window K=V entries of `head_dim` = 512;
  CSA layers add S/4 compressed entries of 512 and S/4 indexer keys of `index_head_dim` = 128; HCA layers add
  S/128 entries of 512. The compressors' tail buffers (fewer than 2m tokens) are bounded and left out, and
  so are the FP8 block scales (a few bytes per entry, on both sides of every ratio). V3.2:
  per layer and token the MLA latent (512) + rope key (64) and one indexer key (128). GQA-8: K and V,
  8 heads x 128, same layer count as the V4 model in the row.
* **FLOPs per generated token** at context S = the query at position S-1. Core attention: QK and PV over the
  attended keys (V4: window + top-k CSA entries, or window + all causal HCA entries, 2·n_h·512 multiply-adds
  per key; V3.2: MLA in absorbed/MQA form over min(S, 2048) selected tokens, n_h·(512+64+512) per token).
  Indexer: n_I·(c_I+1) per candidate (V4: S/4 compressed entries of each CSA layer; V3.2: all S tokens).
  Whole model adds the weight matmuls of one token (V4: `train.flops.FlopModel.token_macs`, MTP left out;
  V3.2: `v32_linear_macs`). "Attention only" = core attention + indexer. GQA-8 (attention only): dense
  attention of hidden_size/128 query heads of dim 128 over all S keys, BF16.
* **FP8-equivalent** FLOPs weight each FLOP by its precision's cost relative to FP8 (BF16 x2, FP8 x1,
  FP4 x0.5), as the report counts "single-token inference FLOPs (FP8-equivalent)". The report does not say
  which operation it counts at which precision: the compute columns below are our reading of §8.4 (FP4
  indexer QK for V4, FP8 indexer for V3.2, BF16 core attention for both), an assumption, not a quoted fact.

Precisions (the report's, spec §8.4; every one is a field of `bench.efficiency.Precision`):

| | KV non-rope dims | KV rope dims | indexer keys | weight matmuls | core attention | indexer scores |
| --- | --- | --- | --- | --- | --- | --- |
{precisions}

V3.2 configuration: DeepSeek-V3.2-Exp (`V32_CONFIG`: 61 layers, d 7168, MLA latent 512 + rope 64, 128 heads,
q-LoRA 1536, indexer 64 x 128 top-2048, 256 experts top-8 of width 2048 + 1 shared, first 3 layers dense of
width 18432). Its cache is assumed stored like V4's (FP8 latent, BF16 rope) with FP8 indexer keys; with a
BF16 latent instead, every V4 KV ratio below would be {bf16_factor:.2f}x smaller.

## Table

{main_table}

V3.2 reference values:

{baseline_table}

## Against the report's figures (1M tokens)

The report (§8.6 of the spec): V4-Flash 10% of V3.2's single-token FLOPs and 7% of its KV cache, V4-Pro 27%
and 10%; about 2% of the KV cache of a BF16 GQA-8 baseline.

{check_table}

**Which counting lands.** The KV ratios land within ±20% with the report's precisions. For FLOPs, the
**whole-model, FP8-equivalent** count lands for both models (Flash {flash_whole:.1%}, Pro {pro_whole:.1%}),
which matches the report's wording (single-token inference FLOPs, FP8-equivalent). The differences of the
other countings:

* *Attention only* (Flash {flash_attn:.1%}, Pro {pro_attn:.1%} FP8-eq): the report's count includes the
  weight matmuls of the token ({v32_lin:.0f} GFLOPs for V3.2, {flash_lin:.0f} for Flash, {pro_lin:.0f} for
  Pro). Their ratio to V3.2's is above the attention ratio for both models, so leaving them out lowers both
  ratios; Pro, with more active parameters than V3.2, drops out of the ±20% band.
* *Plain FLOPs* (Flash {flash_plain:.1%}, Pro {pro_plain:.1%}): at 1M most of both budgets is indexer
  scoring (V3.2 scores all S tokens, V4 only S/4 entries in its CSA layers). Plain counting ignores that V4's
  indexer runs in FP4 (half the FP8 cost, V3.2's is FP8) and that core attention runs in BF16 (twice the FP8
  cost); Flash, whose budget is mostly indexer, lands {flash_plain_dev:+.0%} off. With V4's indexer counted
  at the FP8 rate the whole-model FP8-eq ratios would be Flash {flash_fp8idx:.1%} and Pro {pro_fp8idx:.1%}.
* At shorter contexts the weight matmuls (independent of S) weigh more, so the whole-model FLOPs ratios rise
  towards the weight-matmul ratio. The KV ratios barely move with S: the sliding windows (128 entries per
  layer) are a fixed amount, negligible from 128K on.

## Decode cache against the formula

`tests/bench/test_efficiency.py::test_decode_cache_size_matches_formula` fills the model's decode cache
(`model` package) at small scale and compares the growth of its tensor bytes between two lengths with
`v4_kv_cache_bytes` at the cache's dtype (the bounded compressor buffers cancel in the difference). It is
skipped while the model package has no decode cache.
"""


def _precision_row(name: str, p: Precision) -> str:
    fields = (p.kv_nope, p.kv_rope, p.index_key, p.linear, p.attention, p.indexer)
    return f"| {name} | " + " | ".join(f.upper() for f in fields) + " |"


def render(models: Mapping[str, ModelConfig], rows: list[dict], checks: list[dict]) -> str:
    """docs/efficiency.md content."""
    at = {r["model"]: r for r in rows if r["context"] == CONTEXTS["1M"]}
    flash, pro = at["v4-flash"], at["v4-pro"]
    s = CONTEXTS["1M"]

    def fp8_indexer(cfg: ModelConfig) -> float:
        mine = fp8_equivalent(v4_decode_flops(cfg, s), replace(V4_REPORT, indexer="fp8"))
        return mine / fp8_equivalent(v32_decode_flops(V32_CONFIG, s), V32_REPORT)

    bf16_latent = v32_kv_cache_bytes(V32_CONFIG, s, replace(V32_REPORT, kv_nope="bf16"))["total"]
    precisions = "\n".join(
        _precision_row(n, p) for n, p in (("V4", V4_REPORT), ("V3.2", V32_REPORT), ("GQA-8", GQA_BF16))
    )
    return DOC.format(
        models="{" + ",".join(models) + "}",
        precisions=precisions,
        bf16_factor=bf16_latent / v32_kv_cache_bytes(V32_CONFIG, s)["total"],
        main_table=main_table(rows),
        baseline_table=baseline_table(rows),
        check_table=check_table(checks),
        flash_whole=flash["whole_fp8eq_vs_v32"],
        pro_whole=pro["whole_fp8eq_vs_v32"],
        flash_attn=flash["attn_fp8eq_vs_v32"],
        pro_attn=pro["attn_fp8eq_vs_v32"],
        flash_plain=flash["whole_plain_vs_v32"],
        pro_plain=pro["whole_plain_vs_v32"],
        flash_plain_dev=flash["whole_plain_vs_v32"] / REPORT["v4-flash"]["flops"] - 1,
        v32_lin=v32_decode_flops(V32_CONFIG, s)["linear"] / 1e9,
        flash_lin=v4_decode_flops(models["v4-flash"], s)["linear"] / 1e9,
        pro_lin=v4_decode_flops(models["v4-pro"], s)["linear"] / 1e9,
        flash_fp8idx=fp8_indexer(models["v4-flash"]),
        pro_fp8idx=fp8_indexer(models["v4-pro"]),
    )


def run(root: Path = ROOT, doc: Path | None = None, results: Path | None = None) -> list[dict]:
    """Compute the rows, write the document and the JSON, return the rows."""
    models = {name: load_model_yaml(name, root) for name in REPORT}
    rows = build_rows(models)
    checks = report_check(rows)
    doc = doc or root / "docs" / "efficiency.md"
    results = results or root / "bench" / "results" / "efficiency.json"
    doc.write_text(render(models, rows, checks))
    results.parent.mkdir(parents=True, exist_ok=True)
    payload = {"precisions": {"v4": asdict(V4_REPORT), "v32": asdict(V32_REPORT), "gqa": asdict(GQA_BF16)},
               "v32_config": V32_CONFIG, "rows": rows, "report_check": checks}
    results.write_text(json.dumps(payload, indent=2) + "\n")
    print(check_table(checks))
    print()
    print(main_table(rows))
    return rows


if __name__ == "__main__":
    run()
