"""Where step metrics go: metrics.jsonl in the run directory, wandb, and a console progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
SHOWN = ("loss", "val_loss", "lr", "tokens_per_s", "mfu")


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a metrics file (an absent file has none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict]) -> dict:
    """The headline numbers of a run's records: steps, first/final train and validation loss, tokens/s."""
    steps = [r for r in records if r.get("loss") is not None]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    speeds = [r["tokens_per_s"] for r in steps[1:] if r.get("tokens_per_s")]  # step 1 includes warm-up
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "first_val_loss": vals[0] if vals else None,
        "final_val_loss": vals[-1] if vals else None,
        "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
    }


def _clean(value):
    """JSON-safe scalar: NaN/inf become null, tensors and numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """One JSON object per step. Resuming from step K drops records after K (written before a crash)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        self._file = None
        self.truncate(resume_step if resume_step is not None else 0)

    def truncate(self, step: int) -> None:
        """Keep only the records of steps <= `step`, then append from there."""
        if self._file is not None:
            self._file.close()
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _wandb_mode(project: str | None, mode: str | None) -> str:
    if mode is not None:
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if project else "offline")


class WandbSink:
    """A wandb run in the run directory; offline unless a project is set (WANDB_MODE is respected)."""

    def __init__(self, run_dir: Path, project: str | None, entity: str | None, mode: str | None,
                 config: dict, resume: bool):
        self.mode = _wandb_mode(project, mode)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(project=project or "moeforge", entity=entity, mode=self.mode, dir=str(run_dir),
                              config=config, id=run_id, resume="allow", name=Path(run_dir).name)

    def log(self, step: int, record: dict) -> None:
        if self.run is None:
            return
        flat = {}
        for k, v in record.items():
            if isinstance(v, (list, tuple)):
                flat.update({f"{k}/{i}": x for i, x in enumerate(v)})
            elif isinstance(v, (int, float)) and k != "step":
                flat[k] = v
        self.run.log(flat, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MetricsLogger:
    """Fans each step's record out to metrics.jsonl (every step), wandb (every `every`) and the console."""

    def __init__(self, run_dir: Path, logger_cfg, *, total_steps: int, start_step: int, config: dict,
                 console_every: int = 10):
        resume = start_step > 0
        self.jsonl = JsonlWriter(Path(run_dir) / METRICS_FILE, resume_step=start_step if resume else None)
        self.wandb = WandbSink(run_dir, logger_cfg.wandb.project, logger_cfg.wandb.entity,
                               logger_cfg.wandb.mode, config, resume)
        self.every = logger_cfg.every
        self.console_every = console_every
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not logger_cfg.progress,
                        dynamic_ncols=True, desc="train")

    def log(self, record: dict, advance: bool = True) -> None:
        """Record one step (`advance=False` for the step-0 record written before training)."""
        step = record["step"]
        self.jsonl.write(record)
        if step % self.every == 0 or "val_loss" in record:
            self.wandb.log(step, record)
        if advance:
            self.bar.update(1)
        shown = {k: record[k] for k in SHOWN if record.get(k) is not None}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if step % self.console_every == 0 or "val_loss" in record:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def rewind(self, step: int) -> None:
        """After a rollback to `step`: drop later records and move the progress bar back."""
        self.jsonl.truncate(step)
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        self.wandb.close()
