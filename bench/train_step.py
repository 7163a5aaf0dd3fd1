"""End-to-end training step on one GPU (issue 8): transformers' `DeepseekV4ForCausalLM` (the peer) against
moeforge's own training step in BF16 and FP8, on the same batches, in one process.

    python bench/train_step.py --out bench/results/train_step.json --budget-s 480     # one H200
    python bench/train_step.py --device cpu --tiny --out /tmp/train_step.json          # smoke test (CPU)

Implementations (`--impls`):
  peer      `transformers.DeepseekV4ForCausalLM.from_pretrained` of the directory our exporter writes
            (`model/hf.py:save_hf`: config and moeforge's initial weights for the seed), BF16 parameters,
            transformers' default expert and attention implementations (recorded per row),
            `torch.optim.AdamW(fused=True)`; plain loop: forward with labels, backward, step, zero_grad,
            loss.item().
  bf16      `train.loop.Trainer.train_step`: Muon + AdamW, fp32 master weights, bf16 autocast, gradient
            clipping, routing-bias update, sparse CSA with the indexer loss; MTP off (the peer has none).
  fp8       the same with precision=fp8 (train/fp8.py: block-scaled FP8 GEMMs).
  bf16-mtp  bf16 with the config's MTP layer(s) on.
  bf16-ac   bf16 with activation checkpointing of every block (for the long contexts).
  bf16-compile, fp8-compile   with trainer.compile=mhc (train/compile.py: fused mHC and norms).
  bf16-compile-adamw   bf16-compile with every parameter on AdamW (fused), the peer's optimizer: the
            framework's step without Muon's Newton-Schulz (about 17 TFLOP per v4-small step at 2 x 4096).
  bf16-blocks, fp8-blocks, bf16-blocks-adamw   the same with trainer.compile=blocks (mhc plus the
            element-wise glue of attention, compressors, indexer queries, router and shared expert).
moeforge rows use `model.attn_impl=triton` on CUDA (`--attn-impl`; the row records what ran).

Rows run in the priority order of `PLAN` (`--models`, `--rows SHAPE[:IMPL],...`, `--impls` filter it); a row
starts only if the time spent plus the longest row so far of that model (of any, for a model's first row)
fits in `--budget-s` (else it is recorded as "skipped (budget)"). Consecutive rows of one model and
implementation reuse its built model and optimizer (one model on the device at a time). Each row: `--warmup`
steps, then up to `--steps` timed steps (stopping after `--row-limit-s`, at least two), each between
`torch.cuda.synchronize()` and `time.perf_counter()`; the median counts. A moeforge row whose Triton
attention fails (other than out of memory) is recorded (`triton_error`) and run with `sparse` instead.
tokens/s = B x S / median step time. MFU = FLOPs / median / dense BF16 peak (989 TFLOP/s on H100/H200) for
every row, FP8 rows also against the FP8 peak (`mfu_fp8_peak`). FLOPs: see `FLOPS_NOTE`. Peak memory =
`torch.cuda.max_memory_allocated()` from the row's start (weights, optimizer state, activations). A row that
runs out of memory records "OOM" (its gradients are dropped); memory is freed between rows. Batches: uniform
random tokens from `--seed`, one document per row, labels = next token; every implementation of a shape sees
the same batches.
The JSON (`--out`) is rewritten after every row; the table is printed last. Nothing is downloaded.
PYTORCH_CUDA_ALLOC_CONF defaults to expandable_segments:True (for every implementation; recorded).
`--tiny`: `v4-tiny` stands in for every model and sequence lengths are divided by 64 (CPU smoke test).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before CUDA starts: fewer fragmentation OOMs at long contexts, for every implementation alike (recorded).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from bench.common import table, write_json  # noqa: E402

OURS = {  # moeforge implementations: precision, MTP on, activation checkpointing
    "bf16": dict(precision="bf16", mtp=False, ac=False),
    "fp8": dict(precision="fp8", mtp=False, ac=False),
    "bf16-mtp": dict(precision="bf16", mtp=True, ac=False),
    "bf16-ac": dict(precision="bf16", mtp=False, ac=True),
    "bf16-compile": dict(precision="bf16", mtp=False, ac=False, compile="mhc"),
    "fp8-compile": dict(precision="fp8", mtp=False, ac=False, compile="mhc"),
    "bf16-compile-adamw": dict(precision="bf16", mtp=False, ac=False, compile="mhc", optim="adamw"),
    "bf16-blocks": dict(precision="bf16", mtp=False, ac=False, compile="blocks"),
    "fp8-blocks": dict(precision="fp8", mtp=False, ac=False, compile="blocks"),
    "bf16-blocks-adamw": dict(precision="bf16", mtp=False, ac=False, compile="blocks", optim="adamw"),
}
IMPLS = ("peer", *OURS)
PLAN = [  # (model, B x S, implementation) in priority order. Consecutive rows of one implementation share
    # its model (built once): after 2x4096 for all of them, the rows go implementation by implementation
    ("v4-small", "2x4096", "peer"), ("v4-small", "2x4096", "fp8"), ("v4-small", "2x4096", "bf16-mtp"),
    ("v4-small", "2x4096", "bf16"), ("v4-small", "2x4096", "bf16-compile"),
    ("v4-small", "2x4096", "fp8-compile"), ("v4-small", "2x4096", "bf16-compile-adamw"),
    ("v4-small", "2x4096", "bf16-blocks"), ("v4-small", "2x4096", "bf16-blocks-adamw"),
    ("v4-small", "2x4096", "fp8-blocks"),
    ("v4-small", "1x65536", "bf16"), ("v4-small", "4x2048", "bf16"),
    ("v4-small", "1x8192", "bf16"), ("v4-small", "1x32768", "bf16"),
    ("v4-small", "1x65536", "bf16-ac"), ("v4-small", "1x32768", "bf16-ac"),
    ("v4-small", "4x2048", "peer"), ("v4-small", "1x8192", "peer"), ("v4-small", "1x32768", "peer"),
    ("v4-small", "1x65536", "peer"),
    ("v4-small", "4x2048", "fp8"), ("v4-small", "1x8192", "fp8"), ("v4-small", "1x65536", "fp8"),
    ("v4-small", "1x32768", "fp8"),
    ("v4-medium", "2x4096", "peer"), ("v4-medium", "1x8192", "peer"), ("v4-medium", "2x4096", "bf16"),
    ("v4-medium", "1x8192", "bf16"), ("v4-medium", "2x4096", "fp8"), ("v4-medium", "1x8192", "fp8"),
]
TINY_MODEL, TINY_SEQ_DIV = "v4-tiny", 64
FLOPS_NOTE = (
    "train.flops.FlopModel.step_flops of the row's config with sparse attention (the same count for every "
    "implementation of a model and shape): matmul FLOPs x 3 (forward + backward) of the attention "
    "projections, compressors, indexer (projections and the scores over every causal candidate), the core "
    "attention over the keys each query really attends (window <= sliding_window, top-k CSA entries, every "
    "causal HCA entry), mHC mixes, router, the top-k + shared experts, hc_head, LM head, and the MTP layer "
    "when on; norms, softmaxes, Sinkhorn, the indexer loss and activation recomputation are not counted")
COLUMNS = ["model", "shape", "impl", "status", "attn", "experts", "tokens_per_s", "vs_peer", "vs_bf16", "mfu",
           "tflops_per_s", "peak_mem_gib", "step_ms", "timed_steps", "loss_first", "loss_last"]


@dataclass
class Row:
    model: str
    shape: str
    impl: str
    batch: int
    seq: int

    def record(self) -> dict:
        return {k: getattr(self, k) for k in ("model", "shape", "impl", "batch", "seq")}


def plan_rows(args) -> list[Row]:
    """The rows of `PLAN` that pass the filters, with their real batch and sequence length."""
    models, impls = set(args.models.split(",")), set(args.impls.split(","))
    wanted = [w.split(":") for w in args.rows.split(",")] if args.rows else None
    for name in impls - set(IMPLS):
        raise SystemExit(f"--impls: unknown implementation {name!r}; choose from {IMPLS}")
    rows = []
    for model, shape, impl in PLAN:
        b, s = (int(x) for x in shape.split("x"))
        keep = wanted is None or any(w[0] == shape and (len(w) == 1 or w[1] == impl) for w in wanted)
        if model in models and impl in impls and keep:
            rows.append(Row(model, shape, impl, b, s // TINY_SEQ_DIV if args.tiny else s))
    return rows


# ---------------------------------------------------------------------------------------------- batches
class FixedBatches:
    """The loader interface the Trainer reads (`next_batch`, `state_dict`), cycling through fixed batches."""

    def __init__(self, batches: list[dict] | None = None):
        self.batches, self.i = batches or [], 0

    def next_batch(self) -> dict:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int) -> list[dict]:
    """`n` batches of uniform random tokens (one document per row; labels = next token, -100 at the end)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
        out.append({"input_ids": ids, "doc_ids": torch.zeros_like(ids), "labels": labels})
    return out


# ---------------------------------------------------------------------------------------------- the two sides
@dataclass
class Built:
    """One implementation, built: `step()` trains on the next batch of `loader`, returns the loss."""

    loader: FixedBatches
    step: Callable[[], float]
    reset: Callable[[], None]  # drop the gradients of a step that failed (out of memory)
    details: dict
    cfg: object  # the ModelConfig the FLOP model counts
    build_s: float = 0.0
    model: object = None  # the nn.Module trained (bench/profile_step.py labels its parts)


def model_name(args, row: Row) -> str:
    return TINY_MODEL if args.tiny else row.model


def build_ours(args, row: Row, attn: str, run_dir: Path) -> Built:
    """A Trainer for `row` (the repository's real training step)."""
    from bench.fp8_train import compose
    from train.config import validate
    from train.loop import Trainer

    impl = OURS[row.impl]
    overrides = [f"model={model_name(args, row)}", f"precision={impl['precision']}",
                 f"trainer.device={args.device}", f"trainer.seq_len={row.seq}",
                 f"trainer.batch_size={row.batch}", f"trainer.seed={args.seed}", "trainer.max_steps=1000000",
                 "trainer.sparse_from_step=0", "trainer.spike.enabled=false",
                 f"trainer.activation_checkpointing={impl['ac']}", f"model.attn_impl={attn}",
                 f"trainer.compile={impl.get('compile', 'none')}",
                 "logger.progress=false", "logger.wandb.mode=disabled", "trainer.eval_every=0",
                 "checkpoint.every=0"]
    if not impl["mtp"]:
        overrides.append("model.num_nextn_predict_layers=0")
    if "optim" in impl:
        overrides.append(f"optim={impl['optim']}")
    loader = FixedBatches()
    trainer = Trainer(validate(compose(overrides)), run_dir,
                      lambda _: SimpleNamespace(train=loader, val=None, tokenizer=None))

    def step() -> float:
        return trainer.train_step()["loss"]

    def reset() -> None:
        trainer.optimizer.zero_grad(set_to_none=True)

    details = {"attn": trainer.model_cfg.attn_impl, "experts": experts_path(trainer.model, trainer.device),
               "precision": trainer.precision, "mtp_layers": trainer.model_cfg.num_nextn_predict_layers,
               "activation_checkpointing": impl["ac"], "overrides": overrides}
    return Built(loader, step, reset, details, trainer.model_cfg, model=trainer.model)


def experts_path(model, device: torch.device) -> str:
    """Which routed-expert path a bf16 row takes (`Experts.grouped_usable`, the model's own choice)."""
    from model.moe import Experts

    experts = next(m for m in model.modules() if isinstance(m, Experts))
    if type(experts).__name__ != "Experts":
        return type(experts).__name__
    probe = torch.zeros(1, experts.w1.shape[-1], device=device, dtype=torch.bfloat16)
    return "grouped_mm" if experts.grouped_usable(probe) else "loop"


def build_peer(args, row: Row, device: torch.device, run_dir: Path) -> Built:
    """transformers' model, BF16, fused AdamW. Its weights are moeforge's initial weights for the seed
    (transformers' own init leaves the hash tables at zero, which sends every token of a hash layer to
    expert 0), written by `model/hf.py:save_hf` and read by `from_pretrained`."""
    import transformers

    from bench.efficiency import load_model_yaml
    from model import Transformer
    from model.hf import save_hf
    from train import rng

    transformers.utils.logging.disable_progress_bar()
    cfg = load_model_yaml(model_name(args, row))
    cfg.num_nextn_predict_layers = 0  # transformers' model has no MTP layers (and FLOPs without them)
    rng.seed_all(args.seed)  # as the Trainer does before building its model: the same initial weights
    save_hf(Transformer(cfg).cast_(torch.bfloat16), run_dir / "hf")
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(run_dir / "hf", dtype=torch.bfloat16)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    loader = FixedBatches()

    def step() -> float:
        ids = loader.next_batch()["input_ids"].to(device, non_blocking=True)
        # bf16 autocast as a user's loop would have: transformers keeps some V4 parameters in fp32
        # (seen on CUDA: an fp32 activation reaching a bf16 matmul without it)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def reset() -> None:
        opt.zero_grad(set_to_none=True)

    details = {"attn": f"hf-{model.config._attn_implementation}",
               "experts": f"hf-{model.config._experts_implementation}",
               "precision": "bf16 weights, bf16 autocast",
               "mtp_layers": 0, "transformers": transformers.__version__}
    return Built(loader, step, reset, details, cfg)


def attn_impl(args) -> str:
    if args.attn_impl != "auto":
        return args.attn_impl
    return "triton" if args.device.startswith("cuda") else "sparse"


class Live:
    """The implementation built last, kept for the next row of the same model and implementation (the
    Trainer and the peer's step take batches of any shape): one model on the device at a time. A moeforge
    implementation whose Triton attention fails (not out of memory) falls back to `sparse` from then on."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.key, self.built, self.tmp = None, None, None
        self.fallback: dict[str, str] = {}  # impl -> attention after a Triton failure

    def attn(self, row: Row) -> str | None:
        return None if row.impl == "peer" else self.fallback.get(row.impl, attn_impl(self.args))

    def get(self, row: Row) -> tuple[Built, bool]:
        """(built implementation for `row`, whether it was reused)."""
        key = (row.model, row.impl, self.attn(row))
        if key == self.key:
            return self.built, True
        self.drop()
        started = time.perf_counter()
        self.tmp = tempfile.TemporaryDirectory()
        run_dir = Path(self.tmp.name)
        if row.impl == "peer":
            self.built = build_peer(self.args, row, self.device, run_dir)
        else:
            self.built = build_ours(self.args, row, key[2], run_dir)
        self.built.build_s, self.key = time.perf_counter() - started, key
        return self.built, False

    def drop(self) -> None:
        self.key = self.built = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None
        free_memory(self.device)


# ---------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage, return cached blocks, and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step, device: torch.device, warmup: int, steps: int, limit_s: float) -> dict:
    """Run `warmup` + up to `steps` steps (timed ones stop after `limit_s`, once two are done)."""
    losses, warm_s, times = [], [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(float(step()))
        sync(device)
        (warm_s if i < warmup else times).append(time.perf_counter() - t0)
        if len(times) >= 2 and sum(times) > limit_s:
            break
    return {"step_s": times, "warmup_s": warm_s, "losses": losses}


def run_row(args, row: Row, device: torch.device, live: Live) -> dict:
    """Build (or reuse), warm up and time one row; the record's measured fields."""
    from bench.efficiency import load_model_yaml
    from train.flops import FlopModel, peak_flops

    vocab = load_model_yaml(model_name(args, row)).vocab_size
    batches = make_batches(args.warmup + args.steps, row.batch, row.seq, vocab, args.seed + 7919 * row.seq)
    built, reused = live.get(row)
    built.loader.batches, built.loader.i = batches, 0
    timing = time_steps(built.step, device, args.warmup, args.steps, args.row_limit_s)
    median = statistics.median(timing["step_s"])
    tokens = row.batch * row.seq
    flops = FlopModel(built.cfg).step_flops([row.seq] * row.batch, sparse=True)
    rec = {**built.details, **timing, "reused_model": reused, "build_s": 0.0 if reused else built.build_s,
           "tokens": tokens, "step_ms": 1e3 * median, "tokens_per_s": tokens / median,
           "timed_steps": len(timing["step_s"]), "flops_per_step": flops,
           "tflops_per_s": flops / median / 1e12, "loss_first": timing["losses"][0],
           "loss_last": timing["losses"][-1]}
    bf16_peak = peak_flops(device, "bf16", args.peak_tflops)
    rec["mfu"] = flops / median / bf16_peak if bf16_peak else None
    if built.details["precision"].startswith("fp8"):
        fp8_peak = peak_flops(device, "fp8", args.peak_tflops)
        rec["mfu_fp8_peak"] = flops / median / fp8_peak if fp8_peak else None
    return rec


def is_oom(e: BaseException) -> bool:
    """CUDA's out-of-memory error, or an allocator failure of another device (CPU: "can't allocate")."""
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def measure(args, row: Row, device: torch.device, live: Live) -> dict:
    """One row's record: measured, or status "OOM" / "error: ..."; a Triton attention failure is recorded
    and the row retried with sparse attention."""
    rec, started = row.record(), time.perf_counter()
    if args.tiny:
        rec["model_run"] = TINY_MODEL
    for _ in range(2):
        attn = live.attn(row)
        free_memory(device)
        try:
            rec.update(run_row(args, row, device, live), status="ok")
        except Exception as e:  # a failing row must not lose the others
            rec["status"] = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {first_line(e)}"
            if live.built is not None and is_oom(e):
                live.built.reset()
            else:
                traceback.print_exc()
                live.drop()
            if rec["status"] != "OOM" and attn == "triton":
                rec["triton_error"] = rec["status"]
                live.fallback[row.impl] = "sparse"
                continue
        break
    if device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    rec["row_s"] = time.perf_counter() - started
    return rec


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def add_ratios(records: list[dict]) -> None:
    """vs_peer: tokens/s over the peer's of the same model and shape; vs_bf16: over moeforge bf16's."""
    base = {(r["model"], r["shape"], r["impl"]): r["tokens_per_s"] for r in records if r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        for col, impl in (("vs_peer", "peer"), ("vs_bf16", "bf16")):
            ref = base.get((r["model"], r["shape"], impl))
            mine = r["impl"] != impl and (impl == "peer" or r["impl"] != "peer")
            r[col] = r["tokens_per_s"] / ref if ref and mine else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file (rewritten after every row)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="v4-tiny, sequence lengths / 64: CPU smoke test")
    p.add_argument("--models", default="v4-small,v4-medium")
    p.add_argument("--rows", default="", help="SHAPE or SHAPE:IMPL, comma-separated (2x4096,1x65536:bf16-ac)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--attn-impl", default="auto", choices=["auto", "dense", "sparse", "triton"],
                   help="moeforge rows; auto = triton on CUDA, sparse elsewhere")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps at most (default 6, tiny 2)")
    p.add_argument("--row-limit-s", type=float, default=40.0, help="stop a row's timed steps after this")
    p.add_argument("--budget-s", type=float, default=None, help="start no row that would end past this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU where the device is unknown")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 6)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu" and attn_impl(args) == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported
    device, budget = torch.device(args.device), args.budget_s or float("inf")
    rows, records, longest, live = plan_rows(args), [], {}, Live(args, device)
    started = time.perf_counter()

    def save(**extra) -> None:
        add_ratios(records)
        out = {"args": vars(args), "argv": sys.argv, "flops": FLOPS_NOTE, "rows": records,
               "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), **extra}
        write_json(Path(args.out), out)

    for row in rows:
        spent = time.perf_counter() - started
        if spent + longest.get(row.model, max(longest.values(), default=0.0)) > budget:
            records.append({**row.record(), "status": "skipped (budget)"})
            continue
        print(f"[{spent:6.0f}s] {row.model} {row.shape} {row.impl} ...", flush=True)
        rec = measure(args, row, device, live)
        longest[row.model] = max(longest.get(row.model, 0.0), rec["row_s"])
        records.append(rec)
        print(f"    {rec['status']} {rec.get('tokens_per_s', 0):.0f} tok/s, {rec['row_s']:.0f} s", flush=True)
        save()
    live.drop()
    save(wall_s=time.perf_counter() - started)
    print(table(records, COLUMNS))


if __name__ == "__main__":
    main()
