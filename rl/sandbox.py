"""Run untrusted Python code in a separate, limited process, never in the trainer's process.

Each run gets a fresh ``python -I`` child started in its own session, in a throwaway temporary directory
(deleted afterwards), with an empty environment. That child is a small launcher (rl/sandbox_launcher.py
run as a script) that sets everything up *before* the candidate code runs:

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

Modules: this one is the trainer side (limits, starting, timing out and reaping the launcher, the result);
rl/sandbox_launcher.py the launcher script, rl/sandbox_namespaces.py step 1, rl/sandbox_guards.py the rlimits
of step 2 and the audit hooks of step 3. The launcher side uses only the standard library and this module.

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
# that the launcher (which imports this module) does not preload _posixsubprocess for the candidate.

_TAIL = 4000
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
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
                [sys.executable, "-I", LAUNCHER, spec_path, str(status_w)],
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
        pids = pids_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def pids_of(uid: int) -> list[int]:
    """Ids of the live processes owned by ``uid`` (from /proc)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.stat(f"/proc/{p}").st_uid == uid:
                pids.append(int(p))
        except OSError:
            pass
    return pids


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
