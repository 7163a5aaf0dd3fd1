import json

import pytest

from data.config import DataConfig
from data.sources import FileSource, HubSource, make_source
from model.errors import MoeforgeError

TEXTS = [f"document number {i}: " + "word " * (i % 7) for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(path, tmp_path, **kw):
    return DataConfig(**{"source": "files", "path": str(path), "cache_dir": str(tmp_path / "cache"),
                         "val_fraction": 0.25, **kw})


def test_jsonl_parquet_and_text_files(tmp_path):
    import datasets

    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"body": t, "n": i} for i, t in enumerate(TEXTS[:20])])
    datasets.Dataset.from_dict({"body": TEXTS[20:]}).to_parquet(str(d / "b.parquet"))
    (d / "c.txt").write_text("line one\nline two\n")
    (d / "skip.csv").write_text("ignored")
    source = FileSource(cfg(d, tmp_path, text_field="body"))
    assert [f.name for f in source.files] == ["a.jsonl", "b.parquet", "c.txt"]
    train, val = (list(source.documents(s)) for s in ("train", "val"))
    assert not {k for k, _ in train} & {k for k, _ in val}
    assert sorted(t for _, t in train + val) == sorted(TEXTS + ["line one\nline two\n"])
    assert 0 < len(val) < len(train)
    assert list(FileSource(cfg(d, tmp_path, text_field="body")).documents("val")) == val
    capped = FileSource(cfg(d, tmp_path, text_field="body", max_documents=3))
    assert len(list(capped.documents("train"))) == 3


def test_empty_rows_are_skipped_and_glob(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"text": "  "}, {"text": None}, {"text": "b"}])
    docs = list(FileSource(cfg(tmp_path / "*.jsonl", tmp_path, val_fraction=0.0)).documents("train"))
    assert [t for _, t in docs] == ["a", "b"]


def test_bad_data_errors_name_file_or_column(tmp_path):
    with pytest.raises(MoeforgeError, match="data.path: no data files"):
        FileSource(cfg(tmp_path / "nothing*.jsonl", tmp_path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MoeforgeError, match="empty.jsonl is empty"):
        list(FileSource(cfg(empty, tmp_path)).documents("train"))
    nocol = write_jsonl(tmp_path / "nocol.jsonl", [{"content": "x"}] * 5)
    with pytest.raises(MoeforgeError, match=r"data.text_field: column 'text' not in .*nocol.jsonl.*content"):
        list(FileSource(cfg(nocol, tmp_path)).documents("train"))
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": 5}] * 5)
    with pytest.raises(MoeforgeError, match=r"data.text_field: .*ints.jsonl row 0 holds int"):
        list(FileSource(cfg(ints, tmp_path, val_fraction=0.0)).documents("train"))
    for name, raw in (("bad.txt", b"ok \xff\xfe bytes"), ("bad.jsonl", b'{"text": "\xff\xfe"}\n')):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(MoeforgeError, match=f"data.path: cannot read .*{name}"):
            list(FileSource(cfg(tmp_path / name, tmp_path)).documents("train"))


def test_hub_source_through_load_dataset(tmp_path):
    d = tmp_path / "hubdir"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": t} for t in TEXTS])
    write_jsonl(d / "validation.jsonl", [{"text": "held out"}])
    base = {"source": "hf", "path": str(d), "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25,
            "extra": {"cache_dir": str(tmp_path / "hf-cache")}}
    held = HubSource(DataConfig(**base))
    train, val = (list(held.documents(s)) for s in ("train", "val"))
    assert sorted(t for _, t in train + val) == sorted(TEXTS) and val
    explicit = make_source(DataConfig(**base, val_split="validation", streaming=True))
    assert [t for _, t in explicit.documents("val")] == ["held out"]
    assert [t for _, t in explicit.documents("train")] == TEXTS
    assert explicit.fingerprint() != held.fingerprint()
    with pytest.raises(MoeforgeError, match="data.text_field: column 'body'"):
        list(HubSource(DataConfig(**base, text_field="body")).documents("train"))
    with pytest.raises(MoeforgeError, match="data.path: cannot load dataset"):
        list(HubSource(DataConfig(**{**base, "path": str(tmp_path / "missing")})).documents("train"))
