"""``moeforge export checkpoint=<dir> out=<dir>``: a training checkpoint as a Hugging Face directory.

Writes what ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load directly: config.json,
generation_config.json, safetensors shards with their index, tokenizer files (with the chat template); then,
unless ``verify=false``, loads it back through transformers and compares the logits with the checkpoint's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from launch.launcher import launchers_in_config_store
from model import ModelConfig, Transformer
from model.errors import ConfigError, MoeforgeError
from model.hf import save_hf
from train.summary import hydra_run_dir, write_summary

log = logging.getLogger(__name__)
CONFIG_NAME = "moeforge_export"


@dataclass
class ExportConfig:
    defaults: list = field(default_factory=lambda: [{"launcher": "local"}, "_self_"])
    checkpoint: str = MISSING  # a training checkpoint directory (<run>/checkpoints/step-<N>)
    out: str | None = None  # default: <run dir>/hf
    max_shard_gb: float = 4.0
    verify: bool = True  # load the export with transformers and compare logits with the checkpoint's
    verify_tokens: int = 16
    verify_atol: float = 1.0e-3
    launcher: Any = MISSING


ConfigStore.instance().store(name=CONFIG_NAME, node=ExportConfig)


def validate(cfg: DictConfig) -> None:
    if cfg.max_shard_gb <= 0:
        raise ConfigError("max_shard_gb", f"must be > 0, got {cfg.max_shard_gb}")
    if cfg.verify_tokens < 1:
        raise ConfigError("verify_tokens", f"must be >= 1, got {cfg.verify_tokens}")


def load_checkpoint(path: Path) -> tuple[Transformer, Any]:
    """Our model with the checkpoint's weights (in eval mode) and its tokenizer (or None)."""
    from tokenizers import Tokenizer

    from train.checkpoint import config_of, load

    path = Path(path)
    saved = config_of(path)
    if "model" not in saved:
        raise MoeforgeError(f"{path}: its manifest has no model config")
    model = Transformer(ModelConfig.from_dict(saved["model"]))
    load(path, model)
    tok_file = path / "tokenizer.json"
    return model.eval(), (Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None)


@torch.no_grad()
def logit_gap(model: Transformer, hf_dir: Path, n_tokens: int) -> float:
    """Max |logit difference| between ``model`` and the transformers model loaded from ``hf_dir``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    return (hf(ids).logits.float() - model(ids, with_mtp=False).logits.float()).abs().max().item()


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Export ``cfg.checkpoint`` to ``cfg.out`` (default ``<run_dir>/hf``); check it in transformers."""
    ckpt = Path(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else Path(run_dir) / "hf"
    model, tok = load_checkpoint(ckpt)
    hf_tok = None
    if tok is not None:
        from data.hf_tokenizer import to_hf_tokenizer

        hf_tok = to_hf_tokenizer(tok)
    else:
        log.warning("%s has no tokenizer.json: the export has no tokenizer", ckpt)
    save_hf(model, out, tokenizer=hf_tok, max_shard_bytes=int(cfg.max_shard_gb * (1 << 30)))
    metrics: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    if cfg.verify:
        gap = logit_gap(model, out, cfg.verify_tokens)
        metrics["max_logit_diff"] = gap
        if gap > cfg.verify_atol:
            raise MoeforgeError(f"export {out}: transformers' logits differ from the checkpoint's by "
                                f"{gap:.3g} (> verify_atol={cfg.verify_atol})")
    print(f"exported {ckpt} -> {out}", flush=True)
    summary = {"stage": "export", "checkpoint": str(out.resolve()), "source": str(ckpt), "metrics": metrics}
    return write_summary(run_dir, summary)


@hydra.main(config_path=None, config_name=CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point (defined here: Hydra names the job and its log after this file)."""
    run(cfg, hydra_run_dir())


if __name__ == "__main__":
    with launchers_in_config_store():
        main()
