"""torchrun worker for tests/parallel/test_deepspeed.py: DeepSpeed ZeRO runs next to the native engine.

    torchrun --nproc-per-node 2 tests/parallel/deepspeed_worker.py OUT.json CKPT_ROOT SPEC [SPEC ...]

SPEC is `<engine>:<layout>[@save=<name>|@resume=<name>]`: engine `fsdp` (the native FSDP2 engine) or
`zero1` / `zero2` / `zero3`, optionally `+offload` (optimizer states and, for ZeRO-3, parameters in host
memory); layout as in worker.py (`dp2`, `ep2`). `@save=<name>` writes CKPT_ROOT/<name> after step
SAVE_AT, `@resume=<name>` loads it and runs the remaining steps. `fallback:<zero>:<layout>` replaces the
Muon step by AdamW and records whether the first-step Muon check stopped the run; `skip:<zero>:<layout>`
starts with a step the spike guard skips. Rank 0 computes the
one-process reference; OUT.json holds per spec the steps (loss, grad norm, eval) and facts of the run.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import worker as W
from deepspeed_audit import Audit, build_bound, host_state

from model.errors import MoeforgeError
from train.parallel.deepspeed import checkpoint as ds_checkpoint
from train.parallel.deepspeed.engine import DeepSpeedStep, build_deepspeed
from train.parallel.deepspeed.optimizer import adamw_step
from train.parallel.deepspeed.options import ZeroOptions
from train.parallel.deepspeed.verify import muon_check
from train.parallel.env import init_distributed


def build(engine: str, layout: str, audit: Audit | None = None):
    """(DeepSpeedModel, its optimizer facade, action) for `zero3+offload` and a layout spec; `audit` (on)
    accounts the build's device memory, then watches the engine's host-resident state."""
    stage, _, offload = engine.removeprefix("zero").partition("+")
    pmesh, action = W.layout_mesh(layout)
    param_offload = "cpu" if offload and stage == "3" else "none"
    opts = ZeroOptions(int(stage), "cpu" if offload else "none", param_offload)
    model = W.new_model()
    if audit is not None:
        audit.build_model, audit.param_offload = model, param_offload == "cpu"
    pm = build_deepspeed(model, pmesh, W.OPTIM, opts, W.ROWS // pmesh.layout.dp, W.OPTIM.bias_update_speed)
    if audit is not None:
        audit.build_model = None
        audit.host_state = host_state(pm, param_offload == "cpu") if offload else None
    return pm, DeepSpeedStep(pm, functools.partial(muon_check, pm)), action


def facts(pm) -> dict:
    """What shows the engine really shards: this rank's share of the fp32 master weights, the ZeRO
    optimizer DeepSpeed built, and (ZeRO-3) the share of parameter elements it partitions."""
    model = pm.modules[0]
    params = list(model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    out = {"master_share": sum(part.flat.numel() for part in pm.partitions) / total,
           "zero_optimizer": type(pm.engine.optimizer).__name__,
           "wraps_moeforge": pm.engine.optimizer.optimizer is pm.zero}
    if pm.stage == 3:
        out["partitioned_share"] = sum(p.ds_numel for p in params if not p.ds_persist) / total
    return out


def run_zero(engine: str, layout: str, root: Path) -> dict:
    """Train (save or resume) under the audit: the build's device memory (ZeRO-3) and every collective
    moeforge issues (`deepspeed_audit`)."""
    layout, _, action = layout.partition("@")
    kind, _, name = action.partition("=")
    path = root / name
    with Audit(torch.device("cpu")) as audit:
        pm, opt, _ = build(engine, layout, audit)
        whole_after_build = sum(p.numel() > 0 for p in pm.modules[0].parameters()) if pm.stage == 3 else None
        steps = W.train(pm, opt, kind, lambda: ds_checkpoint.save(path, pm, {"step": W.SAVE_AT}),
                        lambda: ds_checkpoint.load(path, pm)["step"])
    out = {"steps": steps, **facts(pm), "collectives_checked": audit.checked,
           "collective_problems": audit.problems[:20], "collective_sites": sorted(audit.sites)}
    if pm.stage == 3:
        out.update(build_peak=audit.build_peak, whole_after_build=whole_after_build,
                   **build_bound(pm.modules[0], audit.param_offload))
    return out


def run_native(layout: str, root: Path) -> dict:
    layout, _, action = layout.partition("@")
    kind, _, name = action.partition("=")
    return {"steps": W.run_layout(f"{layout}@{kind}" if kind else layout, str(root / name))}


def run_fallback(engine: str, layout: str) -> dict:
    """Muon's step swapped for AdamW's, as a DeepSpeed that fell back to another optimizer would do."""
    pm, opt, _ = build(engine, layout)
    adam = {"betas": (0.9, 0.95), "eps": 1e-8}
    pm.zero._muon = lambda flat, grad, group: adamw_step(flat, grad, pm.zero.state[flat], {**group, **adam})
    try:
        W.train(pm, opt, "", None, None)
    except MoeforgeError as e:
        return {"raised": True, "message": str(e)}
    return {"raised": False, "message": ""}


def run_skipped_first(engine: str, layout: str) -> dict:
    """A first step the spike guard skips (backward, no optimizer step, `zero_grad`) changes nothing: the
    three steps after it are the reference's."""
    pm, opt, _ = build(engine, layout)
    rows, rank = W.ROWS // pm.pmesh.layout.dp, pm.pmesh.dp_rank
    pm.forward_backward([{k: v[rank * rows : (rank + 1) * rows] for k, v in W.global_batch(0).items()}],
                        W.MTP_WEIGHT)
    pm.clip_grad_norm_(W.CLIP)
    opt.zero_grad(set_to_none=True)
    return {"steps": W.train(pm, opt, "", None, None)}


def main() -> None:
    out_path, root, specs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    faulthandler.dump_traceback_later(W.HANG_S, exit=True)
    init_distributed("cpu", timeout_s=W.HANG_S)
    torch.set_num_threads(1)
    ref = [W.reference()] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(ref, src=0)
    results = {"reference": {"steps": ref[0]}}
    for spec in specs:
        engine, _, layout = spec.partition(":")
        if engine == "fallback":
            results[spec] = run_fallback(*layout.split(":"))
        elif engine == "skip":
            results[spec] = run_skipped_first(*layout.split(":"))
        elif engine == "fsdp":
            results[spec] = run_native(layout, root)
        else:
            results[spec] = run_zero(engine, layout, root)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
