import json

import numpy as np
import pytest

from data.cache import PackedTokens, write_packed
from model.errors import MoeforgeError


def make(tmp_path, rng, n=23, seq_len=8, shard_rows=5, vocab=300):
    rows = rng.integers(0, vocab, size=(n, seq_len))
    path = write_packed(iter(rows), tmp_path / "c", seq_len, vocab, shard_rows=shard_rows)
    return rows, path


def test_round_trip_across_shards(tmp_path, rng):
    rows, path = make(tmp_path, rng)
    assert len(list(path.glob("tokens-*.npy"))) == 5
    ds = PackedTokens(path)
    assert len(ds) == 23
    idx = rng.permutation(23)[:9]
    assert np.array_equal(ds.rows(idx), rows[idx])
    assert ds.arrays[0].dtype == np.uint16
    assert ds.batch(idx)["input_ids"].tolist() == rows[idx].tolist()
    assert not list(tmp_path.glob(".*tmp"))


def test_large_vocab_dtype(tmp_path, rng):
    rows = rng.integers(0, 100_000, size=(3, 4))
    ds = PackedTokens(write_packed(iter(rows), tmp_path / "c", 4, 100_000))
    assert ds.arrays[0].dtype == np.uint32 and np.array_equal(ds.rows(np.arange(3)), rows)


def test_corrupt_shard_is_named(tmp_path, rng):
    _, path = make(tmp_path, rng)
    shard = path / "tokens-00002.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(MoeforgeError, match="tokens-00002.npy: checksum mismatch"):
        PackedTokens(path)
    shard.write_bytes(bytes(raw[:-3]))
    with pytest.raises(MoeforgeError, match="tokens-00002.npy: missing or wrong size"):
        PackedTokens(path)
    shard.unlink()
    with pytest.raises(MoeforgeError, match="tokens-00002.npy"):
        PackedTokens(path)


def test_corrupt_manifest_is_named(tmp_path, rng):
    _, path = make(tmp_path, rng)
    (path / "manifest.json").write_text("{broken")
    with pytest.raises(MoeforgeError, match="manifest.json"):
        PackedTokens(path)
    (path / "manifest.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(MoeforgeError, match="manifest.json"):
        PackedTokens(path)


def test_file_lock_is_exclusive(tmp_path):
    import threading
    import time

    from data.lock import file_lock

    events, held = [], threading.Event()

    def first():
        with file_lock(tmp_path / "x.lock"):
            held.set()
            events.append("a-start")
            time.sleep(0.2)
            events.append("a-end")

    t = threading.Thread(target=first)
    t.start()
    held.wait()
    with file_lock(tmp_path / "x.lock"):
        events.append("b")
    t.join()
    assert events == ["a-start", "a-end", "b"]
