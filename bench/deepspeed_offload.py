"""DeepSpeed ZeRO-3 with CPU offload on one GPU (issue 12, must-show 3); every run in its own process.

    python bench/deepspeed_offload.py --out bench/results/deepspeed_offload.json
    python bench/deepspeed_offload.py --device cpu --dry --out /tmp/deepspeed_offload.json  # logic, tiny, CPU

Part 1, capped: the GPU memory is capped (`torch.cuda.set_per_process_memory_fraction`) to `--cap-gb`;
the native engine (FSDP2 on one rank with moeforge's distributed Muon, as engine=fsdp runs) trains the
`--big` model and runs out of memory (recorded, not raised); ZeRO-3 with optimizer and parameter offload
to CPU (`parallel=zero3-offload`) trains the same model `--steps` steps. Part 2, uncapped: the `--small`
model under the native engine, ZeRO-3 and ZeRO-3 + offload. Each run trains on random tokens through
`ParallelModel.forward_backward` (bf16 autocast on CUDA), the global gradient norm, clipping, the
optimizer step and the routing-bias update; tokens/s is the median over steps after the first. Prints a
table and writes JSON. Models are `configs/model/<base>.yaml` with `layers` and `experts` changed (hash
layers stay first); the model is built on the host, and moved whole to the GPU only by the native engine
(ZeRO-3 partitions it on its way there: train/parallel/deepspeed/placement.py).

Each run is a child process (`--run PART:SIZE:ENGINE --record FILE`, world size 1, its own env://
rendezvous: NCCL on CUDA, gloo on CPU), so no run inherits another's GPU memory, allocator cache or
DeepSpeed state; a child that dies (killed for host memory, a crash) is recorded as an error with its exit
status, and the next run still starts.
"""

import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.common import table, write_json  # noqa: E402

SIZES = {"big": ("v4-small", 16, 96), "small": ("v4-small", 8, 32)}
DRY_SIZES = {"big": ("v4-tiny", 5, 16), "small": ("v4-tiny", 5, 8)}
ENGINES = {"native": None, "zero3": ("none", "none"), "zero3+offload": ("cpu", "cpu")}
RUNS = [("capped", "big", "native"), ("capped", "big", "zero3+offload"), ("uncapped", "small", "native"),
        ("uncapped", "small", "zero3"), ("uncapped", "small", "zero3+offload")]
FORWARDED = ("device", "cap_gb", "steps", "batch", "seq_len", "lr", "time_limit")  # options a child gets
BUILD_ALLOWANCE_S = 900.0  # a child's wall-clock limit beyond --time-limit (imports, build, first step)
COLUMNS = ["part", "model", "params_b", "engine", "status", "steps", "final_loss", "tokens_per_s", "step_s",
           "build_peak_gpu_gb", "peak_gpu_gb", "host_rss_gb"]


def model_config(base: str, layers: int, experts: int):
    """`configs/model/<base>.yaml` with `layers` layers (its hash layers first, then its attention pattern
    after them repeated) and `experts` routed experts."""
    from model import ModelConfig

    d = yaml.safe_load((ROOT / "configs" / "model" / f"{base}.yaml").read_text())
    n_hash = d["mlp_layer_types"].count("hash_moe")
    pattern = d["layer_types"][n_hash:]
    attention = [pattern[i % len(pattern)] for i in range(layers - n_hash)]
    d["layer_types"] = d["layer_types"][:n_hash] + attention
    d["mlp_layer_types"] = ["hash_moe"] * n_hash + ["moe"] * (layers - n_hash)
    d.update(num_hidden_layers=layers, n_routed_experts=experts)
    return ModelConfig.from_dict(d)


def start_process_group(device: torch.device) -> None:
    """World size 1 from env:// variables set here (a free port on the loopback)."""
    from train.parallel.env import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed(device.type)


def random_batch(cfg, rows: int, seq: int, step: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(2, cfg.vocab_size, (rows, seq + 1), generator=g)
    doc_ids = torch.zeros(rows, seq, dtype=torch.long, device=device)  # one document per row
    return {"input_ids": ids[:, :-1].to(device), "doc_ids": doc_ids, "labels": ids[:, 1:].to(device)}


def build(engine: str, cfg, args, device: torch.device):
    """(ParallelModel, optimizer) of `engine` for the model `cfg` on one rank."""
    from model import Transformer
    from optim import OptimConfig
    from optim.distributed import build_distributed_optimizer
    from train.parallel.deepspeed.engine import DeepSpeedStep, build_deepspeed
    from train.parallel.deepspeed.options import ZeroOptions
    from train.parallel.deepspeed.verify import muon_check
    from train.parallel.layout import resolve_layout
    from train.parallel.mesh import build_mesh
    from train.parallel.parallelize import parallelize

    optim_cfg = OptimConfig(lr=args.lr, warmup_steps=0)
    torch.manual_seed(0)
    model = Transformer(cfg)  # on the host (its init draws from CPU generators); the engine places it
    pmesh = build_mesh(resolve_layout({"dp": 1}, 1, cfg, args.batch), device.type)
    if ENGINES[engine] is None:
        pm = parallelize(model.to(device), pmesh, bias_update_speed=optim_cfg.bias_update_speed)
        return pm, build_distributed_optimizer(pm.modules, optim_cfg)
    offload_optimizer, offload_param = ENGINES[engine]
    opts = ZeroOptions(3, offload_optimizer, offload_param)
    pm = build_deepspeed(model, pmesh, optim_cfg, opts, args.batch, optim_cfg.bias_update_speed)
    return pm, DeepSpeedStep(pm, functools.partial(muon_check, pm))


def n_params(cfg) -> int:
    from model import Transformer

    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def host_rss_gb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**30


def train(part: str, size: str, engine: str, args, device: torch.device) -> dict:
    """One run; running out of memory is a result ("oom"), another failure is recorded as "error"."""
    from train.precision import autocast

    base, layers, experts = (DRY_SIZES if args.dry else SIZES)[size]
    cfg = model_config(base, layers, experts)
    rec = {"part": part, "model": f"{base} L{layers} E{experts}", "engine": engine, "steps": 0,
           "params_b": n_params(cfg) / 1e9}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        rec["baseline_gpu_gb"] = torch.cuda.memory_allocated() / 2**30
    ctx = functools.partial(autocast, "bf16" if cuda else "fp32", device)
    times, losses, started = [], [], time.perf_counter()
    try:
        pm, opt = build(engine, cfg, args, device)
        rec["build_s"] = time.perf_counter() - started
        if cuda:  # ZeRO-3: about the largest parameter (+ partitions without offload), not the model
            rec["build_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        for step in range(args.steps):
            t0 = time.perf_counter()
            res = pm.forward_backward([random_batch(cfg, args.batch, args.seq_len, step, device)], 0.3, ctx)
            pm.clip_grad_norm_(1.0)
            opt.step()
            pm.update_biases(res["expert_loads"])
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(res["parts"]["loss"])
            rec["steps"] = step + 1
            if time.perf_counter() - started > args.time_limit:
                break
        rec["status"] = "ok"
    except torch.OutOfMemoryError as e:
        rec["status"], rec["error"] = "oom", str(e).splitlines()[0][:300]
    except Exception as e:  # recorded, so the other runs still happen (the GPU time is not lost)
        traceback.print_exc()
        rec["status"], rec["error"] = "error", f"{type(e).__name__}: {e}"[:500]
    timed = times[1:] or times
    if timed:
        rec["step_s"] = statistics.median(timed)
        rec["tokens_per_s"] = args.batch * args.seq_len / rec["step_s"]
    rec.update(losses=losses, final_loss=losses[-1] if losses else None, wall_s=time.perf_counter() - started,
               host_rss_gb=host_rss_gb())
    if cuda:
        rec["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(table([rec], COLUMNS), flush=True)
    return rec


def one_run(spec: str, record: Path, args) -> None:
    """The child: one run (`PART:SIZE:ENGINE`) in this process, its record written to `record`."""
    part, size, engine = spec.split(":")
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")
    start_process_group(device)
    extra = {}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        extra = {"gpu_total_gb": total}
        if part == "capped":
            extra["cap_gb"] = args.cap_gb
            fraction = min(1.0, args.cap_gb / total)
            torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
    rec = {**train(part, size, engine, args, device), **extra}
    record.write_text(json.dumps(rec))
    from train.parallel.deepspeed.runtime import teardown

    teardown()


def child_argv(args, spec: str, record: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--run", spec,
            "--record", str(record)]
    for name in FORWARDED:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + (["--dry"] if args.dry else [])


def spawn(args, spec: str) -> dict:
    """Run `spec` in a child process; its record, or an error record when it left none."""
    part, size, engine = spec.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.json"
        try:
            proc = subprocess.run(child_argv(args, spec, record), cwd=ROOT,
                                  timeout=args.time_limit + BUILD_ALLOWANCE_S)
            status = f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed after {args.time_limit + BUILD_ALLOWANCE_S:.0f} s"
        if record.is_file():
            return json.loads(record.read_text())
    return {"part": part, "model": "-", "engine": engine, "steps": 0, "status": "error",
            "error": f"the run's process left no record ({status})"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry", action="store_true", help="tiny models (the logic check on CPU)")
    p.add_argument("--cap-gb", type=float, default=20.0, help="GPU memory cap of part 1")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per run before it stops stepping")
    p.add_argument("--parts", default="capped,uncapped", help="which parts to run (comma-separated)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # PART:SIZE:ENGINE, in a child process
    p.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dry:
        args.seq_len, args.batch, args.steps = min(args.seq_len, 64), min(args.batch, 2), min(args.steps, 3)
    if args.run:
        one_run(args.run, args.record, args)
        return
    result = {"args": {k: str(v) for k, v in vars(args).items() if k not in ("run", "record")}, "runs": []}
    parts = set(args.parts.split(","))
    if not parts <= {"capped", "uncapped"}:
        raise SystemExit(f"--parts: choose from capped, uncapped; got {args.parts!r}")
    for spec in (":".join(r) for r in RUNS if r[0] in parts):
        rec = spawn(args, spec)
        result["runs"].append(rec)
        result.update({k: rec[k] for k in ("gpu_total_gb", "cap_gb") if k in rec})
        write_json(args.out, result)
    cap = result.get("cap_gb", "none")
    print(f"\nGPU memory cap of part 1: {cap} GB of {result.get('gpu_total_gb', '-')}")
    print(table(result["runs"], COLUMNS))


if __name__ == "__main__":
    main()
