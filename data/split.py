"""Deterministic hold-out split: a document's split is a function of a stable key (its path, row...)."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val")


def bucket(key: str) -> float:
    """A uniform number in [0, 1) derived from `key` alone (same on every machine and Python run)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, val_fraction: float) -> str:
    """'val' for the first `val_fraction` of the hash range, else 'train'."""
    return "val" if bucket(key) < val_fraction else "train"


def check_split(split: str) -> str:
    """Validate a split name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
