"""What every stage leaves last: `summary.json` in its run directory (written atomically, so a step that is
killed never leaves half a summary for the pipeline to read), and the Hydra entry point that runs it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

SUMMARY_FILE = "summary.json"
log = logging.getLogger(__name__)


def write_summary(run_dir: Path, summary: dict, headline: dict | None = None) -> dict:
    """Write `summary` to `run_dir/summary.json` (temporary file, then rename); log `headline` (default:
    the summary's metrics) under the stage's name; return `summary`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{SUMMARY_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    tmp.replace(run_dir / SUMMARY_FILE)
    shown = summary.get("metrics", {}) if headline is None else headline
    log.info("%s done: %s", summary.get("stage", "stage"), json.dumps(shown, default=str))
    return summary


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())


def hydra_entry(run: Callable[[DictConfig, Path], dict], config_name: str = "config",
                config_path: str | None = "../configs") -> Callable[[], None]:
    """The `main()` of a stage module: Hydra composes the config (`configs/` by default, or a structured
    config registered as `config_name` when `config_path` is None) and `run` gets Hydra's run directory."""

    @hydra.main(config_path=config_path, config_name=config_name, version_base=None)
    def main(cfg: DictConfig) -> None:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))

    return main
