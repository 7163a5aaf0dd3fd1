"""The `sft` stage: `moeforge sft domain=math init=<checkpoint> [overrides]` or `python -m train.sft ...`.

Supervised fine-tuning on conversations with the loss on assistant tokens only (data.sft), through the
shared training loop (train.loop.Trainer): the domain's task records rendered as user prompt + assistant
solution (`sft.source=tasks`), or a `messages` column of `data=files|hf` (`sft.source=conversations`).
The tokenizer is the init checkpoint's (so token ids keep their meaning), else `data.tokenizer`, else the
data group's trained one. Validation is the assistant-token loss on the held-out split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from model.errors import ConfigError
from train.config import to_object, validate
from train.loop import Trainer
from train.metrics import METRICS_FILE, MetricsLogger, read_jsonl
from train.plot import loss_curve
from train.summary import hydra_run_dir, write_summary

log = logging.getLogger(__name__)
PLOT_FILE = "loss_curve.png"
SOURCES = ("tasks", "conversations")


@dataclass
class DomainConfig:
    """Which tasks (`domain=math|code|<name>`): generated `math`/`code`, or a dataset domain whose
    `options` name its path, prompt_field, answer_field, ... (see data.tasks.load_tasks)."""

    name: str = "math"
    n_train: int = 2000  # generated tasks in the training split (a cap for dataset domains)
    n_val: int = 128  # held-out tasks
    seed: int = 0
    system: str | None = None  # optional system message before every prompt
    options: dict[str, Any] = field(default_factory=dict)  # passed to data.tasks.load_tasks

    def validate(self) -> DomainConfig:
        if not self.name:
            raise ConfigError("domain.name", "must name a domain (math, code or a dataset domain)")
        for key in ("n_train", "n_val"):
            if getattr(self, key) < 1:
                raise ConfigError(f"domain.{key}", f"must be >= 1, got {getattr(self, key)}")
        return self

    def tasks(self, split: str) -> list[dict]:
        """Task records of `split` ('train' or 'val')."""
        from data.tasks import load_tasks

        n = self.n_train if split == "train" else self.n_val
        return load_tasks(self.name, split, n, self.seed, **self.options)


@dataclass
class SFTConfig:
    source: str = "tasks"  # tasks (the domain's records) | conversations (data.* messages column)
    packed: bool = True  # several whole conversations per row (else one per row)

    def validate(self) -> SFTConfig:
        if self.source not in SOURCES:
            raise ConfigError("sft.source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        return self


def section(cfg: DictConfig, name: str, cls: type):
    """The validated optional section `name` (its dataclass defaults when the config has none)."""
    return to_object(cfg, name) if name in cfg else cls().validate()


def stage_tokenizer(cfg: DictConfig, vocab_size: int):
    """The init checkpoint's tokenizer.json, else `data.tokenizer`, else the data group's (trained)."""
    from data.build import build_tokenizer
    from data.config import DataConfig
    from data.tokenizer import load_tokenizer

    if cfg.get("init") and (Path(str(cfg.init)) / "tokenizer.json").is_file():
        return load_tokenizer(Path(str(cfg.init)))
    return build_tokenizer(DataConfig.from_dict(cfg.data), vocab_size)


@dataclass
class SFTData:
    tokenizer: Any
    train: Any
    val: Any | None


def conversations(cfg: DictConfig, split: str) -> list[list[dict]]:
    """The SFT conversations of `split` for this config."""
    from data.config import DataConfig
    from data.sft import load_conversations, task_conversations

    if section(cfg, "sft", SFTConfig).source == "conversations":
        return load_conversations(DataConfig.from_dict(cfg.data), split)
    domain = section(cfg, "domain", DomainConfig)
    return task_conversations(domain.tasks(split), domain.system)


def build_data(trainer: Trainer) -> SFTData:
    """Tokenizer and SFT loaders (train shuffled, held-out ordered) for the trainer's shapes."""
    from data.sft import build_sft_loader

    cfg, t = trainer.cfg, trainer.t
    tok = stage_tokenizer(cfg, trainer.model_cfg.vocab_size)
    packed = section(cfg, "sft", SFTConfig).packed
    kw = {"seq_len": t.seq_len, "batch_size": t.batch_size, "seed": t.seed, "packed": packed}
    train = build_sft_loader(conversations(cfg, "train"), tok, **kw)
    val_convs = conversations(cfg, "val")
    val = build_sft_loader(val_convs, tok, shuffle=False, **kw) if val_convs else None
    return SFTData(tok, train, val)


def _summary_metrics(records: list[dict]) -> dict:
    steps = [r for r in records if r.get("loss") is not None]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return {"steps": steps[-1]["step"] if steps else 0,
            "first_loss": steps[0]["loss"] if steps else None,
            "final_loss": steps[-1]["loss"] if steps else None,
            "first_val_loss": vals[0] if vals else None,
            "final_val_loss": vals[-1] if vals else None}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Fine-tune to `trainer.max_steps` (resuming per `resume`, starting from `init`); write checkpoints,
    metrics.jsonl, the loss PNG and summary.json."""
    started = time.perf_counter()
    cfg = validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, build_data)
    trainer.start()
    metrics = MetricsLogger(run_dir, cfg.logger, total_steps=trainer.t.max_steps, start_step=trainer.step,
                            config=OmegaConf.to_container(cfg, resolve=True),
                            console_every=trainer.t.log_every)
    try:
        trainer.fit(metrics)
    finally:
        metrics.close()
    if trainer.last_checkpoint is None:
        trainer.save()
    plot = loss_curve(run_dir / METRICS_FILE, run_dir / PLOT_FILE, title=f"sft {run_dir.name}")
    summary = {
        "stage": "sft",
        "domain": section(cfg, "domain", DomainConfig).name,
        "checkpoint": str(trainer.last_checkpoint),
        "metrics": {**_summary_metrics(read_jsonl(run_dir / METRICS_FILE)),
                    "wall_s": time.perf_counter() - started},
        "plot": str(plot),
        "run_dir": str(run_dir),
    }
    return write_summary(run_dir, summary)


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point (defined here: Hydra names the job and its log after this file)."""
    run(cfg, hydra_run_dir())


if __name__ == "__main__":
    main()
