"""Where a moeforge training step spends its time (issue 8): `torch.profiler` over a few steps of
`train.loop.Trainer.train_step` (the implementation `bench/train_step.py` times), split by model part.

    python bench/profile_step.py --out bench/results/profile_step.json           # v4-small 2x4096, one GPU
    python bench/profile_step.py --device cpu --tiny --out /tmp/profile.json     # smoke test (CPU)

The forward of every attention, compressor, indexer, MoE (router, routed and shared experts), mHC, norm and
the whole model runs inside a `record_function` range named after the part (nested; backward is not split);
the output lists each part's forward device time per step, the kernel launches per step by phase and part
(a backward kernel counts for the part whose forward op made its autograd node; the CPU counts leaf aten
calls instead: where launch overhead goes), then the top operators by self device time, the
device-busy share of the wall time (the sum of kernel times over the wall time: low means launch or host
bound) and the number of host synchronisations (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, `.item()`).
JSON (`--out`) holds all of it; `--trace` also writes the Chrome trace.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench.common import table, write_json  # noqa: E402
from bench.train_step import OURS, Row, build_ours, make_batches, sync  # noqa: E402

RANGES = ("part:", "ProfilerStep", "Optimizer.")  # annotations: their device time spans, not kernels
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
PARTS = {  # module class name -> its range (ranges nest: attention's includes its compressor's, indexer's)
    "Transformer": "model", "Attention": "attention", "Compressor": "compressor", "Indexer": "indexer",
    "MoE": "moe", "Gate": "router", "Experts": "routed experts", "SharedExpert": "shared expert",
    "HyperConnection": "mhc", "HyperHead": "mhc head", "RMSNorm": "norm", "MTPBlock": "mtp",
}
METHODS = {"Indexer": ("queries", "keys", "score")}  # called through methods, not forward


def in_range(fn, part: str):
    def wrapped(*args, **kwargs):
        with record_function(f"part:{part}"):
            return fn(*args, **kwargs)
    return wrapped


def label_parts(model: torch.nn.Module) -> list:
    """Wrap the forward (or the `METHODS`) of every module of a `PARTS` class in a
    `record_function("part:<name>")` range; returns what `unlabel` undoes."""
    handles = []
    for module in model.modules():
        part = PARTS.get(type(module).__name__)
        if part is None:
            continue
        for name in METHODS.get(type(module).__name__, ()):
            setattr(module, name, in_range(getattr(module, name), part))
            handles.append((module, name))
        if type(module).__name__ in METHODS:
            continue
        stack: list = []

        def pre(_m, _inp, part=part, stack=stack):
            ctx = record_function(f"part:{part}")
            ctx.__enter__()
            stack.append(ctx)

        def post(_m, _inp, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def unlabel(handles: list) -> None:
    for h in handles:
        if isinstance(h, tuple):
            delattr(*h)  # the instance attribute that shadowed the method
        else:
            h.remove()


def device_time(evt) -> float:
    """Microseconds on the device (names changed across torch versions)."""
    for attr in ("device_time_total", "cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def self_device_time(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def is_device_event(evt) -> bool:
    """A kernel, copy or set (not the operator that launched it, whose self device time repeats it)."""
    return getattr(evt, "device_type", None) == DeviceType.CUDA


def _phase(evt, backward_part: dict) -> tuple[str, str]:
    """(phase, part) of an operator: optimizer, backward (the part of the forward op it differentiates),
    forward (its innermost part range) or other."""
    part, node = None, None
    while evt is not None:
        if evt.name.startswith("Optimizer.step"):
            return "optimizer", ""
        if node is None and evt.name.startswith("autograd::engine::evaluate_function"):
            node = evt
        if part is None and evt.name.startswith("part:"):
            part = evt.name[5:]
        evt = evt.cpu_parent
    if node is not None:
        return "backward", backward_part.get(node.id, "other")
    return ("forward", part) if part else ("other", "")


def launches_by_part(events, steps: int, cuda: bool) -> dict:
    """Kernel launches per step by phase and model part (on the CPU, leaf aten calls stand in for them): what
    launch overhead each part costs. A backward kernel counts for the part whose forward op made its node."""
    forward_part, backward_part = {}, {}  # (thread, sequence number) of a forward op -> its part
    for evt in events:
        if evt.sequence_nr >= 0 and not evt.fwd_thread:  # a forward op (backward ones name their fwd_thread)
            phase, part = _phase(evt, {})
            if phase == "forward":
                forward_part.setdefault((evt.thread, evt.sequence_nr), part)
    for evt in events:
        if evt.name.startswith("autograd::engine::evaluate_function") and evt.sequence_nr >= 0:
            backward_part[evt.id] = forward_part.get((evt.fwd_thread, evt.sequence_nr), "other")
    out = {"forward": defaultdict(float), "backward": defaultdict(float), "optimizer": 0.0, "other": 0.0}
    for evt in events:
        n = len(evt.kernels) if cuda else float(not evt.cpu_children and evt.name.startswith("aten::"))
        if not n:
            continue
        phase, part = _phase(evt, backward_part)
        if phase in ("forward", "backward"):
            out[phase][part] += n / steps
        else:
            out[phase] += n / steps
    out["forward"], out["backward"] = (dict(sorted(out[k].items(), key=lambda kv: -kv[1]))
                                       for k in ("forward", "backward"))
    parts = sum(out["forward"].values()) + sum(out["backward"].values())
    out["total"] = parts + out["optimizer"] + out["other"]
    return out


def summarise(prof, wall_s: float, steps: int, top: int) -> dict:
    """Parts, top operators, device-busy share and host syncs of `steps` profiled steps."""
    averages = prof.key_averages()
    parts, ops, syncs = defaultdict(float), [], defaultdict(int)
    for evt in averages:
        if evt.key.startswith("part:"):
            parts[evt.key[5:]] += device_time(evt) / 1e3 / steps
            parts[evt.key[5:] + " (cpu)"] += evt.cpu_time_total / 1e3 / steps
        elif evt.key in SYNC_EVENTS:
            syncs[evt.key] += evt.count
        elif evt.key == "aten::_local_scalar_dense":
            syncs["item() / bool(tensor)"] += evt.count
    kernels = 0.0
    for evt in averages:
        if evt.key.startswith(RANGES):
            continue
        ops.append({"op": evt.key[:80], "calls": evt.count // steps,
                    "self_device_ms": self_device_time(evt) / 1e3 / steps,
                    "self_cpu_ms": evt.self_cpu_time_total / 1e3 / steps})
        if is_device_event(evt):  # the kernels, copies and sets themselves, counted once
            kernels += self_device_time(evt) / 1e3 / steps
    ops.sort(key=lambda r: (-r["self_device_ms"], -r["self_cpu_ms"]))
    step_ms = 1e3 * wall_s / steps
    cuda = any(is_device_event(evt) for evt in averages)
    return {"step_ms": step_ms, "device_busy_ms": kernels, "device_busy_share": kernels / step_ms,
            "launches_per_step": launches_by_part(prof.events(), steps, cuda),
            "parts_forward_ms": dict(parts), "host_syncs_per_step": {k: v / steps for k, v in syncs.items()},
            "top_ops": ops[:top]}


def sync_sites(step) -> dict:
    """Run `step` once with CUDA's sync debug mode on; count each synchronising call by the innermost frame
    of this repository on its stack (`path:line`)."""
    counts: dict = defaultdict(int)
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return original(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(str(ROOT))
                  and not f.filename.endswith("profile_step.py")]
        site = f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno}" if frames else filename
        counts[site] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="v4-tiny, sequence length / 64 (CPU smoke test)")
    p.add_argument("--model", default="v4-small")
    p.add_argument("--shape", default="2x4096")
    p.add_argument("--impl", default="bf16", choices=sorted(OURS))
    p.add_argument("--attn-impl", default="auto", choices=["auto", "dense", "sparse", "triton"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", type=Path, default=None, help="also write the Chrome trace here")
    p.add_argument("--sync-sites", action="store_true",
                   help="CUDA: one more step under torch.cuda.set_sync_debug_mode, counting where each host "
                        "synchronisation is called from (the repository's innermost frame)")
    args = p.parse_args(argv)
    b, s = (int(x) for x in args.shape.split("x"))
    row = Row(args.model, args.shape, args.impl, b, s // 64 if args.tiny else s)
    args.models = args.model
    attn = args.attn_impl if args.attn_impl != "auto" else ("triton" if args.device.startswith("cuda")
                                                            else "sparse")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_ours(args, row, attn, Path(tmp))
        from bench.efficiency import load_model_yaml

        vocab = load_model_yaml("v4-tiny" if args.tiny else args.model).vocab_size
        built.loader.batches = make_batches(args.warmup + args.steps, row.batch, row.seq, vocab, args.seed)
        for _ in range(args.warmup):
            built.step()
        handles = label_parts(built.model)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with ExitStack() as stack:
            prof = stack.enter_context(profile(activities=activities))
            sync(device)
            started = time.perf_counter()
            for _ in range(args.steps):
                built.step()
            sync(device)
            wall = time.perf_counter() - started
        unlabel(handles)
        sites = sync_sites(built.step) if args.sync_sites and device.type == "cuda" else None
        if args.trace:
            prof.export_chrome_trace(str(args.trace))
    summary = summarise(prof, wall, args.steps, args.top)
    summary.update(row=row.record(), attn=attn, details=built.details)
    if sites is not None:
        summary["sync_sites"] = sites
        print("host synchronisations of one step, by call site:", sites)
    write_json(Path(args.out), summary)
    print(f"step {summary['step_ms']:.1f} ms, device busy {summary['device_busy_ms']:.1f} ms "
          f"({100 * summary['device_busy_share']:.0f}%), host syncs/step {summary['host_syncs_per_step']}")
    parts = {k: round(v, 2) for k, v in summary["parts_forward_ms"].items()}
    print("forward time per part (ms/step):", parts)
    launches = summary["launches_per_step"]
    print(f"launches per step {launches['total']:.0f} (kernels; leaf aten calls on CPU): "
          f"optimizer {launches['optimizer']:.0f}, other {launches['other']:.0f}")
    for phase in ("forward", "backward"):
        print(f"  {phase}:", {k: round(v) for k, v in launches[phase].items()})
    print(table(summary["top_ops"], ["op", "calls", "self_device_ms", "self_cpu_ms"]))


if __name__ == "__main__":
    main()
