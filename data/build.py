"""Pre-training data in one call: tokenizer, packed caches of both splits, and their loaders."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from data.cache import MANIFEST, PackedTokens, write_packed
from data.config import DataConfig
from data.loader import Loader
from data.lock import file_lock
from data.packing import pack
from data.sources import make_source
from data.tokenizer import build_tokenizer, tokenizer_hash
from model.errors import MoeforgeError

log = logging.getLogger(__name__)
ENCODE_BATCH = 256


def encode_documents(tok: Tokenizer, documents: Iterator[tuple[str, str]]) -> Iterator[list[int]]:
    """Token ids of each document's text, encoded in batches."""
    while chunk := list(itertools.islice(documents, ENCODE_BATCH)):
        yield from (e.ids for e in tok.encode_batch([text for _, text in chunk], add_special_tokens=False))


def packed_split(cfg: DataConfig, tok: Tokenizer, split: str, seq_len: int, source=None) -> PackedTokens:
    """The packed cache of `split`, built on first use under `<cache_dir>/packed/<key>/`."""
    source = source or make_source(cfg)
    key = hashlib.sha256(f"1|{source.fingerprint()}|{tokenizer_hash(tok)}|{seq_len}|{split}".encode())
    path = cfg.cache_root() / "packed" / key.hexdigest()[:16]
    with file_lock(path.with_name(path.name + ".lock")):
        if not (path / MANIFEST).is_file():
            write_split(cfg, tok, split, seq_len, source, path)
    return PackedTokens(path)


def write_split(cfg: DataConfig, tok: Tokenizer, split: str, seq_len: int, source, path) -> None:
    """Tokenise, pack and write one split; an empty split is an error."""
    rows = pack(encode_documents(tok, source.documents(split)), seq_len)
    first = next(rows, None)
    if first is None:
        raise MoeforgeError(f"data: split {split!r} of data.source={cfg.source} (data.path={cfg.path!r}) "
                            "has no documents; check data.path, data.text_field and data.val_fraction")
    log.info("packing %s split %s into %s", cfg.source, split, path)
    write_packed(itertools.chain([first], rows), path, seq_len, tok.get_vocab_size(),
                 meta={"source": cfg.source, "path": cfg.path, "split": split})


@dataclass
class PretrainData:
    tokenizer: Tokenizer
    train: Loader
    val: Loader | None


def build_pretrain_data(cfg: DataConfig | Any, *, vocab_size: int, seq_len: int, batch_size: int,
                        seed: int = 0, rank: int = 0, world: int = 1) -> PretrainData:
    """Tokenizer plus train (shuffled) and val (ordered; None when data.val_fraction is 0) loaders."""
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
    source = make_source(cfg)
    tok = build_tokenizer(cfg, vocab_size, source)
    train = Loader(packed_split(cfg, tok, "train", seq_len, source), batch_size, seed=seed, rank=rank,
                   world=world)
    has_val = cfg.val_fraction > 0 or (cfg.source == "hf" and cfg.val_split)
    val = None
    if has_val:
        val = Loader(packed_split(cfg, tok, "val", seq_len, source), batch_size, seed=seed, rank=rank,
                     world=world, shuffle=False)
    return PretrainData(tok, train, val)
