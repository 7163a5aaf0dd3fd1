"""Muon (V4 split) vs AdamW on v4-tiny at equal steps, a few learning rates each (CPU by default).

Each run is `python -m train.pretrain optim=<name> optim.lr=<lr> ...` (the real stage, same data, same
seed); runs go `--jobs` at a time with `--threads` torch threads each. The table (final validation loss of
every run, best LR of each optimizer marked) is printed last and written to bench/results/.

    python bench/muon_vs_adamw.py --steps 150 --muon-lrs 3e-3,1e-2,2e-2 --adamw-lrs 1e-3,3e-3,1e-2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import table, write_json  # noqa: E402


def overrides(args) -> list[str]:
    """The settings every run shares; only optim and optim.lr differ."""
    return [f"trainer.device={args.device}", f"trainer.max_steps={args.steps}",
            f"trainer.seq_len={args.seq_len}", f"trainer.batch_size={args.batch_size}",
            f"trainer.eval_every={args.eval_every}",
            f"trainer.eval_batches={args.eval_batches}", f"optim.warmup_steps={args.warmup}",
            "checkpoint.every=0", "checkpoint.keep=1", "logger.progress=false", "logger.wandb.mode=disabled",
            *args.extra]


def launch(name: str, lr: float, args, out: Path) -> tuple[dict, subprocess.Popen]:
    run_dir = out / f"{name}-lr{lr:g}"
    cmd = [sys.executable, "-m", "train.pretrain", f"optim={name}", f"optim.lr={lr}",
           f"hydra.run.dir={run_dir}", *overrides(args)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    log = open(out / f"{run_dir.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return {"optim": name, "lr": lr, "run_dir": run_dir}, proc


def log_tail(job: dict) -> str:
    return "\n".join(Path(f"{job['run_dir']}.log").read_text().splitlines()[-15:])


def collect(job: dict) -> dict:
    summary = json.loads((job["run_dir"] / "summary.json").read_text())["metrics"]
    records = [json.loads(line) for line in (job["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    return {"optim": job["optim"], "lr": job["lr"], "final_val_loss": summary["final_val_loss"],
            "first_val_loss": summary["first_val_loss"], "final_loss": summary["final_loss"],
            "tokens_per_s": summary["mean_tokens_per_s"], "wall_s": summary["wall_s"],
            "val_curve": curve}


def run_all(args, out: Path) -> list[dict]:
    todo = [("muon", lr) for lr in args.muon_lrs] + [("adamw", lr) for lr in args.adamw_lrs]
    # the first run builds the tokenizer and packed data cache alone; the others then share it
    first = launch(*todo[0], args, out)
    running, rows = [first], []
    if first[1].wait() != 0:
        raise SystemExit(f"run {todo[0]} failed; see {first[0]['run_dir']}.log:\n{log_tail(first[0])}")
    for name, lr in todo[1:]:
        while sum(p.poll() is None for _, p in running) >= args.jobs:
            time.sleep(1)
        running.append(launch(name, lr, args, out))
    for job, proc in running:
        if proc.wait() != 0:
            raise SystemExit(f"run {job['optim']} lr={job['lr']} failed:\n{log_tail(job)}")
        rows.append(collect(job))
    return rows


def main() -> None:
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--muon-lrs", type=floats, default=[3e-3, 1e-2, 2e-2])
    p.add_argument("--adamw-lrs", type=floats, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--device", default="cpu", help="trainer.device of every run (cpu | cuda | auto)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "muon_vs_adamw.json")
    p.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a temp dir)")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = p.parse_args()
    out = args.runs_dir or Path(tempfile.mkdtemp(prefix="muon_vs_adamw-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = run_all(args, out)
    for name in ("muon", "adamw"):
        best = min((r for r in rows if r["optim"] == name), key=lambda r: r["final_val_loss"])
        best["best"] = "*"
    write_json(args.out, {"command": " ".join(sys.argv), "overrides": overrides(args), "runs": rows,
                          "threads": args.threads, "jobs": args.jobs, "cpus": os.cpu_count()})
    print(table(rows, ["optim", "lr", "first_val_loss", "final_val_loss", "final_loss", "tokens_per_s",
                       "wall_s", "best"]))


if __name__ == "__main__":
    main()
