import sys
from pathlib import Path

import pytest
import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # lets the tests import v4_test_helpers under --import-mode=importlib
    sys.path.insert(0, HERE)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls run far faster on one thread on the shared, oversubscribed CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
