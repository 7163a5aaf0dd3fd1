"""The built-in corpus: the Python standard library of the running interpreter, one document per file.

It exists on every machine without downloads. Files are the `*.py` files under
`sysconfig.get_paths()["stdlib"]`, excluding test suites (`test/`, `tests/`, `idle_test/`, `test_*.py`)
and installed packages (`site-packages/`, `dist-packages/`). A file's split is a hash of its relative
path (`data.split.split_of`). Bad data is handled, not raised: empty files are skipped, and a file that is
not valid UTF-8 is skipped with a logged warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from data.split import bucket, check_split, split_of

log = logging.getLogger(__name__)

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths (posix) of the corpus files, sorted."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: never walk site-packages
        rel = Path(dirpath).relative_to(root)
        out += [(rel / f).as_posix() for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(out)


class BuiltinCorpus:
    """Standard-library source files as documents `(relative_path, text)`."""

    def __init__(self, val_fraction: float = 0.05, max_documents: int | None = None,
                 root: Path | None = None):
        self.root = Path(root) if root else stdlib_root()
        self.val_fraction = val_fraction
        self.max_documents = max_documents
        # hash order spreads any prefix (e.g. the tokenizer sample) over the whole library
        self.files = sorted(stdlib_files(self.root), key=bucket)

    def fingerprint(self) -> str:
        """Identifies the corpus contents (interpreter version, file list and sizes, split fraction)."""
        h = hashlib.sha256(f"builtin|{sys.version}|{self.val_fraction}|{self.max_documents}".encode())
        for rel in self.files:
            h.update(f"{rel}:{(self.root / rel).stat().st_size}\n".encode())
        return h.hexdigest()[:16]

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        """Yield `(relative_path, text)` for every non-empty, decodable file of `split` ('train'|'val')."""
        check_split(split)
        n = 0
        for rel in self.files:
            if self.max_documents is not None and n >= self.max_documents:
                return
            if split_of(rel, self.val_fraction) != split:
                continue
            raw = (self.root / rel).read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                log.warning("skipping %s: not valid UTF-8 (%s)", self.root / rel, err)
                continue
            if not text.strip():
                continue
            n += 1
            yield rel, text
