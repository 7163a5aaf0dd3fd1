"""ModelConfig validation, the shipped model configs and parameter counts."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from model import ModelConfig
from model.errors import ConfigError
from model.info import count_parameters

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def load(name: str) -> ModelConfig:
    return ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml")))


def tiny(**overrides) -> dict:
    d = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "v4-tiny.yaml"))
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"layer_types": [S, S, "global_attention", H, C]}, "model.layer_types"),
        ({"layer_types": [S, S, C]}, "model.layer_types"),
        ({"mlp_layer_types": ["hash_moe", "dense", "moe", "moe", "moe"]}, "model.mlp_layer_types"),
        ({"partial_rotary_factor": 2.0}, "model.partial_rotary_factor"),
        ({"partial_rotary_factor": 0.3}, "model.partial_rotary_factor"),  # 19.2 -> 19 rope dims: odd
        ({"compress_rates": {C: 8, H: 16}}, "model.compress_rates.compressed_sparse_attention"),
        ({"num_attention_heads": 5}, "model.o_groups"),
        ({"num_experts_per_tok": 9}, "model.num_experts_per_tok"),
        ({"scoring_func": "softmax"}, "model.mlp_layer_types"),  # hash layers need sqrtsoftplus scores
        ({"num_key_value_heads": 2}, "model.num_key_value_heads"),
        ({"index_head_dim": 8}, "model.index_head_dim"),
        ({"hidden_size": 0}, "model.hidden_size"),
        ({"tie_word_embeddings": True}, "model.tie_word_embeddings"),
        ({"attn_impl": "flash"}, "model.attn_impl"),
        ({"rope_parameters": {"rope_type": "yarn"}}, "model.rope_parameters.compress.factor"),
        ({"hidden_sise": 64}, "model.hidden_sise"),
    ],
)
def test_bad_config_names_the_field(overrides, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(tiny(**overrides))
    assert err.value.key == key
    assert str(err.value).startswith(key + ":")


def test_shipped_configs():
    small = load("v4-small")
    assert (small.vocab_size, small.hidden_size, small.num_hidden_layers) == (32768, 1024, 8)
    assert small.layer_types == [S, S, C, H, C, H, C, H]
    assert (small.num_attention_heads, small.head_dim, small.q_lora_rank) == (16, 512, 512)
    assert (small.o_groups, small.o_lora_rank, small.sliding_window) == (4, 512, 128)
    assert (small.index_n_heads, small.index_head_dim, small.index_topk) == (16, 128, 64)
    assert (small.n_routed_experts, small.num_experts_per_tok, small.n_shared_experts) == (32, 6, 1)
    assert small.moe_intermediate_size == 512 and small.num_nextn_predict_layers == 1
    assert small.mlp_layer_types == ["hash_moe"] * 2 + ["moe"] * 6
    tiny_cfg = load("v4-tiny")
    assert set(tiny_cfg.layer_types) == {S, C, H} and set(tiny_cfg.mlp_layer_types) == {"hash_moe", "moe"}
    total, _ = count_parameters(tiny_cfg)
    assert 1e6 < total < 2e7
    pro = load("v4-pro")
    assert pro.layer_types[:4] == [H, H, C, H] and pro.layer_types.count(C) == 30
    flash = load("v4-flash")
    assert flash.layer_types[:4] == [S, S, C, H] and flash.layer_types.count(H) == 20


def test_round_trip_dict():
    cfg = load("v4-tiny")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "attn_impl" not in cfg.to_hf_dict() and cfg.to_hf_dict()["layer_types"] == cfg.layer_types


@pytest.mark.parametrize("name, total_b, active_b", [("v4-flash", 284.3, 13.3), ("v4-pro", 1573.0, 48.9)])
def test_parameter_counts(name, total_b, active_b):
    total, active = count_parameters(load(name))
    assert abs(total / 1e9 - total_b) / total_b < 0.002
    assert abs(active / 1e9 - active_b) / active_b < 0.005
