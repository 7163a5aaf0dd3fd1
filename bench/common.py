"""Small helpers shared by the benchmarks: environment record, JSON output and a plain text table."""

import json
import platform
from pathlib import Path

import torch


def environment() -> dict:
    """Versions and device, stored with every result."""
    env = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` (plus the environment) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    tmp.replace(path)


def table(rows: list[dict], columns: list[str]) -> str:
    """Rows of dicts as an aligned text table (floats: one decimal from 10 up, else 3 significant)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
