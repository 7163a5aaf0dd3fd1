"""`ModelConfig`: the V4 architecture; field names are those of HF `DeepseekV4Config`."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model.errors import ConfigError

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
# `attn_impl`: "dense" = masked S x S reference (HF's math), "sparse" = per-query gather, linear memory,
# "triton" = the Triton kernels of model/kernels/sparse_attn.py (CUDA; the interpreter on CPU).
ATTN_IMPLS = ["dense", "sparse", "triton"]
# `indexer_loss_mode`: "off", "dense" (warm-up: KL over all visible entries), "sparse" (the selected set).
INDEXER_LOSS_MODES = ("off", "dense", "sparse")
DEFAULT_COMPRESS_RATES = {CSA: 4, HCA: 128}
DEFAULT_NUM_HASH_LAYERS = 3

# Fields that only training uses; they are never written to config.json.
TRAINING_ONLY_FIELDS = (
    "balance_loss_alpha",
    "balance_loss_on_hash_layers",
    "attn_impl",
    "attn_chunk_tokens",
    "indexer_loss_mode",
    "indexer_loss_coef",
    "hc_scale_init",
    "tid2eid_seed",
)


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V4 model. Defaults are HF's (V4-Flash sizes)."""

    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    q_lora_rank: int = 1024
    partial_rotary_factor: float = 64 / 512
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_parameters: dict | None = None
    layer_types: list[str] | None = None
    compress_rates: dict | None = None
    mlp_layer_types: list[str] | None = None
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: Any = 1  # int or list of ints (Any keeps the dataclass an OmegaConf schema)
    pad_token_id: int | None = None
    # training-only (not in config.json)
    balance_loss_alpha: float = 1e-4
    balance_loss_on_hash_layers: bool = False
    attn_impl: str = "sparse"
    attn_chunk_tokens: int = 0  # queries per sparse chunk / cached prefill step; 0 = automatic
    indexer_loss_mode: str = "dense"
    indexer_loss_coef: float = 1.0
    hc_scale_init: float = 0.01
    tid2eid_seed: int = 0

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.compress_rates is None:
            self.compress_rates = dict(DEFAULT_COMPRESS_RATES)
        else:
            self.compress_rates = {**DEFAULT_COMPRESS_RATES, **dict(self.compress_rates)}
        if self.layer_types is None and isinstance(n, int):
            rest = [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
            self.layer_types = [HCA] * min(n, 2) + rest
        if self.mlp_layer_types is None and isinstance(n, int):
            k = DEFAULT_NUM_HASH_LAYERS
            self.mlp_layer_types = [HASH_MOE] * min(n, k) + [MOE] * max(0, n - k)
        self.layer_types = list(self.layer_types)
        self.mlp_layer_types = list(self.mlp_layer_types)
        self.rope_parameters = self._nested_rope(self.rope_parameters)
        self.validate()

    def _nested_rope(self, rp: dict | None) -> dict:
        """HF's layout: {"main": plain RoPE, "compress": RoPE (+YaRN) of CSA/HCA layers}."""
        rp = copy.deepcopy(dict(rp or {}))
        if isinstance(rp.get("main"), Mapping) and isinstance(rp.get("compress"), Mapping):
            main, compress = dict(rp["main"]), dict(rp["compress"])
        else:
            flat = {k: v for k, v in rp.items() if k not in ("main", "compress")}
            if "type" in flat:
                flat.setdefault("rope_type", flat.pop("type"))
            main = {"rope_type": "default", "rope_theta": self.rope_theta}
            compress = {**flat, "rope_theta": self.compress_rope_theta}
        for sub in (main, compress):
            sub.setdefault("rope_type", "default")
            sub["partial_rotary_factor"] = self.partial_rotary_factor
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
        return {"main": main, "compress": compress}

    # ------------------------------------------------------------------ derived sizes
    @property
    def rope_head_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def compress_rate(self, layer_type: str) -> int:
        return int(self.compress_rates[layer_type])

    @property
    def n_hash_layers(self) -> int:
        return sum(t == HASH_MOE for t in self.mlp_layer_types)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field."""
        positive = (
            "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts", "hc_mult",
            "hc_sinkhorn_iters", "sliding_window", "o_groups", "o_lora_rank", "index_n_heads",
            "index_head_dim", "index_topk", "max_position_embeddings",
        )  # fmt: skip
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model.{name}", f"must be a positive integer, got {v!r}")
        n = self.num_hidden_layers
        for name, types, allowed in (
            ("layer_types", self.layer_types, LAYER_TYPES),
            ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES),
        ):
            if len(types) != n:
                raise ConfigError(f"model.{name}", f"has {len(types)} entries but num_hidden_layers is {n}")
            for i, t in enumerate(types):
                if t not in allowed:
                    raise ConfigError(f"model.{name}", f"entry {i} is {t!r}; allowed: {', '.join(allowed)}")
        rd = self.rope_head_dim
        if rd <= 0 or rd % 2 or rd > self.head_dim:
            raise ConfigError(
                "model.partial_rotary_factor",
                f"gives {rd} rope dims; they must be even, positive and at most head_dim={self.head_dim}",
            )
        if CSA in self.layer_types and rd > self.index_head_dim:
            raise ConfigError("model.index_head_dim", f"({self.index_head_dim}) < rope dims {rd}")
        if self.compress_rates.get(CSA) != 4:
            raise ConfigError(
                "model.compress_rates.compressed_sparse_attention",
                f"must be 4 (CSA overlap is defined for m=4), got {self.compress_rates.get(CSA)}",
            )
        hca = self.compress_rates.get(HCA)
        if not isinstance(hca, int) or hca < 1:
            raise ConfigError(f"model.compress_rates.{HCA}", f"must be >= 1, got {hca!r}")
        extra = set(self.compress_rates) - set(LAYER_TYPES[1:])
        if extra:
            raise ConfigError("model.compress_rates", f"unknown layer types {sorted(extra)}")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(
                "model.o_groups",
                f"num_attention_heads={self.num_attention_heads} not divisible by o_groups={self.o_groups}",
            )
        if self.num_key_value_heads != 1:
            raise ConfigError("model.num_key_value_heads", "V4 uses one shared K=V head; must be 1")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                "model.num_experts_per_tok",
                f"top-k {self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}",
            )
        if self.n_shared_experts != 1:
            raise ConfigError("model.n_shared_experts", "exactly one shared expert is supported")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError("model.scoring_func", f"{self.scoring_func!r} not in {SCORING_FUNCS}")
        if self.scoring_func != "sqrtsoftplus" and HASH_MOE in self.mlp_layer_types:
            raise ConfigError("model.mlp_layer_types", "hash_moe layers need scoring_func='sqrtsoftplus'")
        if self.hidden_act != "silu":
            raise ConfigError("model.hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.tie_word_embeddings:
            raise ConfigError("model.tie_word_embeddings", "V4 has an untied head; must be false")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("model.num_nextn_predict_layers", "must be >= 0")
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError("model.attn_impl", f"{self.attn_impl!r} not in {ATTN_IMPLS}")
        if self.indexer_loss_mode not in INDEXER_LOSS_MODES:
            raise ConfigError(
                "model.indexer_loss_mode", f"{self.indexer_loss_mode!r} not in {INDEXER_LOSS_MODES}"
            )
        if not isinstance(self.attn_chunk_tokens, int) or self.attn_chunk_tokens < 0:
            raise ConfigError("model.attn_chunk_tokens", f"must be an int >= 0: {self.attn_chunk_tokens!r}")
        if self.indexer_loss_coef < 0:
            raise ConfigError("model.indexer_loss_coef", "must be >= 0")
        for name in ("rms_norm_eps", "hc_eps", "swiglu_limit", "routed_scaling_factor", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name}", "must be > 0")
        if self.balance_loss_alpha < 0:
            raise ConfigError("model.balance_loss_alpha", "must be >= 0")
        for label in ("main", "compress"):
            sub = self.rope_parameters[label]
            if sub["rope_type"] not in ("default", "yarn"):
                raise ConfigError(f"model.rope_parameters.{label}", f"bad rope_type {sub['rope_type']!r}")
            if sub["rope_type"] == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in sub:
                        raise ConfigError(f"model.rope_parameters.{label}.{key}", "required for YaRN")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain mapping (e.g. a Hydra `model` group); unknown keys are an error."""
        known = set(cls.field_names())
        for key in d:
            if key not in known:
                raise ConfigError(f"model.{key}", "unknown key (fields are HF DeepseekV4Config names)")
        return cls(**{k: _plain(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self.field_names()}

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content for `DeepseekV4ForCausalLM` (explicit layer_types, no training-only keys)."""
        d = {k: v for k, v in self.to_dict().items() if k not in TRAINING_ONLY_FIELDS}
        d["qk_rope_head_dim"] = self.rope_head_dim
        d.update({"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"]})
        return d


def _plain(v: Any) -> Any:
    """Turn nested mappings/sequences (e.g. OmegaConf containers) into dicts/lists."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and type(v).__name__ == "ListConfig"):
        return [_plain(x) for x in v]
    return v
