"""Step markers: a finished step leaves ``DONE.json`` with its output's checksum."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from train.summary import write_text_atomic

MARKER = "DONE.json"


def checksum(path: str | Path | None) -> str | None:
    """sha256 over a file, or over a directory's relative file names and contents; None if absent."""
    if path is None or not Path(path).exists():
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_marker(step_dir: Path, record: dict) -> Path:
    """Write ``record`` (+ the checksum of ``record['checkpoint']``) atomically as the step's marker."""
    record = dict(record, checksum=checksum(record.get("checkpoint")))
    return write_text_atomic(Path(step_dir) / MARKER, json.dumps(record, indent=2, default=str) + "\n")


def read_marker(step_dir: Path) -> dict | None:
    path = Path(step_dir) / MARKER
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def stale_reason(step_dir: Path, overrides: list[str], inputs: dict[str, str | None]) -> str | None:
    """None when the step's marker says it finished with these overrides and input; else why not."""
    marker = read_marker(step_dir)
    if marker is None:
        return "not finished"
    if marker.get("overrides") != list(overrides):
        return "its overrides changed"
    if marker.get("inputs") != inputs:
        return "an input checkpoint changed"
    if checksum(marker.get("checkpoint")) != marker.get("checksum"):
        return f"its output {marker.get('checkpoint')} is missing or changed"
    return None
