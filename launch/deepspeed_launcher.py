"""launcher=deepspeed: a step's processes started by DeepSpeed's launcher, how clusters without SLURM start
multi-node jobs.

    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 --master_port 29500 --no_local_rank \\
        --module train.pretrain parallel=zero3 ...

The hostfile is MPI style (`<host> slots=<n>` per line, `#` comments); DeepSpeed's runner starts
`launcher.nproc_per_node` ranks on each of the first `launcher.nodes` hosts (over pdsh/ssh beyond this
one) with torch.distributed's env:// variables, which the stages read (train.parallel.env). Without a
hostfile, or with one naming only this machine, the ranks start locally without ssh.
"""

from __future__ import annotations

import re
import shlex
import socket
import sys
from pathlib import Path

from launch.launcher import LauncherConfig
from model.errors import ConfigError

RUNNER = (sys.executable, "-m", "deepspeed.launcher.runner")  # what the `deepspeed` command runs
_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")
LOCAL_NAMES = ("localhost", "127.0.0.1")


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """(host, slots) per line of an MPI-style hostfile, in order; ConfigError naming launcher.hostfile."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("launcher.hostfile", f"{path} does not exist")
    hosts: list[tuple[str, int]] = []
    for n, raw in enumerate(file.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ConfigError("launcher.hostfile", f"{path}:{n}: expected '<host> slots=<n>', got {line!r}")
        if any(h == m.group(1) for h, _ in hosts):
            raise ConfigError("launcher.hostfile", f"{path}:{n}: host {m.group(1)} is listed twice")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise ConfigError("launcher.hostfile", f"{path} lists no host")
    return hosts


def check_hosts(lc: LauncherConfig) -> list[tuple[str, int]]:
    """The hosts the job uses (the first `nodes` of the hostfile), each with enough slots."""
    if lc.hostfile is None:
        if lc.nodes > 1:
            raise ConfigError("launcher.hostfile", f"launcher.nodes={lc.nodes} needs a hostfile naming "
                                                   "the nodes")
        return [("localhost", lc.nproc_per_node)]
    hosts = read_hostfile(lc.hostfile)
    if lc.nodes > len(hosts):
        raise ConfigError("launcher.nodes", f"{lc.nodes} nodes but {lc.hostfile} lists {len(hosts)} hosts")
    used = hosts[: lc.nodes]
    short = [f"{h} (slots={s})" for h, s in used if s < lc.nproc_per_node]
    if short:
        raise ConfigError("launcher.nproc_per_node", f"{lc.nproc_per_node} ranks per node do not fit on "
                                                     f"{', '.join(short)} of {lc.hostfile}")
    return used


def is_local(hosts: list[tuple[str, int]]) -> bool:
    return all(h in (*LOCAL_NAMES, socket.gethostname()) for h, _ in hosts)


def deepspeed_argv(module: str, overrides: list[str], lc: LauncherConfig) -> list[str]:
    """The runner command line that starts `python -m module overrides` on every rank."""
    hosts = check_hosts(lc)
    argv = list(RUNNER)
    if lc.hostfile is not None:
        argv += ["--hostfile", str(lc.hostfile), "--num_nodes", str(lc.nodes)]
    if is_local(hosts):  # this machine only: no ssh to it, rendezvous on the loopback
        argv += ["--master_addr", "127.0.0.1"] + (["--no_ssh_check"] if lc.hostfile is not None else [])
    argv += ["--num_gpus", str(lc.nproc_per_node), "--master_port", str(lc.rdzv_port), "--no_local_rank",
             "--module", module, *overrides]
    return argv


def render(argv: list[str]) -> str:
    """The command line as a user would type it (`deepspeed ...`)."""
    if tuple(argv[: len(RUNNER)]) == RUNNER:
        argv = ["deepspeed", *argv[len(RUNNER):]]
    return shlex.join(argv)
