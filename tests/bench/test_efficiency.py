"""Efficiency formulas on hand-counted tiny configs, the generated table against the report, and the
model's decode cache against the KV formula."""

import pytest
import torch

import model
from bench import efficiency as eff
from model.config import CSA, HCA, SLIDING, ModelConfig
from model.errors import ConfigError

# Three layers (sliding, CSA m=4, HCA m'=8), head_dim 8 with 2 rope dims, window 4, indexer 2 x 4, top-2.
TINY = dict(vocab_size=10, hidden_size=8, moe_intermediate_size=6, num_hidden_layers=3, num_attention_heads=2,
            head_dim=8, q_lora_rank=4, partial_rotary_factor=0.25, num_experts_per_tok=2, n_routed_experts=4,
            layer_types=[SLIDING, CSA, HCA], mlp_layer_types=["hash_moe", "moe", "moe"],
            compress_rates={HCA: 8}, hc_mult=2, sliding_window=4, o_groups=1, o_lora_rank=4, index_n_heads=2,
            index_head_dim=4, index_topk=2, num_nextn_predict_layers=1)
TINY_V32 = dict(vocab_size=11, hidden_size=6, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=5,
                kv_lora_rank=4, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=3, index_n_heads=2,
                index_head_dim=4, index_topk=3, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                moe_intermediate_size=3, first_k_dense_replace=1, intermediate_size=7)


def test_v4_kv_formula_hand_counted():
    # entry = 6 nope dims x 1 B (FP8) + 2 rope dims x 2 B (BF16) = 10 B; indexer key = 4 dims x 0.5 B (FP4)
    kv = eff.v4_kv_cache_bytes(TINY, 20)
    assert kv["window"] == 3 * 4 * 10  # every layer keeps min(20, 4) window entries
    assert kv["compressed"] == (20 // 4 + 20 // 8) * 10
    assert kv["indexer"] == 20 // 4 * 2
    assert kv["total"] == 200
    short = eff.v4_kv_cache_bytes(ModelConfig.from_dict(TINY), 3)  # no complete window yet
    assert short == {"window": 3 * 3 * 10, "compressed": 0, "indexer": 0, "total": 90}
    fp32 = eff.Precision(kv_nope="fp32", kv_rope="fp32", index_key="fp32")
    assert eff.v4_kv_cache_bytes(TINY, 20, fp32)["total"] == 4 * (3 * 4 * 8 + 7 * 8 + 5 * 4)


def test_v4_decode_flops_hand_counted():
    f = eff.v4_decode_flops(TINY, 20)
    keys = 4 + (4 + 2) + (4 + 20 // 8)  # window in all layers, top-2 of 5 CSA entries, all 2 HCA entries
    assert f["attention"] == 2 * 2 * 2 * 8 * keys == 1024
    assert f["indexer"] == 2 * 2 * (4 + 1) * (20 // 4)
    # tests/train/test_flops.py hand-counts 5392 MACs per token for TINY, of which 1408 are the MTP layer
    assert f["linear"] == 2 * (5392 - 1408)
    assert eff.fp8_equivalent({"attention": 10, "indexer": 100, "linear": 1000}, eff.V4_REPORT) == 1070


def test_v32_and_gqa_formulas_hand_counted():
    # per token and layer: latent 4 x 1 B + rope 2 x 2 B, indexer key 4 x 1 B (FP8)
    assert eff.v32_kv_cache_bytes(TINY_V32, 10)["total"] == 2 * 10 * (4 + 4 + 4)
    f = eff.v32_decode_flops(TINY_V32, 10)
    assert f["attention"] == 2 * 2 * 2 * (4 + 2 + 4) * 3  # absorbed MLA over the top-3 tokens
    assert f["indexer"] == 2 * 2 * 2 * (4 + 1) * 10
    attn = 6 * 5 + 5 * 2 * 5 + 6 * 6 + 4 * 2 * 6 + 2 * 3 * 6 + (5 * 2 * 4 + 6 * 4 + 6 * 2)
    ffn = 3 * 6 * 7 + (6 * 4 + 3 * 3 * 6 * 3)
    assert f["linear"] == 2 * (2 * attn + ffn + 6 * 11) == 1860
    assert eff.gqa_kv_cache_bytes(3, 10)["total"] == 3 * 10 * 2 * 8 * 128 * 2
    assert eff.gqa_attention_flops(2, 256, 10) == 2 * 2 * 2 * 2 * 128 * 10


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="v4-flash.yaml"):
        eff.load_model_yaml("v4-flash", tmp_path)


def test_report_ratios_within_documented_bounds(tmp_path):
    doc, results = tmp_path / "efficiency.md", tmp_path / "efficiency.json"
    rows = eff.run(eff.ROOT, doc, results)
    assert len(rows) == len(eff.REPORT) * len(eff.CONTEXTS) and results.is_file()
    checks = {(c["model"], c["key"]): c for c in eff.report_check(rows)}
    for name in eff.REPORT:
        for key in ("kv_vs_v32", "kv_vs_gqa", "whole_fp8eq_vs_v32"):  # the countings the document claims
            assert checks[name, key]["within"], checks[name, key]
    explained = {"whole_plain_vs_v32": "*Plain FLOPs*", "attn_fp8eq_vs_v32": "*Attention only*",
                 "attn_plain_vs_v32": "*Attention only*"}
    text = doc.read_text()
    for c in checks.values():
        if not c["within"]:
            assert explained[c["key"]] in text, c
    stale = "docs/efficiency.md is stale: run python bench/efficiency.py"
    assert text == (eff.ROOT / "docs" / "efficiency.md").read_text(), stale


def test_decode_cache_size_matches_formula():
    cfg = ModelConfig.from_dict(TINY)
    torch.manual_seed(0)
    m = model.Transformer(cfg).eval()
    cache = m.new_cache(1)
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    sizes = {}
    with torch.no_grad():
        m(ids[:, :16], cache=cache)  # prefill
        sizes[16] = _tensor_bytes(cache)
        for t in range(16, 32):  # decode one token at a time
            m(ids[:, t : t + 1], cache=cache)
        sizes[32] = _tensor_bytes(cache)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[next(m.parameters()).dtype]
    p = eff.Precision(kv_nope=name, kv_rope=name, index_key=name)
    formula = {s: eff.v4_kv_cache_bytes(cfg, s, p)["total"] for s in sizes}
    # lengths are multiples of both rates and past the window: the bounded buffers cancel in the difference
    assert sizes[32] - sizes[16] == formula[32] - formula[16]
    assert sizes[16] >= formula[16]


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor storage reachable from `obj` (attributes, lists, tuples, dicts)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return 0
    return sum(_tensor_bytes(x, seen) for x in items)
