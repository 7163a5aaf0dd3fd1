"""Sandbox launcher, part 1: OS isolation (network, mount and PID namespaces; a read-only filesystem).

Runs only in the launcher process (rl/sandbox_launcher.py run as a script, standard library only). As root
it unshares the namespaces directly; otherwise through a new user namespace in which it is root. Every
mount is then remounted read-only except a bind mount of the work directory; an interpreter below a
directory other users cannot enter is exposed on a tmpfs so that a dropped uid can still run it.
"""

from __future__ import annotations

import os
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
MNT_DETACH = 2


def libc_handle():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_namespaces(libc, root: bool) -> dict:
    """Unshare net + mount + pid namespaces (through a user namespace when not root)."""
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID
    if root:
        check(libc.unshare(flags), "unshare")
        return {"namespaces": "net+mnt+pid"}
    new_user_ns(libc, flags)
    return {"namespaces": "user+net+mnt+pid"}


def new_user_ns(libc, flags: int) -> None:
    """Unshare a user namespace (plus ``flags``) in which we are root, mapped to our current ids."""
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(flags | CLONE_NEWUSER), "unshare(user)")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def mount_points() -> list[tuple[str, set[str]]]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            path = parts[4].encode().decode("unicode_escape")
            points.append((path, set(parts[5].split(","))))
    return points


def readonly_except(libc, workdir: str, keep_rw: tuple[str, ...] = ()) -> int:
    """Make every mount read-only except a bind mount of ``workdir`` (and ``keep_rw``); return how many
    remounts failed."""
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    check(libc.mount(workdir.encode(), workdir.encode(), None, MS_BIND, None), "bind workdir")
    expose_python(libc, workdir)
    failed = 0
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
    for path, opts in mount_points():
        if path == workdir or path in keep_rw:
            continue
        extra = sum(bit for name, bit in keep.items() if name in opts)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | extra
        if libc.mount(None, path.encode(), None, flags, None) != 0:
            if path == "/":
                raise OSError("remounting / read-only failed")
            failed += 1
    return failed


def hidden_python_dirs() -> dict[str, list[str]]:
    """Interpreter directories below an ancestor that other users cannot enter (e.g. /root/.pyenv)."""
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable))}
    hidden: dict[str, list[str]] = {}
    for path in sorted(needed):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.setdefault(ancestor, []).append(path)
                break
    return hidden


def expose_python(libc, workdir: str) -> None:
    """In our mount namespace, cover each hidden ancestor with an empty tmpfs holding only the interpreter."""
    for n, (ancestor, paths) in enumerate(hidden_python_dirs().items()):
        stages = []
        for i, path in enumerate(paths):
            stage = os.path.join(workdir, f".stage-{n}-{i}")
            os.mkdir(stage)
            check(libc.mount(path.encode(), stage.encode(), None, MS_BIND | MS_REC, None), "stage bind")
            stages.append((stage, path))
        check(libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", 0, b"mode=0755"), f"tmpfs on {ancestor}")
        for stage, path in stages:
            os.makedirs(path, exist_ok=True)
            check(libc.mount(stage.encode(), path.encode(), None, MS_BIND | MS_REC, None), "bind back")
            check(libc.umount2(stage.encode(), MNT_DETACH), "unstage")
            os.rmdir(stage)
