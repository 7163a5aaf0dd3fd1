"""Checkpoints: a directory with safetensors model and optimizer state and a JSON manifest.

Layout of `<root>/step-<N>/`: `model.safetensors`, `optimizer.safetensors` (the optimizer's name-keyed
`flat_state_dict()`, see optim.CombinedOptimizer), `manifest.json` (config, step, data position and other
JSON state, RNG states, tokenizer hash, sha256 of every file and of the manifest itself), and extra files
such as `tokenizer.json`. A checkpoint is written as `<root>/.tmp-step-<N>` and renamed when complete, so a
directory named `step-<N>` with a manifest is complete. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.errors import MoeforgeError
from optim.combined import CombinedOptimizer
from train import rng

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
FORMAT = "moeforge-checkpoint-v1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """What `load` hands back besides the tensors it copied into the model and optimizer."""

    path: Path
    step: int
    state: dict = field(default_factory=dict)  # the caller's JSON state (data position, scheduler, ...)
    config: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    tokenizer_hash: str | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors sharing storage are cloned so safetensors accepts them."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def _load_optimizer(optimizer: CombinedOptimizer, meta: dict, source: Path) -> None:
    try:
        optimizer.load_flat_state_dict(_load_tensors(source), meta)
    except (MoeforgeError, ValueError, KeyError) as e:
        raise MoeforgeError(f"{source}: optimizer state does not fit this optimizer: {e}") from e


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (named step-<N>, with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`; `.tmp-*` and dirs without a manifest never count."""
    found = checkpoint_dirs(root)
    return found[-1][1] if found else None


def prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints."""
    for _, path in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(path)


def save(root: Path, step: int, model: torch.nn.Module, optimizer: CombinedOptimizer | None, *,
         state: dict | None = None, config: dict | None = None, tokenizer_hash: str | None = None,
         keep: int | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write `<root>/step-<step>` atomically (temporary name, fsync, rename) and keep the newest `keep`.

    `extra_files` (name -> text, e.g. the tokenizer.json) are written beside the tensors and checksummed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    tmp.mkdir()
    save_file(_cpu_tensors(model.state_dict()), tmp / MODEL_FILE)
    files = [MODEL_FILE]
    optim_meta = None
    if optimizer is not None:
        tensors, optim_meta = optimizer.flat_state_dict()
        save_file(_cpu_tensors(tensors), tmp / OPTIM_FILE)
        files.append(OPTIM_FILE)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
        files.append(name)
    manifest = {
        "format": FORMAT,
        "step": step,
        "config": config or {},
        "state": state or {},
        "rng": rng.capture(),
        "tokenizer_hash": tokenizer_hash,
        "optimizer": optim_meta,
        "files": {},
    }
    for name in files:
        _fsync(tmp / name)
        manifest["files"][name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    if keep is not None:
        prune(root, keep)
    return final


def read_manifest(path: Path) -> dict:
    """The verified manifest of checkpoint `path` (its own checksum and every file's are checked)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise MoeforgeError(f"checkpoint {path} does not exist")
    if not mpath.is_file():
        raise MoeforgeError(f"{mpath} is missing: {path} is not a complete checkpoint")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeforgeError(f"{mpath} is corrupt (not valid JSON: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MoeforgeError(f"{mpath} is not a {FORMAT} manifest")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise MoeforgeError(f"{mpath} is corrupt (its checksum does not match its content)")
    for name, meta in manifest["files"].items():
        fpath = path / name
        if not fpath.is_file():
            raise MoeforgeError(f"{fpath} is missing from checkpoint {path}")
        if _sha256(fpath) != meta["sha256"]:
            raise MoeforgeError(f"{fpath} is corrupt (sha256 does not match {MANIFEST})")
    return manifest


def _load_tensors(fpath: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(fpath)
    except (SafetensorError, OSError) as e:
        raise MoeforgeError(f"{fpath} cannot be read: {e}") from e


def load(path: Path, model: torch.nn.Module, optimizer: CombinedOptimizer | None = None,
         strict: bool = True) -> Checkpoint:
    """Verify checkpoint `path`, copy its weights (and optimizer state) in; RNG is returned, not restored."""
    path = Path(path)
    manifest = read_manifest(path)
    _load_weights(model, _load_tensors(path / MODEL_FILE), strict, path / MODEL_FILE)
    if optimizer is not None:
        if manifest["optimizer"] is None:
            raise MoeforgeError(f"{path} holds no optimizer state ({OPTIM_FILE} absent)")
        _load_optimizer(optimizer, manifest["optimizer"], path / OPTIM_FILE)
    return Checkpoint(path=path, step=manifest["step"], state=manifest["state"], config=manifest["config"],
                      rng=manifest["rng"], tokenizer_hash=manifest["tokenizer_hash"])


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], strict: bool,
                  source: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in weights] if strict else []
    unexpected = [k for k in weights if k not in own] if strict else []
    bad_shape = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in weights and v.shape != weights[k].shape]
    if missing or unexpected or bad_shape:
        raise MoeforgeError(f"{source} does not fit the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]} "
                            "(is the model config the one it was saved with?)")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)


def config_of(path: Path) -> dict[str, Any]:
    """The config a checkpoint was written with (verified)."""
    return read_manifest(path)["config"]
