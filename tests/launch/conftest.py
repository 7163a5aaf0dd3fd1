import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def moeforge(*args: str, cwd: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (`python -m launch.cli` = the `moeforge` console script)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"moeforge {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def start_moeforge(*args: str, cwd: Path, log: Path) -> subprocess.Popen:
    """Start the CLI in its own process group (so the test can kill it and its children)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def slurm():
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM client (sinfo); .ci/slurm-up.sh installs and starts the one-node cluster")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    assert "UP" in ping.stdout, f"the SLURM controller is not up: {ping.stdout}{ping.stderr}"


@pytest.fixture
def cli():
    return moeforge


@pytest.fixture
def cli_background():
    return start_moeforge


@pytest.fixture
def wait_until():
    return wait_for
