"""Any `datasets` source with a prompt and an answer column as a task domain.

`path` is a local jsonl/json/parquet file, directory or glob (read like data=files) or a hub dataset
name (read like data=hf). Without `val_split`, the held-out split is a hash of each row's key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.config import DataConfig
from data.sources import make_source
from data.tasks.records import Draft, make_record
from model.errors import MoeforgeError


def dataset_tasks(path: str, *, domain: str, prompt_field: str, answer_field: str, split: str = "train",
                  n: int | None = None, solution_field: str | None = None, tests_field: str | None = None,
                  entry_point_field: str | None = None, name: str | None = None, hf_split: str = "train",
                  val_split: str | None = None, val_fraction: float = 0.1, cache_dir: str | None = None,
                  streaming: bool = False) -> list[dict]:
    """Task records of `split` ('train'|'val') from columns of a dataset (at most `n`)."""
    local = any(c in path for c in "*?[") or Path(path).expanduser().exists()
    cfg = DataConfig(source="files" if local else "hf", path=path, split=hf_split, val_split=val_split,
                     name=name, val_fraction=val_fraction, max_documents=n, cache_dir=cache_dir,
                     streaming=streaming)
    cfg.validate()
    fields = {"prompt": prompt_field, "answer": answer_field, "solution": solution_field,
              "tests": tests_field, "entry_point": entry_point_field}

    def convert(row: dict, _field: Any, where: str) -> dict:
        values = {}
        for key, col in fields.items():
            if col is None:
                continue
            if col not in row:
                raise MoeforgeError(f"domain.{key}_field: column {col!r} not in {where} "
                                    f"(columns: {sorted(row)})")
            values[key] = "" if row[col] is None else str(row[col])
        return values

    out = []
    for key, v in make_source(cfg).values(split, None, convert, "domain.prompt_field"):
        draft = Draft(key=key, split_key=key, prompt=v["prompt"], answer=v["answer"],
                      solution=v.get("solution", v["answer"]), tests=v.get("tests", ""),
                      entry_point=v.get("entry_point", ""))
        out.append(make_record(domain, draft))
    return out
