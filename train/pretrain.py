"""The `pretrain` stage: `moeforge pretrain [overrides]` or `python -m train.pretrain [overrides]`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from train.config import validate
from train.loop import Trainer
from train.metrics import METRICS_FILE, MetricsLogger, read_jsonl
from train.parallel.trainer import make_trainer
from train.plot import loss_curve

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


def _summary_metrics(records: list[dict]) -> dict:
    steps = [r for r in records if r.get("loss") is not None]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    speeds = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "first_val_loss": vals[0] if vals else None,
        "final_val_loss": vals[-1] if vals else None,
        "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
    }


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Pre-train to `trainer.max_steps` (resuming per `resume`); write checkpoints, metrics, PNG, summary."""
    started = time.perf_counter()
    cfg = validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cfg, run_dir, build_data)  # train.parallel hook: ParallelTrainer for parallel.*
    run_dir = getattr(trainer, "log_dir", run_dir)  # train.parallel hook: ranks > 0 log in run_dir/ranks/<r>
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
    plot = loss_curve(run_dir / METRICS_FILE, run_dir / PLOT_FILE, title=f"pretrain {run_dir.name}")
    summary = {
        "stage": "pretrain",
        "checkpoint": str(trainer.last_checkpoint),
        "metrics": {**_summary_metrics(read_jsonl(run_dir / METRICS_FILE)),
                    "wall_s": time.perf_counter() - started},
        "plot": str(plot),
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("pretrain done: %s", json.dumps(summary["metrics"]))
    return summary


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point; the run directory is `hydra.run.dir`."""
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
