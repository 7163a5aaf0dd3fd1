"""metrics.jsonl (append on resume, one record per step), wandb offline, progress bar, loss-curve PNG."""

import json
import math

from omegaconf import OmegaConf

from train.config import LoggerConfig
from train.metrics import METRICS_FILE, JsonlWriter, MetricsLogger, read_jsonl, summarize
from train.plot import loss_curve


def test_jsonl_resume_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / METRICS_FILE
    w = JsonlWriter(path)
    for step in range(5):
        w.write({"step": step, "loss": 1.0 / (step + 1), "nan": math.nan})
    w.close()
    assert read_jsonl(path)[1] == {"step": 1, "loss": 0.5, "nan": None}
    w = JsonlWriter(path, resume_step=2)  # a crash after step 4, resumed from the checkpoint of step 2
    w.write({"step": 3, "loss": 7.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 7.0)]
    JsonlWriter(path).close()  # a fresh run starts a fresh file
    assert read_jsonl(path) == []


def test_logger_writes_jsonl_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.structured(LoggerConfig)
    m = MetricsLogger(tmp_path, cfg, total_steps=3, start_step=0, config={"trainer": {"max_steps": 3}})
    assert m.wandb.mode == "offline"
    m.log({"step": 0, "val_loss": 5.0}, advance=False)
    for step in (1, 2, 3):
        m.log({"step": step, "loss": 5.0 - step, "lr": 1e-3, "tokens_per_s": 100.0,
               "expert_balance": [1.5, 2.0]})
    m.close()
    records = read_jsonl(tmp_path / METRICS_FILE)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[2]["expert_balance"] == [1.5, 2.0]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "wandb_id.txt").read_text()
    m = MetricsLogger(tmp_path, cfg, total_steps=4, start_step=3, config={})  # resume: same wandb run id
    m.log({"step": 4, "loss": 0.5})
    m.close()
    assert (tmp_path / "wandb_id.txt").read_text() == run_id
    assert [r["step"] for r in read_jsonl(tmp_path / METRICS_FILE)] == [0, 1, 2, 3, 4]


def test_loss_curve_png(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": 6 - s, **({"val_loss": 6.5 - s} if s % 2 else {})})
                            + "\n" for s in range(6)))
    png = loss_curve(path, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_summarize():
    records = [{"step": 0, "val_loss": 9.0}, {"step": 1, "loss": 8.0, "tokens_per_s": 1.0},
               {"step": 2, "loss": 7.0, "tokens_per_s": 10.0}, {"step": 3, "loss": 6.0, "tokens_per_s": 20.0,
                                                               "val_loss": 6.5}]
    assert summarize(records) == {"steps": 3, "first_loss": 8.0, "final_loss": 6.0, "first_val_loss": 9.0,
                                  "final_val_loss": 6.5, "mean_tokens_per_s": 15.0}
    assert summarize([])["steps"] == 0
