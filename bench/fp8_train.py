"""FP8 training comparison (issue 9, item 3): one model trained from the same seed and the same batches in
bf16, fp8 and fp8_rowwise through the real training loop (`train.loop.Trainer.train_step`).

    python bench/fp8_train.py prepare --data runs/fp8_data [--seq-len 1024 --rows 2600]   # once, any CPU
    python bench/fp8_train.py train --data runs/fp8_data --precision fp8 --steps 300 --out fp8.json
    python bench/fp8_train.py report bf16.json fp8.json ... --out bench/results/fp8_train.json

`prepare` trains the built-in corpus's tokenizer and writes the first `--rows` packed rows (so that the GPU
machine, which has another Python and so another built-in corpus, trains on the same tokens). `train`
runs `--steps` optimizer steps (or the first `--stop-after` of them; stopping early at `--time-limit` seconds) and writes every step's loss and
time; `--tag` names the run (e.g. "loss" or "timing"). `report` compares each FP8 run with the BF16 run of
the same tag: final loss (mean of the last `--last` steps) relative to BF16, and the median step time
after `--warmup` steps. The table is printed last.
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


def train(args) -> None:
    import tempfile

    import torch

    from data.cache import PackedTokens
    from data.loader import Loader
    from train.config import validate
    from train.loop import Trainer

    packed = PackedTokens(args.data)
    overrides = [*MODEL_OVERRIDES, f"precision={args.precision}", f"trainer.seq_len={packed.seq_len}",
                 f"trainer.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}",
                 f"trainer.seed={args.seed}", *args.override]
    cfg = validate(compose(overrides))

    def data(trainer):
        return SimpleNamespace(train=Loader(packed, trainer.t.batch_size, seed=args.seed), val=None, tokenizer=None)

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir), data)
        steps, started = [], time.perf_counter()
        stop = min(args.steps, args.stop_after or args.steps)
        while trainer.step < stop and time.perf_counter() - started < args.time_limit:
            r = trainer.train_step()
            steps.append({k: r.get(k) for k in ("step", "loss", "step_time_s", "grad_norm", "tokens_per_s")})
            if r["step"] % 25 == 0 or r["step"] == 1:
                print(f"{args.precision} step {r['step']} loss {r['loss']:.4f} {r['step_time_s'] * 1e3:.1f} ms",
                      flush=True)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    write_json(Path(args.out), {"tag": args.tag, "precision": args.precision, "overrides": overrides,
                                "requested_steps": args.steps, "steps": steps, "max_memory_gib": mem,
                                "wall_s": time.perf_counter() - started})


def summarise(run: dict, last: int, warmup: int) -> dict:
    steps = run["steps"]
    times = [s["step_time_s"] for s in steps[warmup:]] or [s["step_time_s"] for s in steps]
    return {"tag": run["tag"], "precision": run["precision"], "steps": len(steps),
            "final_loss": statistics.fmean(s["loss"] for s in steps[-last:]), "last_loss": steps[-1]["loss"],
            "median_step_ms": 1e3 * statistics.median(times), "max_memory_gib": run.get("max_memory_gib")}


def report(args) -> None:
    rows = [summarise(json.loads(Path(f).read_text()), args.last, args.warmup) for f in args.runs]
    base = {r["tag"]: r for r in rows if r["precision"] == "bf16"}
    for r in rows:
        b = base.get(r["tag"])
        if b is not None:
            r["loss_rel_to_bf16"] = r["final_loss"] / b["final_loss"] - 1.0
            r["step_time_vs_bf16"] = r["median_step_ms"] / b["median_step_ms"]
    write_json(Path(args.out), {"last": args.last, "warmup": args.warmup, "runs": rows})
    print(table(rows, ["tag", "precision", "steps", "final_loss", "last_loss", "loss_rel_to_bf16",
                       "median_step_ms", "step_time_vs_bf16", "max_memory_gib"]))


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
    pt.add_argument("--precision", required=True)
    pt.add_argument("--steps", type=int, default=300)
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--stop-after", type=int, default=0, help="run only this many of the --steps (timing)")
    pt.add_argument("--time-limit", type=float, default=float("inf"))
    pt.add_argument("--tag", default="loss")
    pt.add_argument("--out", required=True)
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
