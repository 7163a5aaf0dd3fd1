"""`DataConfig`: the validated `data` config group (configs/data/*.yaml)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import ConfigError

SOURCES = ("builtin", "files", "hf")


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenised and where derived files are cached."""

    source: str = "builtin"            # builtin | files | hf
    path: str | None = None            # files: file, directory or glob; hf: dataset name or local dataset dir
    text_field: str = "text"           # text column of jsonl/parquet/hub data
    messages_field: str = "messages"   # conversation column of SFT data
    split: str = "train"               # hf: the dataset split that training reads
    val_split: str | None = None       # hf: a held-out split name; null = hash hold-out of `split`
    name: str | None = None            # hub dataset config name
    streaming: bool = False            # hf: stream instead of downloading the whole dataset
    tokenizer: str | None = None       # tokenizer.json (or its directory); null = train one
    vocab_size: int | None = None      # null = the model's vocab_size
    max_bytes: int = 4_000_000         # size of the tokenizer training sample
    max_documents: int | None = None   # cap on documents read per split (quick runs, tests)
    cache_dir: str | None = None       # null = $MOEFORGE_CACHE or ~/.cache/moeforge
    val_fraction: float = 0.05         # share of documents held out for validation
    extra: dict[str, Any] = field(default_factory=dict)  # passed to datasets.load_dataset

    @classmethod
    def from_dict(cls, d: Any) -> DataConfig:
        """Build from a dict or an OmegaConf `DictConfig` (`cfg.data`); unknown keys are errors."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(d, DictConfig):
                d = OmegaConf.to_container(d, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ConfigError(f"data.{key}", f"unknown key (known: {', '.join(sorted(names))})")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid key."""
        if self.source not in SOURCES:
            raise ConfigError("data.source", f"must be one of {SOURCES}, got {self.source!r}")
        if self.source in ("files", "hf") and not self.path:
            raise ConfigError("data.path", f"required for data={self.source}")
        if not self.text_field:
            raise ConfigError("data.text_field", "must be a column name")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ConfigError("data.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.vocab_size is not None and int(self.vocab_size) < 1:
            raise ConfigError("data.vocab_size", f"must be positive or null, got {self.vocab_size}")
        if int(self.max_bytes) < 1000:
            raise ConfigError("data.max_bytes", f"must be >= 1000, got {self.max_bytes}")
        if self.max_documents is not None and int(self.max_documents) < 1:
            raise ConfigError("data.max_documents", f"must be >= 1 or null, got {self.max_documents}")

    def resolve_vocab_size(self, model_vocab_size: int) -> int:
        """The tokenizer's vocabulary size; it must equal the model's."""
        if self.vocab_size is not None and int(self.vocab_size) != int(model_vocab_size):
            raise ConfigError("data.vocab_size", f"{self.vocab_size} differs from model.vocab_size "
                              f"{model_vocab_size}; leave it null to use the model's")
        return int(model_vocab_size)

    def cache_root(self) -> Path:
        """The directory for tokenizers and packed token arrays."""
        root = self.cache_dir or os.environ.get("MOEFORGE_CACHE") or "~/.cache/moeforge"
        return Path(root).expanduser()
