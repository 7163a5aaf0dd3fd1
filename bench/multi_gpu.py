"""Issue 13: parallel layouts over several GPUs (NCCL) against the one-GPU run of the real pretrain stage.

For each layout: the per-step loss and gradient norm against the baseline on the same global batch (max
relative difference), tokens/s, tokens/s per GPU, MFU (the loop's FLOP model), and rank 0's peak memory.
With `--weak`, each GPU keeps the baseline's experts and tokens: experts scale with ep
(`n_routed_experts` = base x ep) and the global batch with dp. The baseline is then the same model on one GPU
with its base experts, losses are not compared (different models), and the efficiency is tokens/s per GPU
against the baseline's.

    python bench/multi_gpu.py --layouts dp2,ep2,pp2,pp2:dualpipev --steps 10 --out multi_gpu.json
    python bench/multi_gpu.py --weak --layouts ep2,ep4,ep8 --steps 20 --out bench/results/weak_scaling.json
    python bench/multi_gpu.py --device cpu --model v4-tiny --layouts dp2,ep2,pp2 --steps 3 --out /tmp/m.json

A layout is factors joined by "x": dpN, epN, ppN, plus ":schedule" for pipelines (`parallel.pp_schedule`), for
example "ep4xpp2:1f1b". ep alone implies dp = ep; the world is dp x pp processes. Same global batch: a layout
rank takes `--batch-size` rows (split into `--microbatches` for pipelines), and the baseline accumulates
dp x microbatches micro-batches of batch-size / microbatches rows, the split the indexer loss (a per-batch
mean) needs to be exactly comparable. `--device cpu` runs the layouts over gloo (the logic check).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import table, write_json  # noqa: E402
from bench.stage_runs import compare, mean_after_first, run_pretrain  # noqa: E402
from train.parallel.layout import SCHEDULES, Layout  # noqa: E402
from train.step_profile import read_profiles  # noqa: E402

COLUMNS = ["layout", "gpus", "status", "steps", "final_loss", "max_rel_loss", "max_rel_grad_norm",
           "tokens_per_s", "tokens_per_s_per_gpu", "efficiency", "mfu", "peak_mem_gib", "all_to_all_share",
           "p2p_share", "other_collective_share", "bubble_share"]
SHARES = {"all_to_all_share": "all_to_all", "p2p_share": "p2p", "other_collective_share": "other_collective",
          "bubble_share": "pipeline_bubble"}


def parse_layout(text: str, microbatches: int = 1) -> Layout:
    """"dp2xep2xpp2:zbv" -> the `train.parallel.layout.Layout` it names (pipelines get `microbatches`)."""
    factors, _, schedule = text.partition(":")
    sizes = {}
    for factor in factors.split("x"):
        axis, size = factor[:2], factor[2:]
        if axis not in ("dp", "ep", "pp") or not size.isdigit() or int(size) < 1 or axis in sizes:
            raise SystemExit(f"--layouts: bad layout {text!r} (factors dpN, epN, ppN joined by 'x', then "
                             f"an optional ':schedule')")
        sizes[axis] = int(size)
    dp, ep, pp = sizes.get("dp", sizes.get("ep", 1)), sizes.get("ep", 1), sizes.get("pp", 1)
    if dp % ep:
        raise SystemExit(f"--layouts: in {text!r} ep must divide dp")
    if (schedule or "1f1b") not in SCHEDULES:
        raise SystemExit(f"--layouts: unknown schedule in {text!r}; choose from {sorted(SCHEDULES)}")
    return Layout(dp * pp, pp, dp, ep, schedule or "1f1b", microbatches if pp > 1 else 1)


def common_overrides(args, ep: int) -> list[str]:
    over = [f"model={args.model}", f"precision={args.precision}", f"trainer.device={args.device}",
            f"trainer.max_steps={args.steps}", f"trainer.seq_len={args.seq_len}", f"trainer.seed={args.seed}",
            "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1", "checkpoint.every=0",
            "logger.progress=false", "logger.wandb.mode=disabled", "trainer.spike.enabled=false",
            "optim.warmup_steps=2", *args.override]
    if args.profile_steps:  # the last steps, under torch.profiler (train/step_profile.py)
        over += [f"trainer.profile.steps={args.profile_steps}",
                 f"trainer.profile.first_step={max(2, args.steps - args.profile_steps + 1)}"]
    if args.weak and ep > 1:
        over.append(f"model.n_routed_experts={args.base_experts * ep}")
    return over


def layout_overrides(args, layout: Layout) -> list[str]:
    return [f"trainer.batch_size={args.batch_size}", f"parallel.dp={layout.dp}", f"parallel.ep={layout.ep}",
            f"parallel.pp={layout.pp}", f"parallel.pp_schedule={layout.pp_schedule}",
            f"parallel.microbatches={layout.microbatches}"]


def baseline_split(args, layout: Layout) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches) of the one-process run: the layout's global batch, split as the
    layout splits it (or, `--weak`, one GPU's share: the rows of one data rank)."""
    micro = layout.microbatches
    return args.batch_size // micro, (1 if args.weak else layout.dp) * micro


def profile_shares(run_dir: Path) -> dict:
    """Mean over ranks of each rank's share of step time in all-to-all, p2p, other collectives and the
    pipeline bubble (the profiled steps of `trainer.profile`), with the per-rank records."""
    ranks = read_profiles(run_dir)
    out = {"profile": ranks}
    for column, key in SHARES.items():
        values = [r["share"][key] for r in ranks if r["share"].get(key) is not None]
        out[column] = sum(values) / len(values) if values else None
    return out


def summarise(name: str, gpus: int, records: list[dict], base: list[dict] | None,
              base_rate: float | None) -> dict:
    rate = mean_after_first(records, "tokens_per_s")
    row = {"layout": name, "gpus": gpus, "status": "ok", "steps": len(records),
           "final_loss": records[-1]["loss"], "tokens_per_s": rate, "mfu": mean_after_first(records, "mfu"),
           "peak_mem_gib": max((r.get("peak_mem_gib") or 0.0 for r in records), default=None) or None}
    row["tokens_per_s_per_gpu"] = rate / gpus if rate else None
    if base is not None:
        worst = compare(base, records)
        row["max_rel_loss"], row["max_rel_grad_norm"] = worst["loss"], worst["grad_norm"]
    if base_rate and rate:
        row["efficiency"] = rate / gpus / base_rate
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="dp2,ep2,pp2,pp2:dualpipev")
    p.add_argument("--model", default="v4-small")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4, help="rows per data-parallel rank and step")
    p.add_argument("--microbatches", type=int, default=4, help="pipeline microbatches (divides --batch-size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weak", action="store_true", help="weak scaling: experts x ep, global batch x dp")
    p.add_argument("--base-experts", type=int, default=32, help="experts per GPU under --weak")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="profile this many last steps of each run: time shares of all-to-all, p2p, bubble")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    layouts = [(t, parse_layout(t, args.microbatches)) for t in args.layouts.split(",")]
    if any(lay.pp > 1 and args.batch_size % args.microbatches for _, lay in layouts):
        raise SystemExit("--microbatches must divide --batch-size")
    env = {"OMP_NUM_THREADS": "1"} if args.device == "cpu" else {}
    rows, runs, baselines = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, layout) in enumerate(layouts):
            key = baseline_split(args, layout)
            try:
                if key not in baselines:  # one baseline per global-batch split
                    single = f"single ({key[1]} x {key[0]} rows)"
                    over = common_overrides(args, 1) + [f"trainer.batch_size={key[0]}",
                                                        f"trainer.grad_accum={key[1]}"]
                    baselines[key] = run_pretrain(Path(tmp) / f"single-{len(baselines)}", over, 1,
                                                  args.timeout, env)[0]
                    rows.append(summarise(single, 1, baselines[key], None, None))
                    runs[single] = baselines[key]
                base = baselines[key]
                over = common_overrides(args, layout.ep) + layout_overrides(args, layout)
                run_dir = Path(tmp) / f"layout-{i}"
                records = run_pretrain(run_dir, over, layout.world, args.timeout, env)[0]
                rate = mean_after_first(base, "tokens_per_s")
                rows.append(summarise(name, layout.world, records, None if args.weak else base, rate))
                rows[-1].update(profile_shares(run_dir))
                runs[name] = records
            except (RuntimeError, OSError) as err:  # a failed layout is recorded; the others still run
                rows.append({"layout": name, "gpus": layout.world, "status": f"failed: {str(err)[-300:]}"})
            record = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "runs": runs}
            write_json(args.out, record)
    print(table(rows, COLUMNS))


if __name__ == "__main__":
    main()
