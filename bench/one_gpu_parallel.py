"""Issue 11, must-show 3: on one GPU, the parallel code path (an NCCL process group of one, FSDP2 wrapping,
expert dispatch with ep=1, distributed Muon, DCP checkpoints) trains at the same loss as the plain loop.

Runs the real pretrain stage twice per precision, on the same seed and batches: once plain, once with
`parallel.dp=1` (which forces `ParallelTrainer` on one process), then compares the per-step loss and
gradient norm. Prints a table, writes JSON.

    python bench/one_gpu_parallel.py --steps 20 --out one_gpu_parallel.json
    python bench/one_gpu_parallel.py --device cpu --model v4-tiny --steps 3 --out /tmp/x.json  # a dry run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import table, write_json  # noqa: E402
from bench.stage_runs import compare, run_pretrain  # noqa: E402


def run_stage(run_dir: Path, args, precision: str, parallel: bool) -> tuple[list[dict], float]:
    overrides = [f"model={args.model}", f"precision={precision}", f"trainer.device={args.device}",
                 f"trainer.max_steps={args.steps}", f"trainer.seq_len={args.seq_len}",
                 f"trainer.batch_size={args.batch_size}", "trainer.log_every=1", "trainer.eval_every=0",
                 "trainer.eval_batches=1", "checkpoint.every=0", "logger.progress=false",
                 "logger.wandb.mode=disabled", "trainer.spike.enabled=false", "optim.warmup_steps=2"]
    return run_pretrain(run_dir, overrides + (["parallel.dp=1"] if parallel else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="v4-small")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("bench/results/one_gpu_parallel.json"))
    args = p.parse_args()
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            plain, t_plain = run_stage(Path(tmp) / f"plain-{precision}", args, precision, parallel=False)
            par, t_par = run_stage(Path(tmp) / f"parallel-{precision}", args, precision, parallel=True)
            worst = compare(plain, par)
            runs[precision] = {"plain": plain, "parallel": par, "seconds": [t_plain, t_par],
                               "max_rel_diff": worst}
            rows.append({"precision": precision, "steps": len(plain), "final loss plain": plain[-1]["loss"],
                         "final loss parallel": par[-1]["loss"], "max rel loss": worst["loss"],
                         "max rel grad_norm": worst["grad_norm"], "s plain": t_plain, "s parallel": t_par})
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "rows": rows})
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
