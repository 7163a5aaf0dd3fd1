"""moeforge's distributed checkpoints (`moeforge-dcp-v1`, see train.parallel.checkpoint) written from and
read into a DeepSpeed ZeRO engine, so that either engine resumes the other's checkpoints.

The entries are the native engine's: `model.<name>` (expert stacks one entry per global expert),
`optim.muon.<name>.momentum_buffer`, `optim.adamw.<name>.{exp_avg,exp_avg_sq,step}`. Saving gathers each
parameter's fp32 master weight and optimizer state whole on one owner rank of its partition group
(`flat.gather_whole`, owners balanced by size), which stores it. Loading reads, on every rank and
without collectives, the whole tensors of the parameters it holds pieces of, a bucket at a time, and
copies its pieces into DeepSpeed's fp32 partitions, the optimizer state and the model's parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from model.errors import MoeforgeError
from train.parallel.checkpoint import entries, expert_offsets, layout_meta, read, write
from train.parallel.deepspeed.flat import chunk_by_size, gather_whole
from train.parallel.deepspeed.optimizer import ADAMW, ADAMW_STATE, MUON, MUON_STATE
from train.parallel.deepspeed.partitions import Partition

BUCKET_NUMEL = 1 << 26
STATE_KEYS = {MUON: MUON_STATE, ADAMW: ADAMW_STATE}


def _entries(kind: str, name: str, key: str | None, t: torch.Tensor, offsets: dict) -> dict:
    """The checkpoint entries of parameter `name` (key None) or of its optimizer state `key`."""
    if key is None:
        return entries("model.", name, t, offsets)
    full = f"{name}.{key}"
    split = {full: offsets[name]} if name in offsets and t.ndim > 0 else {}
    return entries(f"optim.{kind}.", full, t, split)


def _buffers(pm) -> dict[str, torch.Tensor]:
    """Entries of the model's buffers (routing biases, hash tables): replicated, kept as they are."""
    model, offsets = pm.modules[0], expert_offsets(pm.modules)
    params = {n for n, _ in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name not in params:
            out.update(entries("model.", name, t, offsets))
    return out


def _flat_states(pm, part: Partition) -> dict[str | None, torch.Tensor]:
    """The partition's flat tensors: fp32 master weights (None) and optimizer state by key."""
    state = pm.zero.state.get(part.flat, {})
    return {None: part.flat, **{k: state[k] for k in STATE_KEYS[part.group["kind"]] if k in state}}


@torch.no_grad()
def save(path: Path, pm, train_state: dict) -> Path:
    """Write this engine's weights and optimizer state as a moeforge distributed checkpoint."""
    offsets = expert_offsets(pm.modules)
    state = _buffers(pm)
    for part in pm.partitions:
        kind, layout = part.group["kind"], part.layout
        zstate = pm.zero.state.get(part.flat, {})
        for bucket in layout.buckets(BUCKET_NUMEL):
            owners = layout.owners(bucket)
            for key, flat in _flat_states(pm, part).items():
                for i, whole in gather_whole(layout, flat, owners).items():
                    state.update(_entries(kind, layout.names[i], key, whole, offsets))
            if "step" in zstate:
                for i in (i for i, o in owners.items() if o == layout.rank):
                    state[f"optim.{kind}.{layout.names[i]}.step"] = zstate["step"].detach().clone()
    meta = {**layout_meta(pm.layout), "engine": "deepspeed", "zero_stage": pm.stage}
    return write(path, state, train_state, meta)


@torch.no_grad()
def load(path: Path, pm) -> dict:
    """Load a moeforge distributed checkpoint of any engine and layout; returns its JSON train state."""
    meta, saved = read(path)
    buffers = _buffers(pm)
    _require(path, buffers, saved)
    dcp.load(buffers, checkpoint_id=str(path), no_dist=True)  # in place
    for part in pm.partitions:
        _load_partition(path, pm, part, saved)
    if pm.stage in (1, 2):
        pm.engine.optimizer.update_lp_params()  # model parameters from the fp32 partitions, all-gathered
    return meta


def _require(path: Path, wanted: dict, saved: set[str]) -> None:
    missing = sorted(k for k in wanted if k not in saved)
    if missing:
        raise MoeforgeError(f"{path} lacks {missing[:5]} (was it written for another model config?)")


def _load_partition(path: Path, pm, part: Partition, saved: set[str]) -> None:
    kind, layout = part.group["kind"], part.layout
    offsets = expert_offsets(pm.modules)
    keys = [k for k in STATE_KEYS[kind] if any(_stored(saved, kind, n, k, offsets) for n in layout.names)]
    flats = _ensure_state(pm, part, keys)
    mine = {p.index: p for p in layout.mine()}
    indices = sorted(mine)
    for bucket in chunk_by_size(indices, [layout.numel(i) for i in indices], BUCKET_NUMEL):
        wholes, request, steps = {}, {}, {}
        for i in bucket:
            for key in (None, *keys):
                whole = torch.zeros(layout.shapes[i], dtype=torch.float32)
                found = _entries(kind, layout.names[i], key, whole, offsets)
                if key is None:
                    _require(path, found, saved)
                wholes[i, key] = whole
                request.update({k: v for k, v in found.items() if k in saved})
            step_key = f"optim.{kind}.{layout.names[i]}.step"
            if kind == ADAMW and step_key in saved:
                steps[i] = request[step_key] = torch.zeros((), dtype=torch.float32)
        dcp.load(request, checkpoint_id=str(path), no_dist=True)
        for i in bucket:
            p = mine[i]
            for key in (None, *keys):
                src = wholes[i, key].reshape(-1).narrow(0, p.param_off, p.length)
                flats[key].narrow(0, p.part_off, p.length).copy_(src)
            _write_model_param(part, i, p, wholes[i, None])
        if steps:
            pm.zero.state[part.flat]["step"].fill_(max(float(s) for s in steps.values()))


def _stored(saved: set[str], kind: str, name: str, key: str, offsets: dict) -> bool:
    """Whether the checkpoint holds optimizer state `key` of parameter `name` (of its first expert)."""
    entry = f"optim.{kind}.{name}.{key}"
    return entry in saved or (name in offsets and f"{entry}.{offsets[name]}" in saved)


def _ensure_state(pm, part: Partition, keys: list[str]) -> dict[str | None, torch.Tensor]:
    state = pm.zero.state[part.flat]
    for key in keys:
        if key not in state:
            state[key] = torch.zeros_like(part.flat)
    if part.group["kind"] == ADAMW and keys and "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
    return {None: part.flat, **{k: state[k] for k in keys}}


def _write_model_param(part: Partition, index: int, piece, whole: torch.Tensor) -> None:
    """ZeRO-3 keeps this rank's slice of the parameter (`ds_tensor`, and the whole tensor while it is
    gathered); ZeRO-1/2 parameters are refreshed from the fp32 partitions after loading."""
    if part.stage != 3:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    param = part.params[index]
    src = whole.reshape(-1).narrow(0, piece.param_off, piece.length)
    param.ds_tensor.data.reshape(-1).narrow(0, 0, piece.length).copy_(src)
    if param.ds_status == ZeroParamStatus.AVAILABLE and param.data.numel() == whole.numel():
        param.data.copy_(whole.view_as(param.data))
