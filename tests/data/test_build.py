import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data import DataConfig, build_pretrain_data
from data.build import encode_documents
from data.sources import make_source
from data.tokenizer import BOS, EOS, PAD
from model.errors import ConfigError, MoeforgeError

from .conftest import VOCAB

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


def split_documents(rows):
    """Recover documents from packed rows (plain loop): bos ... eos."""
    stream = [t for r in rows for t in r if t != PAD]
    docs, cur = [], None
    for t in stream:
        if t == BOS:
            cur = []
        elif t == EOS:
            docs.append(cur)
        else:
            cur.append(t)
    return docs


def test_builtin_end_to_end(small_cfg, tok):
    data = build_pretrain_data(small_cfg, vocab_size=VOCAB, seq_len=64, batch_size=4, seed=3)
    assert data.tokenizer.to_str() == tok.to_str()
    train = data.train.dataset
    rows = train.rows(np.arange(len(train))).tolist()
    expect = list(encode_documents(tok, make_source(small_cfg).documents("train")))
    assert split_documents(rows) == expect
    batch = data.train.next_batch()
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (4, 64) for k in ("input_ids", "doc_ids",
                                                                                 "labels")}
    assert int(batch["input_ids"].max()) < VOCAB and batch["input_ids"].dtype == torch.long
    val_rows = data.val.dataset.rows(np.arange(len(data.val.dataset))).tolist()
    val_docs = split_documents(val_rows)
    assert val_docs and not {tuple(d) for d in val_docs} & {tuple(d) for d in expect}
    manifest = train.path / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = build_pretrain_data(small_cfg, vocab_size=VOCAB, seq_len=64, batch_size=4, seed=3)
    assert manifest.stat().st_mtime_ns == before and again.train.dataset.path == train.path
    assert torch.equal(again.train.next_batch()["input_ids"], batch["input_ids"])


def test_real_data_resume_under_other_world(small_cfg):
    one = build_pretrain_data(small_cfg, vocab_size=VOCAB, seq_len=64, batch_size=4, seed=5)
    ref = [one.train.next_batch()["input_ids"] for _ in range(6)]
    two = [build_pretrain_data(small_cfg, vocab_size=VOCAB, seq_len=64, batch_size=2, seed=5, rank=r, world=2)
           for r in range(2)]
    for step in range(3):
        assert torch.equal(torch.cat([d.train.next_batch()["input_ids"] for d in two]), ref[step])
    state = json.loads(json.dumps(two[0].train.state_dict()))
    four = [build_pretrain_data(small_cfg, vocab_size=VOCAB, seq_len=64, batch_size=1, seed=0, rank=r,
                                world=4) for r in range(4)]
    for d in four:
        d.train.load_state_dict(state)
    for step in range(3, 6):
        assert torch.equal(torch.cat([d.train.next_batch()["input_ids"] for d in four]), ref[step])


def test_corrupt_cache_fails_loudly(tmp_path, small_cfg, tok):
    cfg = DataConfig(**{**small_cfg.__dict__, "cache_dir": str(tmp_path), "max_documents": 5})
    data = build_pretrain_data(cfg, vocab_size=VOCAB, seq_len=32, batch_size=2)
    shard = data.train.dataset.path / "tokens-00000.npy"
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(MoeforgeError, match=f"{shard}: checksum mismatch"):
        build_pretrain_data(cfg, vocab_size=VOCAB, seq_len=32, batch_size=2)


def test_files_end_to_end_and_empty_split(tmp_path, small_cfg, tok):
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(30)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"code": t}) + "\n" for t in texts))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    cfg = DataConfig(source="files", path=str(tmp_path / "c.jsonl"), text_field="code",
                     tokenizer=str(tok_path), cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    data = build_pretrain_data(OmegaConf.create(cfg.__dict__), vocab_size=VOCAB, seq_len=32, batch_size=2)
    assert data.val is None
    rows = data.train.dataset.rows(np.arange(len(data.train.dataset))).tolist()
    assert [tok.decode(d) for d in split_documents(rows)] == texts
    empty = DataConfig(**{**cfg.__dict__, "val_fraction": 0.5, "max_documents": None})
    (tmp_path / "one.jsonl").write_text(json.dumps({"code": "x"}) + "\n")
    empty.path = str(tmp_path / "one.jsonl")
    with pytest.raises(MoeforgeError, match=r"data: split '(train|val)' of data.source=files .*documents"):
        build_pretrain_data(empty, vocab_size=VOCAB, seq_len=32, batch_size=2)


def test_data_config(monkeypatch, tmp_path):
    for name in ("builtin", "files", "hf"):
        raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
        assert raw.source == name
        if name == "builtin":
            assert DataConfig.from_dict(raw) == DataConfig()
        else:
            with pytest.raises(ConfigError, match="data.path: required"):
                DataConfig.from_dict(raw)
            assert DataConfig.from_dict({**OmegaConf.to_container(raw), "path": "x"}).source == name
    with pytest.raises(ConfigError, match="data.txt_field: unknown key"):
        DataConfig.from_dict({"txt_field": "body"})
    with pytest.raises(ConfigError, match="data.source"):
        DataConfig.from_dict({"source": "web"})
    with pytest.raises(ConfigError, match="data.val_fraction"):
        DataConfig.from_dict({"val_fraction": 1.0})
    assert DataConfig(vocab_size=None).resolve_vocab_size(4096) == 4096
    with pytest.raises(ConfigError, match="data.vocab_size"):
        DataConfig(vocab_size=4000).resolve_vocab_size(4096)
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path))
    assert DataConfig().cache_root() == tmp_path
    assert DataConfig(cache_dir="/x").cache_root() == Path("/x")


def test_concurrent_builders_share_one_cache(tmp_path):
    """Two processes (as two ranks would) build the same cache at once: one builds, both read it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from data import DataConfig, build_pretrain_data; "
            "d = build_pretrain_data(DataConfig(cache_dir=sys.argv[2], max_bytes=50000, max_documents=6, "
            "val_fraction=0.0), vocab_size=400, seq_len=32, batch_size=2); "
            "print(d.train.dataset.path, d.train.next_batch()['input_ids'].sum().item())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(tmp_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert len(list((tmp_path / "packed").glob("*/manifest.json"))) == 1
    assert not list((tmp_path / "packed").glob(".*tmp"))
    assert len(list(tmp_path.glob("tokenizers/*/*.json"))) == 1
