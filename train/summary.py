"""What every stage leaves last: `summary.json` in its run directory (written atomically, so a step that is
killed never leaves half a summary for the pipeline to read). Each stage defines its own `@hydra.main`
(Hydra names the job, and its log file, after the file that defines it) and reads its run directory with
`hydra_run_dir()`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

SUMMARY_FILE = "summary.json"
log = logging.getLogger(__name__)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_summary(run_dir: Path, summary: dict, headline: dict | None = None) -> dict:
    """Write `summary` to `run_dir/summary.json` (temporary file, then rename); log `headline` (default:
    the summary's metrics) under the stage's name; return `summary`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1, default=str) + "\n")
    shown = summary.get("metrics", {}) if headline is None else headline
    log.info("%s done: %s", summary.get("stage", "stage"), json.dumps(shown, default=str))
    return summary


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())


def hydra_run_dir() -> Path:
    """The run directory of the Hydra job running now (`hydra.run.dir`)."""
    return Path(HydraConfig.get().runtime.output_dir)
