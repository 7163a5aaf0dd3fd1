"""Hugging Face mapping: export to a directory `DeepseekV4ForCausalLM` loads, and load any V4 directory back.

`save_hf` writes `config.json` (explicit `layer_types`), `generation_config.json`, safetensors shards with
`model.safetensors.index.json` under official checkpoint names (`embed.weight`, `layers.{i}.attn.wq_a.weight`,
`layers.{i}.hc_attn_fn`, `layers.{i}.ffn.experts.{e}.w1.weight`, `hc_head_fn`, `head.weight`, `mtp.{k}.*`),
`tid2eid` (int32) for hash layers, `ffn.gate.bias` for learned ones, and tokenizer files if given.
`load_hf` reads those, what `transformers`' own `save_pretrained` writes, or HF-native parameter names.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.errors import MoeforgeError
from model.transformer import FP32_PATTERN, Transformer, init_module_

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_HC = re.compile(r"(^|\.)(hc_attn|hc_ffn|hc_head)\.(fn|base|scale)$")
_HC_OFFICIAL = re.compile(r"(^|\.)(hc_attn|hc_ffn|hc_head)_(fn|base|scale)$")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w[123])\.weight$")
# HF-native (or save_pretrained hybrid) name pieces -> official names; applied in order.
_TO_OFFICIAL = [
    (r"^model\.", ""),
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.attn\.norm\.", ".attn.kv_norm."),  # save_pretrained's reverse rename of the main kv_norm
    (r"\.position_bias$", ".ape"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
]


# ---------------------------------------------------------------------------------------------- names
def official_name(name: str) -> str:
    """Any supported checkpoint name (official, HF-native, save_pretrained hybrid) -> official name."""
    for pattern, repl in _TO_OFFICIAL:
        name = re.sub(pattern, repl, name)
    return name


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> official checkpoint tensors (experts unstacked, `hc_*` renamed, tid2eid int32)."""
    out = {}
    for name, t in state.items():
        if re.search(r"\.experts\.w[123]$", name):
            for e in range(t.shape[0]):
                out[f"{name[:-3]}.{e}.{name[-2:]}.weight"] = t[e]
        elif name.endswith(".tid2eid"):
            out[name] = t.to(torch.int32)
        else:
            out[_HC.sub(r"\1\2_\3", name)] = t
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under any supported naming -> our state-dict names (experts stacked)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for raw, t in tensors.items():
        name = official_name(raw)
        if name.endswith(".experts.gate_up_proj"):  # HF-native fused [E, 2I, d]
            prefix = name[: -len(".gate_up_proj")]
            out[prefix + ".w1"], out[prefix + ".w3"] = t.chunk(2, dim=1)
        elif name.endswith(".experts.down_proj"):
            out[name[: -len(".down_proj")] + ".w2"] = t
        elif m := _EXPERT.match(name):
            experts.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = t
        else:
            out[_HC_OFFICIAL.sub(r"\1\2.\3", name)] = t
    for name, parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise MoeforgeError(f"checkpoint: experts of {name} are not numbered 0..{len(parts) - 1}")
        out[name] = torch.stack([parts[e] for e in range(len(parts))])
    return out


# ---------------------------------------------------------------------------------------------- save
def save_hf(model: Transformer, path, tokenizer=None, max_shard_bytes: int = 4 << 30) -> Path:
    """Write `model` as a transformers-loadable DeepSeek-V4 directory (see module docstring)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_official(model.state_dict())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = model.config
    config = cfg.to_hf_dict()
    config["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    _write_json(path / "config.json", config)
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(path / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    if tokenizer is not None:
        _save_tokenizer(tokenizer, path)
    return path


def _save_tokenizer(tokenizer, path: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(path))
    elif hasattr(tokenizer, "save"):
        tokenizer.save(str(path / "tokenizer.json"))
        _write_json(path / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    else:
        raise MoeforgeError("save_hf: tokenizer needs save_pretrained(path) or save(file)")


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- load
def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a config.json dict (legacy official keys folded in by transformers' own config)."""
    from transformers import DeepseekV4Config

    known = set(ModelConfig.field_names())
    hf = DeepseekV4Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    values = {k: v for k, v in hf.to_dict().items() if k in known}
    values.update({k: v for k, v in d.items() if k in known and k not in values})
    return ModelConfig.from_dict(values)


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors directory (sharded with an index, or loose files), names untouched."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise MoeforgeError(f"{path}: no safetensors files found")
    tensors = {}
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def load_hf(path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build our model from a V4 checkpoint directory; mHC, norms, sinks, ape and gate bias stay fp32.

    Accepts `save_hf` output, `DeepseekV4ForCausalLM.save_pretrained` output and BF16 official checkpoints.
    A checkpoint without `mtp.*` weights (transformers drops them) gets freshly initialised MTP layers.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise MoeforgeError(f"{config_file}: not found")
    cfg = config_from_hf(json.loads(config_file.read_text()))
    state = from_official(read_checkpoint(path))
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    if not any(k.startswith("mtp.") for k in state) and cfg.num_nextn_predict_layers:
        log.warning("%s has no mtp.* weights; initialising the MTP layer(s)", path)
        model.mtp.to_empty(device="cpu")
        init_module_(model.mtp, cfg)
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("mtp.")})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MoeforgeError(
            f"{path}: checkpoint does not match config.json (quantised checkpoints are not supported); "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for name, ref in expected.items():
        t = state[name]
        if t.shape != ref.shape:
            raise MoeforgeError(f"{path}: {name} has shape {tuple(t.shape)}, config says {tuple(ref.shape)}")
        if not ref.is_floating_point():
            state[name] = t.to(ref.dtype)
        else:
            state[name] = t.to(torch.float32 if FP32_PATTERN.search(name) else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model
