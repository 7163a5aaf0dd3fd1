"""Parity with transformers' DeepseekV4ForCausalLM in both directions, and bit-exact export round trips."""

import json

import pytest
import torch
from safetensors.torch import save_file
from v4_test_helpers import randomize_hf_, small_model_config, tiny_config_dict

from model import Transformer
from model.hf import load_hf, save_hf
from model.transformer import FP32_PATTERN

transformers = pytest.importorskip("transformers")
S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

CONFIGS = {
    # Flash layout: two sliding layers, then CSA/HCA alternating; YaRN; top-k < entries.
    "flash-like": tiny_config_dict([S, S, C, H, C, H], ["hash_moe"] * 3 + ["moe"] * 3),
    # Pro layout: two HCA layers first; one hash layer; 5 hc streams, fewer Sinkhorn iterations.
    "pro-like": tiny_config_dict(
        [H, H, C, H, C],
        ["hash_moe"] + ["moe"] * 4,
        hidden_size=36,
        num_attention_heads=4,
        o_groups=2,
        hc_mult=5,
        hc_sinkhorn_iters=7,
        index_n_heads=5,
        compress_rates={C: 4, H: 16},
    ),
    # Odd sizes, plain RoPE in every layer, index_topk >= number of CSA entries (selection keeps all).
    "odd-dense-index": tiny_config_dict(
        [C, S, H],
        ["hash_moe", "moe", "hash_moe"],
        vocab_size=61,
        hidden_size=30,
        num_attention_heads=5,
        head_dim=20,
        partial_rotary_factor=0.4,
        o_groups=5,
        o_lora_rank=9,
        sliding_window=11,
        index_topk=200,
        n_routed_experts=5,
        num_experts_per_tok=2,
        compress_rates={C: 4, H: 7},
        rope_parameters=None,
        routed_scaling_factor=2.5,
    ),
}
SEQ = 303


def hf_model(d: dict, seed: int):
    cfg = transformers.DeepseekV4Config(**d, experts_implementation="eager")
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    randomize_hf_(model, seed)
    return model


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_both_ways(name, tmp_path):
    d = CONFIGS[name]
    if d["rope_parameters"]:
        d = {**d, "max_position_embeddings": 512}
    ref_model = hf_model(d, seed=len(name))
    ids = torch.randint(0, d["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    ref = ref_model(ids).logits

    # transformers' save_pretrained -> load_hf
    ref_model.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.config.attn_impl == "sparse"
    logits = ours(ids, with_mtp=False).logits
    assert (logits - ref).abs().max().item() < 1e-4
    ours.config.attn_impl = "dense"  # the masked reference equals HF as well
    assert (ours(ids, with_mtp=False).logits - ref).abs().max().item() < 1e-4
    assert ref.std() > 0.1  # a real signal, not a degenerate model

    # our export (MTP randomised too, several shards) -> transformers from_pretrained
    for p in ours.mtp.parameters():
        p.copy_(torch.randn_like(p) * 0.1)
    save_hf(ours, tmp_path / "ours", max_shard_bytes=150_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any(k.startswith("mtp.0.") for k in index["weight_map"])
    back, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        tmp_path / "ours", output_loading_info=True, experts_implementation="eager"
    )
    problems = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    assert not any(info[k] for k in problems), info
    assert (back.eval()(ids).logits - logits).abs().max().item() < 1e-4
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["layer_types"] == d["layer_types"] and "balance_loss_alpha" not in config

    # export -> load_hf is bit-exact, MTP included
    again = load_hf(tmp_path / "ours")
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@torch.no_grad()
def test_load_hf_native_names_and_bf16(tmp_path):
    d = CONFIGS["odd-dense-index"]
    ref_model = hf_model(d, seed=5)
    ref_model.save_pretrained(tmp_path / "pretrained")
    expected = load_hf(tmp_path / "pretrained").state_dict()
    # HF-native parameter names (fused gate_up_proj etc.) in one loose file
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text((tmp_path / "pretrained" / "config.json").read_text())
    tensors = {k: v.contiguous() for k, v in ref_model.state_dict().items()}
    save_file(tensors, str(native / "model.safetensors"))
    got = load_hf(native).state_dict()
    non_mtp = [k for k in expected if not k.startswith("mtp.")]
    assert all(torch.equal(expected[k], got[k]) for k in non_mtp)

    # a BF16 checkpoint under official names loads with fp32 islands
    model = load_hf(tmp_path / "pretrained").cast_(torch.bfloat16)
    save_hf(model, tmp_path / "bf16")
    loaded = load_hf(tmp_path / "bf16", dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        want = torch.float32 if FP32_PATTERN.search(name) else torch.bfloat16
        assert p.dtype == want, name
        assert torch.equal(p, model.state_dict()[name].to(want)), name
    assert loaded.state_dict()["layers.1.ffn.gate.bias"].dtype == torch.float32
    out = loaded(torch.randint(0, d["vocab_size"], (1, 40)))
    assert torch.isfinite(out.logits.float()).all()


@torch.no_grad()
def test_load_official_style_config(tmp_path):
    """Legacy keys of the official config.json: compress_ratios (L+1), num_hash_layers, rope_scaling."""
    cfg = small_model_config(
        [S, C, H],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={C: 4, H: 128},
        partial_rotary_factor=0.5,
    )
    model = Transformer(cfg)
    save_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters"):
        config.pop(key)
    config.pop("partial_rotary_factor")
    yarn = {k: v for k, v in cfg.rope_parameters["compress"].items() if k not in ("rope_theta",)}
    config.update(
        compress_ratios=[0, 4, 128, 0],
        num_hash_layers=1,
        qk_rope_head_dim=12,
        rope_scaling={"type": "yarn", **{k: yarn[k] for k in ("factor", "original_max_position_embeddings")}},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_hf(tmp_path)
    got = loaded.config
    assert got.layer_types == cfg.layer_types and got.mlp_layer_types == cfg.mlp_layer_types
    assert got.compress_rates == cfg.compress_rates and got.rope_head_dim == cfg.rope_head_dim
    assert got.rope_parameters["compress"]["rope_type"] == "yarn"
    assert got.rope_parameters["compress"]["factor"] == yarn["factor"]
    ids = torch.randint(0, cfg.vocab_size, (1, 300))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_save_hf_writes_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_hf(Transformer(small_model_config([S])), tmp_path, tokenizer=tok)
    loaded = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded("w5 w7")["input_ids"] == [5, 7]
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 1
