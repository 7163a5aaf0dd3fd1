import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # lets the tests import dist_harness under --import-mode=importlib
    sys.path.insert(0, HERE)
