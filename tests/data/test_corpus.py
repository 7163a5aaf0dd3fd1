from data.corpus import BuiltinCorpus, stdlib_files
from data.split import bucket, split_of


def test_stdlib_files_exclude_tests_and_packages():
    files = stdlib_files()
    assert len(files) > 100 and "os.py" in files and "json/decoder.py" in files
    for f in files:
        parts = f.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), f
        assert not parts[-1].startswith("test_") and f.endswith(".py")


def test_split_disjoint_deterministic_and_complete():
    corpus = BuiltinCorpus(val_fraction=0.2)
    train = [k for k, _ in corpus.documents("train")]
    val = [k for k, _ in corpus.documents("val")]
    again = BuiltinCorpus(val_fraction=0.2)
    assert train == [k for k, _ in again.documents("train")]
    assert not set(train) & set(val)
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.3
    nonempty = {f for f in corpus.files if (corpus.root / f).read_text().strip()}
    assert set(train) | set(val) == nonempty
    assert all(split_of(k, 0.2) == "val" for k in val)
    assert corpus.fingerprint() == again.fingerprint() != BuiltinCorpus(val_fraction=0.3).fingerprint()


def test_bucket_is_uniform_and_stable():
    values = [bucket(str(i)) for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    assert 0.45 < sum(values) / len(values) < 0.55
    assert bucket("abc") == bucket("abc") != bucket("abd")


def test_bad_files_are_skipped(tmp_path):
    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "empty.py").write_text("  \n")
    (tmp_path / "latin.py").write_bytes(b"s = '\xe9\xff'\n")
    for d in ("test", "site-packages"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.py").write_text("y = 2\n")
    (tmp_path / "test_thing.py").write_text("z = 3\n")
    corpus = BuiltinCorpus(val_fraction=0.0, root=tmp_path)
    assert sorted(corpus.files) == ["empty.py", "good.py", "latin.py"]
    assert list(corpus.documents("train")) == [("good.py", "x = 1\n")]
    assert list(corpus.documents("val")) == []


def test_max_documents_caps_each_split():
    corpus = BuiltinCorpus(val_fraction=0.5, max_documents=7)
    assert len(list(corpus.documents("train"))) == 7 == len(list(corpus.documents("val")))
