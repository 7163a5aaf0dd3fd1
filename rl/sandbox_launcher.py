"""Sandbox launcher: the script that rl.sandbox.run_python starts as ``python -I sandbox_launcher.py``.

It reads the run's spec, isolates itself (rl/sandbox_namespaces.py), reports what it achieved on the status
pipe, then forks the sandbox's first process, which sets limits, drops privileges, installs the guards
(rl/sandbox_guards.py) and runs the candidate. Standard library (and those sibling files) only; its own
directory is on sys.path for the sibling imports and taken off again before the candidate runs.
"""

from __future__ import annotations

import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    sys.path.insert(0, HERE)  # the sibling modules below (python -I puts no script directory on the path)

from sandbox_guards import install_guards, set_limits  # noqa: E402
from sandbox_namespaces import (  # noqa: E402
    CLONE_NEWNS,
    enter_namespaces,
    hidden_python_dirs,
    libc_handle,
    new_user_ns,
    readonly_except,
)

PR_SET_PDEATHSIG = 1


def child(spec: dict, libc, status: dict) -> None:
    """The sandbox's first process: limits, privilege drop, guards, then the candidate. Never returns."""
    workdir, uid = spec["workdir"], spec["uid"]
    os.chdir(workdir)  # re-enter through the writable bind mount
    set_limits(spec["limits"], uid)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    if status["pid"] == "pidns":  # PID 1 ignores signals it has no handler for (SIGXCPU...): stay a reaper
        pid = os.fork()
        if pid:
            relay(pid)
    with open("candidate.py") as f:
        code = f.read()
    install_guards(workdir, block_net=status["network"] != "netns",
                   block_fs=status["filesystem"] != "read-only mounts", block_fork=os.getuid() == 0)
    sys.argv = ["candidate.py"]
    if HERE in sys.path:
        sys.path.remove(HERE)
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


def relay(pid: int) -> None:
    """Wait for ``pid`` and exit with its status (a signal death becomes 128 + signal)."""
    _, wstatus = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wstatus)
    os._exit(code if code >= 0 else 128 - code)


def launcher(spec_path: str, status_fd: int) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.remove(spec_path)
    root = os.geteuid() == 0
    status = {"network": "audit-hook", "filesystem": "audit-hook", "pid": "process-group",
              "user": f"uid {spec['uid']}" if spec["uid"] is not None else "caller's uid"}
    libc = None
    try:
        libc = libc_handle()
        if not spec["force_fallback"]:
            status.update(enter_namespaces(libc, root))
            status["network"], status["pid"] = "netns", "pidns"
            # without root, /proc stays writable to set up the nested user namespace below
            failed = readonly_except(libc, spec["workdir"], () if root else ("/proc",))
            if not root:  # our user namespace could undo the remounts: copy them into a nested one, locked
                new_user_ns(libc, CLONE_NEWNS)
                status["namespaces"] += " (mounts locked in a nested user namespace)"
            status["filesystem"] = "read-only mounts"
            status["remount_failures"] = failed
    except OSError as e:
        status["namespace_error"] = str(e)
    if spec["uid"] is not None and status["filesystem"] != "read-only mounts" and hidden_python_dirs():
        spec["uid"] = None  # an unprivileged uid could not even import the standard library
        status["user"] = "root (interpreter unreadable by other users); fork blocked by audit hook instead"
    with os.fdopen(status_fd, "w") as f:
        json.dump(status, f)
    pid = os.fork()
    if pid == 0:
        child(spec, libc, status)
    relay(pid)


if __name__ == "__main__":
    launcher(sys.argv[1], int(sys.argv[2]))
