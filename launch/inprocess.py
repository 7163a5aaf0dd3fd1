"""Run one stage in this process: compose, validate, ``run(cfg, run_dir)``, keep config and log."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from launch.compose import compose_stage
from launch.stages import StageSpec, load_stage
from launch.validate import validate_stage
from train.summary import SUMMARY_FILE, write_summary

log = logging.getLogger(__name__)


def run_in_process(spec: StageSpec, overrides: list[str]) -> dict:
    """Run ``spec`` with ``overrides`` (which set ``hydra.run.dir``); returns the stage's summary."""
    cfg, run_dir = compose_stage(spec, overrides)
    validate_stage(spec, cfg)
    module = load_stage(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")
    with log_to(run_dir / f"{spec.name}.log"):
        log.info("stage %s in %s", spec.name, run_dir)
        summary = module.run(cfg, run_dir)
    summary = dict(summary or {})
    summary.setdefault("stage", spec.name)
    if not (run_dir / SUMMARY_FILE).exists():
        write_summary(run_dir, summary)
    return summary


@contextmanager
def log_to(path: Path):
    """Send INFO logging to the console (if nothing does yet) and to ``path`` while the block runs."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    old_level = root.level
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
