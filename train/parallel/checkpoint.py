"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its shards; any
other world size or layout loads them (DCP reshards FSDP's DTensors; expert stacks are stored one tensor
per expert, `<name>.<global expert>`, so any expert placement can pick its experts).

Layout of `<dir>`: DCP's files (`.metadata`, `__<rank>_0.distcp`) holding `model.<name>` and
`optim.<optimizer>.<name>.<state key>`, plus `manifest.json` (format `moeforge-dcp-v1`: step, global
data position and other JSON state, the layout it was written under), written by rank 0 last, so a
`step-<N>` directory with a manifest is complete (`train.checkpoint.find_latest` finds it). Written to
`.tmp-step-<N>` and renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from model.errors import MoeforgeError
from model.moe import Experts
from optim.combined import CombinedOptimizer
from train.checkpoint import MANIFEST
from train.parallel.expert import ExpertParallel
from train.parallel.step import ParallelModel

STATE_FILE = MANIFEST
FORMAT = "moeforge-dcp-v1"
_EXPERT = re.compile(r"(^|\.)experts\.w[123]$")


def expert_offsets(modules) -> dict[str, int]:
    """Global index of the first local expert of every expert parameter (ep offset + FSDP shard offset)."""
    out = {}
    for m in modules:
        for prefix, sub in m.named_modules():
            if isinstance(sub, ExpertParallel):
                for name in ("w1", "w2", "w3"):
                    p = getattr(sub, name)
                    offset = sub.offset
                    if isinstance(p, DTensor):  # FSDP Shard(0) over edp: torch.chunk sizes
                        size = -(-sub.local // p.device_mesh.size())
                        offset += p.device_mesh.get_local_rank() * size
                    out[f"{prefix}.{name}"] = offset
            elif isinstance(sub, Experts):  # a one-process model's whole stacks (checkpoint conversion)
                out.update({f"{prefix}.{name}": 0 for name in ("w1", "w2", "w3")})
    return out


def entries(prefix: str, name: str, t: torch.Tensor, offsets: dict[str, int]) -> dict[str, torch.Tensor]:
    """One checkpoint entry, or one per expert for a local expert stack."""
    if name in offsets:
        local = t.to_local() if isinstance(t, DTensor) else t
        return {f"{prefix}{name}.{offsets[name] + j}": local[j] for j in range(local.shape[0])}
    return {prefix + name: t}


def _state(pm: ParallelModel, optimizer: CombinedOptimizer | None, create: set[str] | None = None) -> dict:
    return module_state(pm.modules, optimizer, create)


def module_state(modules: list, optimizer: CombinedOptimizer | None, create: set[str] | None = None) -> dict:
    """Flat name -> tensor view of the model (and optimizer) state of `modules` (this rank's); `create`
    lists optimizer keys whose (empty) state should be made so a load can fill it."""
    offsets = expert_offsets(modules)
    state: dict[str, torch.Tensor] = {}
    params: dict[str, torch.Tensor] = {}
    for m in modules:
        for name, t in m.state_dict().items():
            state.update(entries("model.", name, t, offsets))
        params.update(dict(m.named_parameters()))
    if optimizer is not None:
        for key, opt in optimizer.optimizers.items():
            for group in opt.param_groups:
                for p, name in zip(group["params"], group["names"]):
                    if create is not None:
                        _make_state(opt, p, f"optim.{key}.{name}.", create)
                    for sk, sv in opt.state.get(p, {}).items():
                        if isinstance(sv, torch.Tensor):
                            state.update(entries(f"optim.{key}.", f"{name}.{sk}", sv,
                                                  {f"{name}.{sk}": offsets[name]} if name in offsets else {}))
    return state


def _make_state(opt, p: torch.Tensor, prefix: str, saved: set[str]) -> None:
    st = opt.state[p]
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if any(k == prefix + key or k.startswith(prefix + key + ".") for k in saved) and key not in st:
            st[key] = torch.zeros_like(p)
    if prefix + "step" in saved and "step" not in st:  # fused AdamW keeps `step` on the parameter's device
        device = p.device if opt.defaults.get("fused") else "cpu"
        st["step"] = torch.zeros((), dtype=torch.float32, device=device)


def save(path: Path, pm: ParallelModel, optimizer: CombinedOptimizer | None, train_state: dict) -> Path:
    """Write a sharded checkpoint of this layout to `path` (all ranks call it; atomic rename at the end)."""
    return write(path, _state(pm, optimizer), train_state, layout_meta(pm.layout))


def layout_meta(layout) -> dict:
    """What the manifest records of the layout a checkpoint was written under."""
    return {"world": layout.world, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep,
            "pp_schedule": layout.pp_schedule}


def write(path: Path, state: dict[str, torch.Tensor], train_state: dict, layout: dict) -> Path:
    """Write this rank's `state` (entry name -> tensor; DCP stores an entry several ranks hold once) and,
    from rank 0, the manifest; the directory appears under its name only once complete."""
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {**train_state, "format": FORMAT, "layout": layout}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()
    return path


def read(path: Path) -> tuple[dict, set[str]]:
    """(JSON train state, names of the stored entries) of a distributed checkpoint."""
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text()) if (path / STATE_FILE).is_file() else {}
    if meta.get("format") != FORMAT:
        raise MoeforgeError(f"{path} is not a distributed ({FORMAT}) checkpoint; one written by a single "
                            "process (moeforge-checkpoint-v1) starts a parallel run through init=<it>")
    return meta, set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load(path: Path, pm: ParallelModel, optimizer: CombinedOptimizer | None) -> dict:
    """Load a checkpoint written under any layout into this one; returns its JSON train state."""
    meta, saved = read(path)
    state = _state(pm, optimizer, create=saved if optimizer is not None else None)
    missing = sorted(k for k in state if k not in saved)
    if missing:
        raise MoeforgeError(f"{path} lacks {missing[:5]} (was it written for another model config?)")
    dcp.load(state, checkpoint_id=str(path))  # in place: per-expert entries are views of the stacks
    return meta
