import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # lets the tests and the torchrun worker import distill_helpers (importlib mode)
    sys.path.insert(0, HERE)

from distill_helpers import Checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    """The tokenizer (trained once) and a maker of random-init tiny checkpoints."""
    return Checkpoints(tmp_path_factory.mktemp("distill"))

