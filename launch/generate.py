"""``moeforge generate model=<hf dir> prompt=...``: load an exported model through transformers and complete.

This is what a Hugging Face user does with the export: ``AutoTokenizer`` + ``AutoModelForCausalLM``,
``generate``; ``chat=true`` wraps the prompt as a user turn with the tokenizer's chat template.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from launch.launcher import launchers_in_config_store
from model.errors import ConfigError, MoeforgeError
from train.summary import hydra_run_dir, write_summary

CONFIG_NAME = "moeforge_generate"
STOP_TOKENS = ("<|end|>", "<|eos|>")


@dataclass
class GenerateConfig:
    defaults: list = field(default_factory=lambda: [{"launcher": "local"}, "_self_"])
    model: str = MISSING  # a Hugging Face model directory (moeforge export's out)
    prompt: str = MISSING
    chat: bool = False  # render the prompt as a user message with the tokenizer's chat template
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    launcher: Any = MISSING


ConfigStore.instance().store(name=CONFIG_NAME, node=GenerateConfig)


def validate(cfg: DictConfig) -> None:
    if cfg.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be >= 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise ConfigError("temperature", f"must be >= 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError("top_p", f"must be in (0, 1], got {cfg.top_p}")


@torch.no_grad()
def complete(model_dir: Path, prompt: str, chat: bool, max_new_tokens: int, temperature: float,
             top_p: float, seed: int) -> tuple[str, int]:
    """(completion text, number of new tokens) from the transformers model in ``model_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise MoeforgeError(f"model: {model_dir} is not a Hugging Face model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if chat:
        if not tok.chat_template:
            raise MoeforgeError(f"chat: the tokenizer in {model_dir} has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    stops = [i for i in tok.convert_tokens_to_ids(list(STOP_TOKENS)) if i not in (None, tok.unk_token_id)]
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=sample, temperature=temperature if sample else None,
                         top_p=top_p if sample else None, eos_token_id=stops or None,
                         pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), int(new.numel())


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Print the completion of ``cfg.prompt``; write it to ``run_dir/summary.json``."""
    started = time.perf_counter()
    text, n = complete(Path(cfg.model), cfg.prompt, cfg.chat, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                       cfg.seed)
    seconds = time.perf_counter() - started
    print(f"{cfg.prompt}\n---\n{text}" if cfg.chat else f"{cfg.prompt}{text}", flush=True)
    summary = {"stage": "generate", "checkpoint": None, "model": str(cfg.model), "prompt": cfg.prompt,
               "completion": text, "metrics": {"new_tokens": n, "seconds": round(seconds, 2)}}
    return write_summary(run_dir, summary)


@hydra.main(config_path=None, config_name=CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point (defined here: Hydra names the job and its log after this file)."""
    run(cfg, hydra_run_dir())


if __name__ == "__main__":
    with launchers_in_config_store():
        main()
