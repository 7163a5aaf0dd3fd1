"""FP8 training comparison (issue 9, item 3): one model trained from the same seed and the same batches in
bf16, fp8 and fp8_rowwise through the real training loop (`train.loop.Trainer.train_step`).

    python bench/fp8_train.py prepare --data runs/fp8_data [--seq-len 1024 --rows 2600]   # once, any CPU
    python bench/fp8_train.py train --data runs/fp8_data --precision fp8 --steps 300 --out fp8.json
    python bench/fp8_train.py report bf16.json fp8.json ... --out bench/results/fp8_train.json

`prepare` trains the built-in corpus's tokenizer and writes the first `--rows` packed rows (so that the GPU
machine, which has another Python and so another built-in corpus, trains on the same tokens). `train`
runs `--steps` optimizer steps (or the first `--stop-after` of them; stopping early at `--time-limit`
seconds) and writes every step's loss and time; `--tag` names the run (e.g. "loss" or "timing").
`report` compares each FP8 run with the BF16 run of the same tag: the loss (mean over the `--last` steps
that end at the step count every run of the tag reached) relative to BF16, and the median step time after
`--warmup` steps. The table is printed last.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import table, write_json  # noqa: E402

MODEL_OVERRIDES = ["model=v4-small", "logger.progress=false", "logger.wandb.mode=disabled",
                   "trainer.eval_every=0", "checkpoint.every=0"]


def prepare(args) -> None:
    from data.build import encode_documents
    from data.cache import write_packed
    from data.config import DataConfig
    from data.packing import pack
    from data.sources import make_source
    from data.tokenizer import build_tokenizer

    cfg = DataConfig.from_dict({"source": "builtin"})
    source = make_source(cfg)
    tok = build_tokenizer(cfg, args.vocab_size, source)
    rows = itertools.islice(pack(encode_documents(tok, source.documents("train")), args.seq_len), args.rows)
    out = write_packed(rows, args.data, args.seq_len, args.vocab_size, meta={"source": "builtin"})
    print(f"wrote {args.rows} rows of {args.seq_len} tokens to {out}")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def train_one(args, precision: str, out: Path) -> None:
    """One run of `precision`: the per-step records of the training loop, written to `out` every 25 steps
    (so that a run killed from outside still leaves its steps)."""
    import gc
    import tempfile

    import torch

    from data.cache import PackedTokens
    from data.loader import Loader
    from train.config import validate
    from train.loop import Trainer

    packed = PackedTokens(args.data)
    overrides = [*MODEL_OVERRIDES, f"precision={precision}", f"trainer.seq_len={packed.seq_len}",
                 f"trainer.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}",
                 f"trainer.seed={args.seed}", *args.override]
    cfg = validate(compose(overrides))

    def data(trainer):
        loader = Loader(packed, trainer.t.batch_size, seed=args.seed)
        return SimpleNamespace(train=loader, val=None, tokenizer=None)

    def record(steps, wall):
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        write_json(out, {"tag": args.tag, "precision": precision, "overrides": overrides, "steps": steps,
                         "requested_steps": args.steps, "max_memory_gib": mem, "wall_s": wall})

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir), data)
        steps, started = [], time.perf_counter()
        stop = min(args.steps, args.stop_after or args.steps)
        while trainer.step < stop and time.perf_counter() - started < args.time_limit:
            r = trainer.train_step()
            steps.append({k: r.get(k) for k in ("step", "loss", "step_time_s", "grad_norm", "tokens_per_s")})
            if r["step"] % 25 == 0 or r["step"] == 1:
                ms = r["step_time_s"] * 1e3
                print(f"{args.tag} {precision} step {r['step']} loss {r['loss']:.4f} {ms:.1f} ms", flush=True)
                record(steps, time.perf_counter() - started)
        record(steps, time.perf_counter() - started)
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train(args) -> None:
    """Each precision of the comma-separated `--precision` in turn, in this process; one JSON each."""
    for precision in args.precision.split(","):
        train_one(args, precision, Path(args.out.format(precision=precision)))


def summarise(run: dict, upto: int, last: int, warmup: int) -> dict:
    """Loss = mean of steps upto-last+1..upto (the same steps, so the same batches, in every run of a tag);
    step time = median after `warmup` steps (None when the run has no step after the warm-up)."""
    steps = run["steps"]
    times = [s["step_time_s"] for s in steps[warmup:]]
    return {"tag": run["tag"], "precision": run["precision"], "steps": len(steps), "compared_at_step": upto,
            "final_loss": statistics.fmean(s["loss"] for s in steps[max(0, upto - last):upto]),
            "median_step_ms": 1e3 * statistics.median(times) if times else None,
            "timed_steps": len(times), "max_memory_gib": run.get("max_memory_gib"),
            "run_environment": run.get("environment"), "overrides": run.get("overrides"),
            "loss_curve": [s["loss"] for s in steps], "step_ms": [1e3 * s["step_time_s"] for s in steps]}


def report(args) -> None:
    found = [Path(f) for f in args.runs if Path(f).is_file()]
    for f in sorted(set(args.runs) - {str(f) for f in found}):
        print(f"missing run file {f}: left out")
    runs = [json.loads(f.read_text()) for f in found]
    common = {}
    for r in runs:
        common[r["tag"]] = min(common.get(r["tag"], len(r["steps"])), len(r["steps"]))
    rows = [summarise(r, common[r["tag"]], args.last, args.warmup) for r in runs]
    base = {r["tag"]: r for r in rows if r["precision"] == "bf16"}
    for r in rows:
        b = base.get(r["tag"])
        if b is not None:
            r["loss_rel_to_bf16"] = r["final_loss"] / b["final_loss"] - 1.0
            if r["median_step_ms"] and b["median_step_ms"]:
                r["step_time_vs_bf16"] = r["median_step_ms"] / b["median_step_ms"]
    write_json(Path(args.out), {"last": args.last, "warmup": args.warmup, "runs": rows})
    print(table(rows, ["tag", "precision", "steps", "compared_at_step", "final_loss", "loss_rel_to_bf16",
                       "timed_steps", "median_step_ms", "step_time_vs_bf16", "max_memory_gib"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--data", required=True)
    pp.add_argument("--seq-len", type=int, default=1024)
    pp.add_argument("--rows", type=int, default=2600)
    pp.add_argument("--vocab-size", type=int, default=32768)
    pt = sub.add_parser("train")
    pt.add_argument("--data", required=True)
    pt.add_argument("--precision", required=True, help="one or more, comma-separated: run one after another")
    pt.add_argument("--steps", type=int, default=300)
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--stop-after", type=int, default=0, help="run only this many of the --steps (timing)")
    pt.add_argument("--time-limit", type=float, default=float("inf"))
    pt.add_argument("--tag", default="loss")
    pt.add_argument("--out", required=True, help="JSON path; {precision} is replaced by the precision")
    pt.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    pr = sub.add_parser("report")
    pr.add_argument("runs", nargs="+")
    pr.add_argument("--out", required=True)
    pr.add_argument("--last", type=int, default=10)
    pr.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    {"prepare": prepare, "train": train, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
