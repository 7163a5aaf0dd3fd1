"""``moeforge model-info [model=...]``: total and active parameter counts (built on the meta device)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from model import ModelConfig
from model.info import count_parameters
from train.summary import hydra_run_dir, write_summary


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Count the parameters of ``cfg.model``; print them and write ``run_dir/summary.json``."""
    total, active = count_parameters(ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
    counts = {"total_params": total, "active_params": active}
    print(f"model: {cfg.model.num_hidden_layers} layers, hidden {cfg.model.hidden_size}, "
          f"{cfg.model.n_routed_experts} routed experts ({cfg.model.num_experts_per_tok} per token)")
    for key, value in counts.items():
        print(f"{key:<13}  {_fmt(value)}")
    summary = {"stage": "model-info", "checkpoint": None, "metrics": counts}
    return write_summary(run_dir, summary)


def _fmt(value: int) -> str:
    return f"{value:>17,}" + (f"  ({value / 1e9:.1f}B)" if value >= 10**8 else "")


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point (defined here: Hydra names the job and its log after this file)."""
    run(cfg, hydra_run_dir())


if __name__ == "__main__":
    main()
