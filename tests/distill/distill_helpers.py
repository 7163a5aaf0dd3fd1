"""Shared pieces of the distill tests (and of their torchrun worker): the tiny model, stage configs, a
random-init checkpoint with the built-in tokenizer, SFT runs, and the student's gradients of one batch."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.build import build_tokenizer
from data.config import DataConfig
from data.tokenizer import tokenizer_hash
from launch.compose import compose_stage
from launch.stages import get_stage
from model import ModelConfig, Transformer
from train import checkpoint, rng
from train.sft import run as sft_run

# Two sliding-attention layers (hash + learned MoE) whose window covers the whole sequence, so copying a
# function name from the prompt is learnable in a few hundred SFT steps.
MODEL = ["model.vocab_size=512", "model.hidden_size=64", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "model.head_dim=32", "model.q_lora_rank=32", "model.o_lora_rank=32",
         "model.moe_intermediate_size=64", "model.num_nextn_predict_layers=0", "model.sliding_window=128",
         "model.layer_types=[sliding_attention,sliding_attention]", "model.mlp_layer_types=[hash_moe,moe]"]
QUIET = ["logger.progress=false", "logger.wandb.mode=disabled", "trainer.spike.enabled=false",
         "trainer.log_every=50"]


def compose(stage: str, run_dir, *overrides: str):
    """(config, run dir) of `stage` on the tiny model."""
    return compose_stage(get_stage(stage), [f"stage={stage}", f"hydra.run.dir={run_dir}", *MODEL, *QUIET,
                                            *overrides])


def data_overrides(root: Path) -> list[str]:
    return [f"data.cache_dir={root / 'cache'}", "data.max_bytes=300000"]


class Checkpoints:
    """Random-init checkpoints of the tiny model under `root`, with the tokenizer trained on the built-in
    corpus (their tokenizer.json and hash), so stages accept them as students and teachers."""

    def __init__(self, root: Path):
        self.root, self.data = Path(root), data_overrides(Path(root))
        cfg, _ = compose("sft", self.root / "base", "+domain=math", *self.data)
        self.tokenizer = build_tokenizer(DataConfig.from_dict(cfg.data), 512)
        self.model = OmegaConf.to_container(cfg.model, resolve=True)

    def random(self, name: str, seed: int, **model_extra) -> Path:
        path = self.root / name / "step-0"
        if path.is_dir():
            return path
        rng.seed_all(seed)
        values = {**self.model, **model_extra}
        return checkpoint.save(self.root / name, 0, Transformer(ModelConfig.from_dict(values)), None,
                               config={"model": values}, tokenizer_hash=tokenizer_hash(self.tokenizer),
                               extra_files={"tokenizer.json": self.tokenizer.to_str()})


def sft(root: Path, init, name: str, steps: int, *overrides: str) -> str:
    """The final checkpoint of a `steps`-step SFT from `init` (batch 8 x 128 tokens)."""
    cfg, rd = compose("sft", root / name, f"init={init}", *data_overrides(root), f"trainer.max_steps={steps}",
                      "trainer.seq_len=128", "trainer.batch_size=8", "trainer.eval_every=0",
                      "checkpoint.every=0", "optim.lr=3e-3", "optim.warmup_steps=10", "domain.n_val=16",
                      *overrides)
    return sft_run(cfg, rd)["checkpoint"]


def distill_overrides(student, teachers: dict, *extra: str) -> list[str]:
    return ["+distill=default", f"student={student}", f"teachers.math={teachers['math']}",
            f"teachers.code={teachers['code']}", "distill.max_new_tokens=32", "optim.lr=3e-3",
            "optim.warmup_steps=5", *extra]


def student_grads(trainer, roll, domains: list[str]) -> tuple[float, dict, dict[str, torch.Tensor]]:
    """(loss, per-domain metrics, the student's gradients) of one distillation backward on `roll`."""
    trainer.model.zero_grad(set_to_none=True)
    loss, parts, _ = trainer.backward(roll, domains)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return loss, parts, grads
