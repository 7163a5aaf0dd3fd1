"""Random tiny V4 configurations and fully randomised HF reference models for the parity tests."""

import torch


def tiny_config_dict(layer_types, mlp_layer_types, **overrides) -> dict:
    d = dict(
        vocab_size=97,
        hidden_size=40,
        num_hidden_layers=len(layer_types),
        num_attention_heads=6,
        head_dim=24,
        partial_rotary_factor=1 / 3,
        q_lora_rank=20,
        o_groups=3,
        o_lora_rank=14,
        sliding_window=16,
        index_n_heads=3,
        index_head_dim=12,
        index_topk=6,
        n_routed_experts=7,
        num_experts_per_tok=3,
        moe_intermediate_size=18,
        layer_types=list(layer_types),
        mlp_layer_types=list(mlp_layer_types),
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        rope_parameters={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        routed_scaling_factor=1.7,
        num_nextn_predict_layers=1,
    )
    d.update(overrides)
    return d


@torch.no_grad()
def randomize_hf_(model, seed: int) -> None:
    """Give every parameter and buffer of a `DeepseekV4ForCausalLM` random values (no exact zeros)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        elif name.endswith((".base", ".hc_base", ".scale", ".hc_scale", "sinks", "position_bias")):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif name.endswith(("embed_tokens.weight",)):
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.5 * torch.randn(b.shape, generator=gen))
        elif name.endswith("tid2eid"):
            rows = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen)
            b.copy_(rows.topk(cfg.num_experts_per_tok, dim=-1).indices)


@torch.no_grad()
def randomize_ours_(model, seed: int) -> None:
    """Random values for every parameter and buffer of our `Transformer` (gate bias, tid2eid included)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        elif name.endswith((".base", ".scale", "attn_sink", ".ape", "embed.weight")):
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
        if name.endswith("gate.bias"):
            b.copy_(0.5 * torch.randn(b.shape, generator=gen))
        elif name.endswith("tid2eid"):
            rows = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen)
            b.copy_(rows.topk(cfg.num_experts_per_tok, dim=-1).indices)


def small_model_config(layer_types, **overrides):
    """A tiny ModelConfig with short windows and rates so that short inputs cross many boundaries."""
    from model import ModelConfig

    n = len(layer_types)
    d = tiny_config_dict(
        layer_types,
        (["hash_moe", "moe"] * n)[:n],
        sliding_window=8,
        index_n_heads=8,
        index_topk=4,
        max_position_embeddings=512,
    )
    d.update(overrides)
    return ModelConfig.from_dict(d)
