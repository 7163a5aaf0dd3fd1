"""Byte-level BPE tokenizer: train one at the model's vocabulary size (cached), or load `tokenizer.json`.

Digits are split into single-digit tokens before BPE (numbers never merge).

Special tokens have fixed ids 0..6: `<|bos|>`=0 and `<|eos|>`=1 (DeepseekV4Config defaults), `<|pad|>`=2,
`<|system|>`=3, `<|user|>`=4, `<|assistant|>`=5, `<|end|>`=6. Tokenizers returned here encode special-token
strings inside text as plain bytes (`encode_special_tokens = True`), so data can never inject them; the
special ids are added explicitly by packing and chat rendering.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.config import DataConfig
from data.lock import file_lock
from model.errors import MoeforgeError

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END = range(len(SPECIAL_TOKENS))
MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + 1
FORMAT_VERSION = "2"


def sample_texts(documents: Iterable[tuple[str, str]], max_bytes: int) -> list[str]:
    """The first documents, in source order, up to `max_bytes` UTF-8 bytes (the last one cut)."""
    out, used = [], 0
    for _, text in documents:
        raw = text.encode("utf-8")[: max_bytes - used]
        out.append(raw.decode("utf-8", errors="ignore"))
        used += len(raw)
        if used >= max_bytes:
            break
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with exactly `vocab_size` tokens (special tokens first)."""
    if vocab_size < MIN_VOCAB:
        raise MoeforgeError(f"model.vocab_size: a byte-level tokenizer needs at least {MIN_VOCAB} tokens, "
                            f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # one token per digit: arithmetic generalises better
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise MoeforgeError(f"data.max_bytes: the tokenizer sample yields only {tok.get_vocab_size()} "
                            f"tokens, fewer than vocab_size {vocab_size}; raise data.max_bytes or add data")
    check_tokenizer(tok, "trained tokenizer")
    tok.encode_special_tokens = True
    return tok


def check_tokenizer(tok: Tokenizer, where: str) -> None:
    """Raise unless the special tokens have ids 0..6."""
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise MoeforgeError(f"data.tokenizer: {where} must have special token {s} at id {i}, "
                                f"found id {tok.token_to_id(s)}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` (or a directory holding one) and check its special tokens."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise MoeforgeError(f"data.tokenizer: {p} does not exist")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as err:
        raise MoeforgeError(f"data.tokenizer: cannot load {p}: {err}") from err
    check_tokenizer(tok, str(p))
    tok.encode_special_tokens = True
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write `tokenizer.json` atomically (a temporary file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, p)
    return p


def tokenizer_hash(tok: Tokenizer) -> str:
    """A content hash of the tokenizer (for cache keys of token arrays)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def build_tokenizer(cfg: DataConfig, vocab_size: int, source=None) -> Tokenizer:
    """Load `data.tokenizer`, or train on a `data.max_bytes` sample of the training split (cached).

    The cache key is (corpus fingerprint, vocab size, sample size); the file is
    `<cache_dir>/tokenizers/<key>/tokenizer.json`.
    """
    vocab_size = cfg.resolve_vocab_size(vocab_size)
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        if tok.get_vocab_size() > vocab_size:
            raise MoeforgeError(f"data.tokenizer: {cfg.tokenizer} has {tok.get_vocab_size()} tokens, more "
                                f"than model.vocab_size {vocab_size}")
        return tok
    if source is None:
        from data.sources import make_source

        source = make_source(cfg)
    key = hashlib.sha256(f"{FORMAT_VERSION}|{source.fingerprint()}|{vocab_size}|{cfg.max_bytes}".encode())
    path = cfg.cache_root() / "tokenizers" / key.hexdigest()[:16] / "tokenizer.json"
    with file_lock(path.parent.with_name(path.parent.name + ".lock")):
        if path.is_file():
            return load_tokenizer(path)
        tok = train_tokenizer(sample_texts(source.documents("train"), int(cfg.max_bytes)), vocab_size)
        save_tokenizer(tok, path)
    return tok
