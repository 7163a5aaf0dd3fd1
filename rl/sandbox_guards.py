"""Sandbox launcher, part 2: resource limits and the audit-hook guards of the candidate's process.

Runs only in the launcher process (rl/sandbox_launcher.py, with rl/ on sys.path; standard library and
rl/sandbox.py only). `set_limits` applies the rlimits of `SandboxLimits`; `install_guards` stands in, with
an audit hook, for whatever isolation the namespaces could not provide.
"""

from __future__ import annotations

import os
import sys

from sandbox import pids_of


def set_limits(lim: dict, sandbox_uid: int | None) -> None:
    import resource

    mb = 1 << 20
    nproc = lim["nproc"]
    if sandbox_uid is None:  # same uid as the caller: the limit counts the caller's processes as well
        uid = os.getuid()
        nproc += len(pids_of(uid))
    for res, value in [
        (resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
        (resource.RLIMIT_AS, (lim["memory_mb"] * mb,) * 2),
        (resource.RLIMIT_FSIZE, (lim["fsize_mb"] * mb,) * 2),
        (resource.RLIMIT_NPROC, (nproc,) * 2),
        (resource.RLIMIT_NOFILE, (lim["nofile"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]:
        resource.setrlimit(res, value)


SPAWNERS = ("_posixsubprocess", "subprocess", "multiprocessing")


def install_guards(workdir: str, *, block_net: bool, block_fs: bool, block_fork: bool) -> None:
    """Audit-hook fallback for whatever the namespaces could not isolate."""
    import socket

    net_events = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"}
    two_paths = {"os.rename", "os.symlink", "os.link", "shutil.copyfile", "shutil.move"}
    fs_events = two_paths | {"os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown",
                             "os.utime", "shutil.rmtree"}
    spawn_events = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
                    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    root = os.path.realpath(workdir)

    def inside(path) -> bool:
        if not isinstance(path, str | bytes | os.PathLike):
            return True  # file descriptors and the like
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep)

    def hook(event, args):
        if block_net and event in net_events:
            if event == "socket.__new__" and len(args) > 1 and args[1] == socket.AF_UNIX:
                return
            raise PermissionError(f"sandbox: network disabled ({event})")
        spawner_import = event == "import" and args[0] in SPAWNERS
        if block_fork and (event in ("os.fork", "os.forkpty") or spawner_import):
            raise PermissionError("sandbox: fork disabled (running as root, RLIMIT_NPROC not enforced)")
        if not block_fs:
            return
        if event in spawn_events or (event == "import" and args[0] in SPAWNERS + ("ctypes", "_ctypes")):
            raise PermissionError(f"sandbox: {event} {args[0] if event == 'import' else ''}disabled")
        if event == "open":
            mode, flags = args[1], args[2]
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            paths = args[:1] if writes else ()
        else:
            paths = args[:2] if event in two_paths else args[:1] if event in fs_events else ()
        if not all(inside(p) for p in paths):
            raise PermissionError(f"sandbox: write outside the work directory ({event})")

    sys.addaudithook(hook)
