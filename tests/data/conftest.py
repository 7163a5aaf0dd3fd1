import numpy as np
import pytest

from data.config import DataConfig
from data.sources import make_source
from data.tokenizer import build_tokenizer

VOCAB = 512


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moeforge-cache")


@pytest.fixture(scope="session")
def small_cfg(cache_dir):
    """A small slice of the built-in corpus."""
    return DataConfig(cache_dir=str(cache_dir), max_bytes=150_000, max_documents=30, val_fraction=0.2)


@pytest.fixture(scope="session")
def tok(small_cfg):
    return build_tokenizer(small_cfg, VOCAB, make_source(small_cfg))


@pytest.fixture
def rng():
    return np.random.default_rng()
