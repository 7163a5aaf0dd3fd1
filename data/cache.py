"""Pre-tokenised, packed token arrays on disk: shards of `[rows, seq_len]` `.npy` files plus a manifest.

`write_packed` writes into a temporary directory and renames it when complete, so a reader never sees a
half-written cache (concurrent writers of the same key are safe: the first rename wins).
`PackedTokens` memory-maps the shards after checking each against the manifest (size and SHA-256); a
missing or corrupt shard raises `MoeforgeError` naming the file (delete the directory to rebuild).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from data.packing import pretrain_batch
from model.errors import MoeforgeError

MANIFEST = "manifest.json"
SHARD_ROWS = 8192


def token_dtype(vocab_size: int):
    """The smallest unsigned dtype that holds every token id."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_packed(rows: Iterable[np.ndarray], out_dir: str | os.PathLike, seq_len: int, vocab_size: int,
                 meta: dict | None = None, shard_rows: int = SHARD_ROWS) -> Path:
    """Write packed rows as shards + manifest at `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(vocab_size)
    shards, buf = [], []

    def flush():
        name = f"tokens-{len(shards):05d}.npy"
        np.save(tmp / name, np.stack(buf).astype(dtype))
        shards.append({"file": name, "rows": len(buf), "bytes": (tmp / name).stat().st_size,
                       "sha256": _sha256(tmp / name)})
        buf.clear()

    for row in rows:
        if row.shape != (seq_len,):
            raise ValueError(f"row of shape {row.shape}, expected ({seq_len},)")
        buf.append(row)
        if len(buf) == shard_rows:
            flush()
    if buf:
        flush()
    manifest = {"version": 1, "seq_len": seq_len, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
                "rows": sum(s["rows"] for s in shards), "shards": shards, "meta": meta or {}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return out


class PackedTokens:
    """A verified, memory-mapped packed cache; `batch(rows)` returns a pre-training batch."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        try:
            self.manifest = json.loads(mpath.read_text())
            shards = self.manifest["shards"]
            self.seq_len = int(self.manifest["seq_len"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MoeforgeError(f"corrupt data cache: cannot read {mpath} ({err}); delete {self.path} "
                                "to rebuild it") from err
        self.arrays = [self._open(self.path / s["file"], s, verify) for s in shards]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        if len(self) == 0:
            raise MoeforgeError(f"data cache {self.path} holds no rows")

    def _open(self, file: Path, shard: dict, verify: bool) -> np.ndarray:
        hint = f"; delete {self.path} to rebuild the cache"
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            raise MoeforgeError(f"corrupt data cache shard {file}: missing or wrong size{hint}")
        if verify and _sha256(file) != shard["sha256"]:
            raise MoeforgeError(f"corrupt data cache shard {file}: checksum mismatch{hint}")
        try:
            arr = np.load(file, mmap_mode="r")
        except Exception as err:
            raise MoeforgeError(f"corrupt data cache shard {file}: {err}{hint}") from err
        if arr.shape != (shard["rows"], self.seq_len):
            raise MoeforgeError(f"corrupt data cache shard {file}: shape {arr.shape}{hint}")
        return arr

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Token rows `[len(idx), seq_len]` for global row indices `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        return np.stack([self.arrays[s][i - self.offsets[s]] for s, i in zip(shard, idx)]).astype(np.int64)

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """`input_ids`, `doc_ids`, `labels` `[len(idx), seq_len]` for rows `idx`."""
        return pretrain_batch(torch.from_numpy(self.rows(idx)))
