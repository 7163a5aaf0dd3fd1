"""Run untrusted Python code in a separate, limited process, never in the trainer's process.

Each run gets a fresh ``python -I`` child started in its own session, in a throwaway temporary directory
(deleted afterwards), with an empty environment. That child is a small launcher (this file run as a
script) that sets everything up *before* the candidate code runs:

1. Namespaces, when the OS allows: as root (or through a new user namespace otherwise) a new network
   namespace (only a downed loopback, so no network at all), a new mount namespace in which every mount is
   remounted read-only except a bind mount of the work directory, and a new PID namespace (when its init
   process dies the kernel kills every process in it).
2. It forks; the child (PID 1 of the new namespace) sets rlimits (CPU seconds, address space, file size,
   processes, open files, no core files), and, when running as root, drops to a per-run unprivileged uid
   (RLIMIT_NPROC is not enforced for root, so this is what makes the process limit real), then asks for
   SIGKILL when the launcher dies. It then forks the candidate's process and stays as a reaper (PID 1
   ignores signals such as SIGXCPU). If the interpreter lives below a directory other users cannot enter
   (e.g. /root/.pyenv), the mount namespace covers that directory with a tmpfs holding only the
   interpreter; without a mount namespace the child stays root and forking is refused by the audit hook.
3. Where a namespace could not be made, an audit hook stands in (network: socket creation/connect/bind
   refused; filesystem: writes outside the work directory, process spawning and ctypes refused). Audit
   hooks are a best-effort guard, not a security boundary; ``SandboxResult.isolation`` says which was used.

The trainer enforces a wall-clock timeout by killing the whole process group (and so the PID namespace),
then kills anything still running under the run's private uid.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

# shutil, subprocess, tempfile and concurrent.futures are imported inside the trainer-side functions, so
# that the launcher (this file run as a script) does not preload _posixsubprocess for the candidate.

_TAIL = 4000
_UID_BASE, _UID_SPAN = 61000, 4000
_uid_lock = threading.Lock()
_uid_next = [0]


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    wall_s: float = 10.0  # wall-clock timeout; the process group is killed after it
    cpu_s: int = 5  # RLIMIT_CPU per process
    memory_mb: int = 512  # RLIMIT_AS per process
    fsize_mb: int = 16  # RLIMIT_FSIZE: largest file (stdout/stderr included) a process may write
    nproc: int = 16  # RLIMIT_NPROC: processes + threads of the sandbox uid
    nofile: int = 64  # RLIMIT_NOFILE

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                from model.errors import ConfigError

                raise ConfigError(f"sandbox.{name}", f"must be > 0, got {value!r}")


@dataclass
class SandboxResult:
    """What happened to one candidate."""

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    reason: str
    wall_s: float
    isolation: dict = field(default_factory=dict)


def run_python(
    code: str, limits: SandboxLimits | None = None, *, force_fallback: bool = False
) -> SandboxResult:
    """Run ``code`` as a script in a sandboxed child process and report how it ended.

    ``force_fallback`` skips the namespaces and uses only the audit-hook guards (for tests of that path).
    """
    import shutil
    import tempfile

    limits = limits or SandboxLimits()
    limits.validate()
    workdir = tempfile.mkdtemp(prefix="moeforge-sbx-")
    try:
        return _run_in(workdir, code, limits, force_fallback)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(
    codes: list[str], limits: SandboxLimits | None = None, *, max_workers: int = 4
) -> list[SandboxResult]:
    """Run several candidates concurrently (a small thread pool, one sandboxed process each), in order."""
    from concurrent.futures import ThreadPoolExecutor

    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(codes)))) as pool:
        return list(pool.map(lambda c: run_python(c, limits), codes))


def _next_uid() -> int:
    with _uid_lock:
        _uid_next[0] += 1
        return _UID_BASE + (os.getpid() * 131 + _uid_next[0]) % _UID_SPAN


def _run_in(workdir: str, code: str, limits: SandboxLimits, force_fallback: bool) -> SandboxResult:
    import subprocess
    import tempfile

    uid = _next_uid() if os.geteuid() == 0 else None
    with open(os.path.join(workdir, "candidate.py"), "w") as f:
        f.write(code)
    spec = {"workdir": workdir, "limits": asdict(limits), "uid": uid, "force_fallback": force_fallback}
    spec_path = os.path.join(workdir, ".spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if uid is not None:
        os.chown(workdir, uid, uid)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "PYTHONDONTWRITEBYTECODE": "1"}
    status_r, status_w = os.pipe()
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), spec_path, str(status_w)],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, pass_fds=(status_w,), close_fds=True,
            )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)
        proc.wait()
        if uid is not None:
            _kill_uid(uid)
        wall = time.monotonic() - start
        isolation = _read_status(status_r)
        stdout, stderr = _tail(out), _tail(err)
    rc = proc.returncode
    passed = rc == 0 and not timed_out
    return SandboxResult(passed, rc, timed_out, stdout, stderr, _reason(rc, timed_out, stderr, limits),
                         wall, isolation)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int, patience_s: float = 5.0) -> None:
    """SIGKILL every process still owned by this run's private uid, until none is left."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner(p) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _read_status(fd: int) -> dict:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks).decode() or "{}")
    except json.JSONDecodeError:
        return {"error": "launcher status unreadable"}


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - _TAIL))
    return f.read().decode("utf-8", errors="replace")


def _reason(rc: int | None, timed_out: bool, stderr: str, limits: SandboxLimits) -> str:
    if timed_out:
        return f"wall-clock timeout after {limits.wall_s}s"
    if rc == 0:
        return "ok"
    if rc is not None and rc >= 128:
        rc = -(rc - 128)  # the launcher re-reports a signal death of its child as 128 + signal
    if rc is not None and rc < 0:
        sig = -rc
        names = {signal.SIGXCPU: "cpu limit", signal.SIGXFSZ: "file-size limit", signal.SIGKILL: "killed"}
        return f"signal {signal.Signals(sig).name}" + (f" ({names[sig]})" if sig in names else "")
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"exit {rc}: {last[-1][:300] if last else 'no stderr'}"


# ----------------------------------------------------------------------------------------------------------
# Everything below runs in the launcher process (this file executed as a script with ``python -I``).
# It must only use the standard library.

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME, _MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_PR_SET_PDEATHSIG = 1
_MNT_DETACH = 2


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter_namespaces(libc, root: bool) -> dict:
    """Unshare net + mount + pid namespaces (through a user namespace when not root)."""
    flags = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID
    if root:
        _check(libc.unshare(flags), "unshare")
        return {"namespaces": "net+mnt+pid"}
    _new_user_ns(libc, flags)
    return {"namespaces": "user+net+mnt+pid"}


def _new_user_ns(libc, flags: int) -> None:
    """Unshare a user namespace (plus ``flags``) in which we are root, mapped to our current ids."""
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(flags | _CLONE_NEWUSER), "unshare(user)")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _mount_points() -> list[tuple[str, set[str]]]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            path = parts[4].encode().decode("unicode_escape")
            points.append((path, set(parts[5].split(","))))
    return points


def _readonly_except(libc, workdir: str, keep_rw: tuple[str, ...] = ()) -> int:
    """Make every mount read-only except a bind mount of ``workdir`` (and ``keep_rw``); return how many
    remounts failed."""
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    _check(libc.mount(workdir.encode(), workdir.encode(), None, _MS_BIND, None), "bind workdir")
    _expose_python(libc, workdir)
    failed = 0
    keep = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
            "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME}
    for path, opts in _mount_points():
        if path == workdir or path in keep_rw:
            continue
        extra = sum(bit for name, bit in keep.items() if name in opts)
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | extra
        if libc.mount(None, path.encode(), None, flags, None) != 0:
            if path == "/":
                raise OSError("remounting / read-only failed")
            failed += 1
    return failed


def _hidden_python_dirs() -> dict[str, list[str]]:
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


def _expose_python(libc, workdir: str) -> None:
    """In our mount namespace, cover each hidden ancestor with an empty tmpfs holding only the interpreter."""
    for n, (ancestor, paths) in enumerate(_hidden_python_dirs().items()):
        stages = []
        for i, path in enumerate(paths):
            stage = os.path.join(workdir, f".stage-{n}-{i}")
            os.mkdir(stage)
            _check(libc.mount(path.encode(), stage.encode(), None, _MS_BIND | _MS_REC, None), "stage bind")
            stages.append((stage, path))
        _check(libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", 0, b"mode=0755"), f"tmpfs on {ancestor}")
        for stage, path in stages:
            os.makedirs(path, exist_ok=True)
            _check(libc.mount(stage.encode(), path.encode(), None, _MS_BIND | _MS_REC, None), "bind back")
            _check(libc.umount2(stage.encode(), _MNT_DETACH), "unstage")
            os.rmdir(stage)


def _set_limits(lim: dict, sandbox_uid: int | None) -> None:
    import resource

    mb = 1 << 20
    nproc = lim["nproc"]
    if sandbox_uid is None:  # same uid as the caller: the limit counts the caller's processes as well
        uid = os.getuid()
        nproc += sum(1 for p in os.listdir("/proc") if p.isdigit() and _owner(p) == uid)
    for res, value in [
        (resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
        (resource.RLIMIT_AS, (lim["memory_mb"] * mb,) * 2),
        (resource.RLIMIT_FSIZE, (lim["fsize_mb"] * mb,) * 2),
        (resource.RLIMIT_NPROC, (nproc,) * 2),
        (resource.RLIMIT_NOFILE, (lim["nofile"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]:
        resource.setrlimit(res, value)


def _owner(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


_SPAWNERS = ("_posixsubprocess", "subprocess", "multiprocessing")


def _install_guards(workdir: str, *, block_net: bool, block_fs: bool, block_fork: bool) -> None:
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
        spawner_import = event == "import" and args[0] in _SPAWNERS
        if block_fork and (event in ("os.fork", "os.forkpty") or spawner_import):
            raise PermissionError("sandbox: fork disabled (running as root, RLIMIT_NPROC not enforced)")
        if not block_fs:
            return
        if event in spawn_events or (event == "import" and args[0] in _SPAWNERS + ("ctypes", "_ctypes")):
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


def _child(spec: dict, libc, status: dict) -> None:
    """The sandbox's first process: limits, privilege drop, guards, then the candidate. Never returns."""
    workdir, uid = spec["workdir"], spec["uid"]
    os.chdir(workdir)  # re-enter through the writable bind mount
    _set_limits(spec["limits"], uid)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    if status["pid"] == "pidns":  # PID 1 ignores signals it has no handler for (SIGXCPU...): stay a reaper
        pid = os.fork()
        if pid:
            _relay(pid)
    with open("candidate.py") as f:
        code = f.read()
    _install_guards(workdir, block_net=status["network"] != "netns",
                    block_fs=status["filesystem"] != "read-only mounts", block_fork=os.getuid() == 0)
    sys.argv = ["candidate.py"]
    sys.path.insert(0, workdir)
    rc = 0
    try:
        exec(compile(code, "candidate.py", "exec"), {"__name__": "__main__", "__file__": "candidate.py"})
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report any failure of the candidate as a non-zero exit
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _relay(pid: int) -> None:
    """Wait for ``pid`` and exit with its status (a signal death becomes 128 + signal)."""
    _, wstatus = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wstatus)
    os._exit(code if code >= 0 else 128 - code)


def _launcher(spec_path: str, status_fd: int) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.remove(spec_path)
    root = os.geteuid() == 0
    status = {"network": "audit-hook", "filesystem": "audit-hook", "pid": "process-group",
              "user": f"uid {spec['uid']}" if spec["uid"] is not None else "caller's uid"}
    libc = None
    try:
        libc = _libc()
        if not spec["force_fallback"]:
            status.update(_enter_namespaces(libc, root))
            status["network"], status["pid"] = "netns", "pidns"
            # without root, /proc stays writable to set up the nested user namespace below
            failed = _readonly_except(libc, spec["workdir"], () if root else ("/proc",))
            if not root:  # our user namespace could undo the remounts: copy them into a nested one, locked
                _new_user_ns(libc, _CLONE_NEWNS)
                status["namespaces"] += " (mounts locked in a nested user namespace)"
            status["filesystem"] = "read-only mounts"
            status["remount_failures"] = failed
    except OSError as e:
        status["namespace_error"] = str(e)
    if spec["uid"] is not None and status["filesystem"] != "read-only mounts" and _hidden_python_dirs():
        spec["uid"] = None  # an unprivileged uid could not even import the standard library
        status["user"] = "root (interpreter unreadable by other users); fork blocked by audit hook instead"
    with os.fdopen(status_fd, "w") as f:
        json.dump(status, f)
    pid = os.fork()
    if pid == 0:
        _child(spec, libc, status)
    _relay(pid)


if __name__ == "__main__":
    _launcher(sys.argv[1], int(sys.argv[2]))
