"""`datasets`-backed text sources: local jsonl / json / parquet / text files and hub datasets.

Every source yields documents `(key, text)` for a split 'train' or 'val'. Without an explicit held-out
split (`data.val_split`), a row's split is a hash of its key (`<file>:<row>` or `<row>`).

Bad data rules (each error names the file or column and the config key to change):
- `data.path` matching no file, an empty (0-byte) file, a file `datasets` cannot parse (including bytes
  that are not valid UTF-8) -> `MoeforgeError`;
- a missing text column, or a value in it that is not a string -> `MoeforgeError` naming the column;
- an empty or whitespace-only text value -> the row is skipped.
Text files (.txt, .text, .md) are read whole: one file is one document.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from data.config import DataConfig
from data.corpus import BuiltinCorpus
from data.split import check_split, split_of
from model.errors import MoeforgeError

Convert = Callable[[Any, str, str], Any]  # (value, column, where) -> value or None to skip
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
            ".md": "text"}


def data_files(path: str) -> list[Path]:
    """The data files named by `path`: one file, a directory (searched recursively) or a glob; sorted."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix in BUILDERS]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    files = sorted(files)
    if not files:
        raise MoeforgeError(f"data.path: no data files ({', '.join(BUILDERS)}) found at {path!r}")
    for f in files:
        if f.suffix not in BUILDERS:
            raise MoeforgeError(f"data.path: {f} has an unknown extension (known: {', '.join(BUILDERS)})")
    return files


def load_file(file: Path, cache_dir: Path | None = None, streaming: bool = False):
    """Load one local file through `datasets.load_dataset` (split 'train' of the file builder)."""
    import datasets

    if file.stat().st_size == 0:
        raise MoeforgeError(f"data.path: {file} is empty")
    builder = BUILDERS[file.suffix]
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=streaming,
                                     cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
    except Exception as err:  # datasets wraps parse errors in several types
        raise MoeforgeError(f"data.path: cannot read {file}: {type(err).__name__}: {err}") from err


def checked_rows(rows: Iterable[dict], where: str) -> Iterator[dict]:
    """Iterate rows, turning read errors (invalid UTF-8, parse errors while streaming) into clear errors."""
    it = iter(rows)
    i = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as err:
            raise MoeforgeError(f"data.path: cannot read {where} (row {i}): {type(err).__name__}: "
                                f"{err}") from err
        yield row
        i += 1


def column_values(rows: Iterable[dict], field: str | None, where: str, columns: list[str] | None,
                  key: str = "data.text_field") -> Iterator[Any]:
    """Yield `row[field]` (the whole row when `field` is None), raising a clear error (naming config `key`)
    when the column is missing."""
    if field is not None and columns is not None and field not in columns:
        raise MoeforgeError(f"{key}: column {field!r} not in {where} (columns: {columns})")
    for i, row in enumerate(checked_rows(rows, where)):
        if field is None:
            yield row
            continue
        if field not in row:
            raise MoeforgeError(f"{key}: column {field!r} missing in {where} row {i} "
                                f"(columns: {sorted(row)})")
        yield row[field]


def as_text(value: Any, field: str, where: str) -> str | None:
    """A row's text (None for an empty value); a value that is not a string is an error."""
    if value is not None and not isinstance(value, str):
        raise MoeforgeError(f"data.text_field: column {field!r} of {where} holds {type(value).__name__}, "
                            "not text")
    return value if value and value.strip() else None


class FileSource:
    """Local files read with `datasets`; rows are split by hash of `<file name>:<row>`."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.files = data_files(cfg.path)
        self.cache_dir = cfg.cache_root() / "datasets"

    def fingerprint(self) -> str:
        """Identifies the files (paths, sizes, modification times) and the reading options."""
        h = hashlib.sha256(f"files|{self.cfg.text_field}|{self.cfg.val_fraction}|{self.cfg.max_documents}"
                           .encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def values(self, split: str, field: str | None, convert: Convert, key: str = "data.text_field"
               ) -> Iterator[tuple[str, Any]]:
        """Yield `(file:row, convert(row[field]))` for the rows of `split`; None conversions are skipped."""
        check_split(split)
        n = 0
        for f in self.files:
            ds = load_file(f, self.cache_dir, self.cfg.streaming)
            columns = list(ds.column_names) if ds.column_names is not None else None
            col = "text" if BUILDERS[f.suffix] == "text" else field
            for i, raw in enumerate(column_values(ds, col, str(f), columns, key)):
                row_key = f"{f.name}:{i}"
                if split_of(row_key, self.cfg.val_fraction) != split:
                    continue
                value = convert(raw, col, f"{f} row {i}")
                if value is None:
                    continue
                if self.cfg.max_documents is not None and n >= self.cfg.max_documents:
                    return
                n += 1
                yield row_key, value

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        """Yield `(file:row, text)` for the non-empty rows of `split`."""
        return self.values(split, self.cfg.text_field, as_text)


class HubSource:
    """A dataset loaded with `datasets.load_dataset(data.path, data.name, split=..., streaming=...)`."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def fingerprint(self) -> str:
        """Identifies the dataset by its name, config, splits and reading options."""
        c = self.cfg
        parts = ("hf", c.path, c.name, c.split, c.val_split, c.text_field, c.val_fraction, c.max_documents,
                 sorted(c.extra.items()))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def load(self, split_name: str):
        """The raw `datasets` split (downloads go to the Hugging Face cache unless `data.extra.cache_dir`)."""
        import datasets

        c = self.cfg
        try:
            return datasets.load_dataset(c.path, c.name, split=split_name, streaming=c.streaming, **c.extra)
        except Exception as err:
            raise MoeforgeError(f"data.path: cannot load dataset {c.path!r} (name={c.name!r}, "
                                f"split={split_name!r}): {type(err).__name__}: {err}") from err

    def values(self, split: str, field: str | None, convert: Convert, key: str = "data.text_field"
               ) -> Iterator[tuple[str, Any]]:
        """Yield `(row, convert(row[field]))`; 'val' is `data.val_split` if set, else a hash hold-out."""
        check_split(split)
        c = self.cfg
        explicit = c.val_split is not None
        name = c.val_split if (explicit and split == "val") else c.split
        ds = self.load(name)
        columns = list(ds.column_names) if ds.column_names is not None else None
        where = f"dataset {c.path!r} split {name!r}"
        n = 0
        for i, raw in enumerate(column_values(ds, field, where, columns, key)):
            if not explicit and split_of(str(i), c.val_fraction) != split:
                continue
            value = convert(raw, field, f"{where} row {i}")
            if value is None:
                continue
            if c.max_documents is not None and n >= c.max_documents:
                return
            n += 1
            yield str(i), value

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        """Yield `(row, text)` for the non-empty rows of `split`."""
        return self.values(split, self.cfg.text_field, as_text)


def make_source(cfg: DataConfig):
    """The document source for `data.source`."""
    if cfg.source == "builtin":
        return BuiltinCorpus(cfg.val_fraction, cfg.max_documents)
    if cfg.source == "files":
        return FileSource(cfg)
    return HubSource(cfg)
