"""The `pretrain` stage: `moeforge pretrain [overrides]` or `python -m train.pretrain [overrides]`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.config import validate
from train.loop import Trainer
from train.metrics import METRICS_FILE, summarize
from train.parallel.trainer import make_trainer
from train.plot import loss_curve
from train.summary import hydra_run_dir, write_summary

log = logging.getLogger(__name__)
PLOT_FILE = "loss_curve.png"


def build_data(trainer: Trainer):
    """Tokenizer plus packed train/val loaders of the `data` group for this run's shapes."""
    from data.build import build_pretrain_data

    t = trainer.t
    return build_pretrain_data(trainer.cfg.data, vocab_size=trainer.model_cfg.vocab_size, seq_len=t.seq_len,
                               batch_size=t.batch_size, seed=t.seed,
                               rank=getattr(trainer, "data_rank", 0),  # train.parallel hook: shard by dp
                               world=getattr(trainer, "data_world", 1))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Pre-train to `trainer.max_steps` (resuming per `resume`); write checkpoints, metrics, PNG, summary."""
    started = time.perf_counter()
    cfg = validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cfg, run_dir, build_data)  # train.parallel hook: ParallelTrainer for parallel.*
    records = trainer.train()
    plot = loss_curve(run_dir / METRICS_FILE, run_dir / PLOT_FILE, title=f"pretrain {run_dir.name}")
    summary = {
        "stage": "pretrain",
        "checkpoint": str(trainer.last_checkpoint),
        "metrics": {**summarize(records), "wall_s": time.perf_counter() - started},
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
