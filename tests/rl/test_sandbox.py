"""The sandbox stops hostile candidates, runs good ones, and the calling process keeps going."""

import os
import socket
import uuid
from pathlib import Path

import pytest

from model.errors import ConfigError
from rl.sandbox import SandboxLimits, run_many, run_python

MODES = [pytest.param(False, id="namespaces"), pytest.param(True, id="audit-fallback")]
SHORT = SandboxLimits(wall_s=4, cpu_s=2, memory_mb=512, nproc=8)


def _uid_of(result) -> int | None:
    user = result.isolation.get("user", "")
    return int(user.split()[1]) if user.startswith("uid ") else None


def _procs_of(uid: int) -> list[str]:
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.stat(f"/proc/{p}").st_uid == uid:
                out.append(p)
        except FileNotFoundError:
            pass
    return out


def test_correct_candidate_passes_and_limits_are_set_before_it_runs():
    code = (
        "import os, resource\n"
        "assert resource.getrlimit(resource.RLIMIT_AS)[0] == 256 * 2**20\n"
        "assert resource.getrlimit(resource.RLIMIT_CPU)[0] == 3\n"
        "assert resource.getrlimit(resource.RLIMIT_NPROC)[0] >= 5\n"
        "assert os.environ.get('PYTHONPATH') is None and 'WANDB_MODE' not in os.environ\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "print(open('scratch.txt').read(), os.getuid())\n"
    )
    r = run_python(code, SandboxLimits(wall_s=10, cpu_s=3, memory_mb=256, nproc=5))
    assert r.passed and r.returncode == 0 and not r.timed_out, r
    assert r.stdout.startswith("ok") and r.reason == "ok"
    if os.geteuid() == 0 and r.isolation["filesystem"] == "read-only mounts":
        assert r.stdout.split()[1] != "0"  # ran as the private unprivileged uid, not root


def test_failures_are_reported():
    r = run_python("def f(:\n")
    assert not r.passed and r.returncode == 1 and "SyntaxError" in r.reason
    r = run_python("assert 1 == 2, 'boom'")
    assert not r.passed and "AssertionError: boom" in r.reason


@pytest.mark.parametrize("fallback", MODES)
def test_infinite_loop_is_stopped(fallback):
    r = run_python("while True:\n    pass\n", SandboxLimits(wall_s=3, cpu_s=1), force_fallback=fallback)
    assert not r.passed and r.wall_s < 3 + 2.0
    assert r.timed_out or "SIGXCPU" in r.reason or "SIGKILL" in r.reason


def test_sleeping_candidate_hits_the_wall_clock():
    r = run_python("import time\ntime.sleep(30)\n", SandboxLimits(wall_s=1, cpu_s=5))
    assert r.timed_out and not r.passed and r.wall_s < 3


def test_huge_allocation_fails():
    r = run_python("x = bytearray(10 * 2**30)\nprint('allocated')\n", SHORT)
    assert not r.passed and "allocated" not in r.stdout and "MemoryError" in r.stderr


@pytest.mark.parametrize("fallback", MODES)
def test_fork_bomb_is_contained(fallback):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_python(bomb, SandboxLimits(wall_s=3, cpu_s=2, nproc=8, memory_mb=256), force_fallback=fallback)
    assert not r.passed
    uid = _uid_of(r)
    if uid is not None:  # every process of the run's private uid is gone
        assert _procs_of(uid) == []
    assert run_python("print(1 + 1)").stdout.strip() == "2"  # and the machine still works


@pytest.mark.parametrize("fallback", MODES)
@pytest.mark.parametrize("where", ["/tmp", "/etc"])
def test_writes_outside_the_work_directory_fail(fallback, where):
    target = f"{where}/moeforge-sbx-test-{uuid.uuid4().hex}"
    r = run_python(f"open({target!r}, 'w').write('x')\n", SHORT, force_fallback=fallback)
    try:
        assert not r.passed and not os.path.exists(target), r
    finally:
        if os.path.exists(target):
            os.remove(target)


def test_work_directory_is_deleted_afterwards():
    r = run_python("import os\nprint(os.getcwd())\n")
    assert r.passed and not os.path.exists(r.stdout.strip())


@pytest.mark.parametrize("fallback", MODES)
def test_network_is_unreachable(fallback):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.3)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 2)\nprint('connected')"
    try:
        r = run_python(code, SHORT, force_fallback=fallback)
        assert not r.passed and "connected" not in r.stdout
        expected = "audit-hook" if fallback else ("netns", "audit-hook")
        assert r.isolation["network"] in expected
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_run_many_keeps_order_and_runs_concurrently():
    codes = ["print('a')", "raise SystemExit(2)", "import time\ntime.sleep(0.5)\nprint('c')"] * 2
    results = run_many(codes, SandboxLimits(wall_s=10), max_workers=3)
    assert [r.passed for r in results] == [True, False, True] * 2
    assert results[2].stdout.strip() == "c" and results[1].returncode == 2
    assert run_many([]) == []


def test_bad_limits_name_the_key():
    with pytest.raises(ConfigError, match="sandbox.wall_s"):
        run_python("pass", SandboxLimits(wall_s=0))


def test_file_size_limit():
    r = run_python("open('big.bin', 'wb').write(b'x' * (8 * 2**20))\n", SandboxLimits(fsize_mb=1))
    assert not r.passed and ("File too large" in r.stderr or "SIGXFSZ" in r.reason)


def test_audit_fallback_blocks_ctypes_and_subprocess():
    codes = ["import ctypes\nctypes.CDLL(None).getpid()\n", "import subprocess\nsubprocess.run(['true'])\n"]
    for code in codes:
        r = run_python(code, SHORT, force_fallback=True)
        assert not r.passed and "sandbox:" in r.stderr


REMOUNT_ESCAPE = (
    "import ctypes\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.mount(None, b'/', None, 32 | 4096, None)\n"  # MS_REMOUNT | MS_BIND without MS_RDONLY
    "open(TARGET, 'w').write('x')\n"
)


def _escape_code(target: str) -> str:
    return REMOUNT_ESCAPE.replace("TARGET", repr(target))


def test_candidate_cannot_remount_the_filesystem_writable():
    target = f"/tmp/moeforge-sbx-test-{uuid.uuid4().hex}"
    r = run_python(_escape_code(target), SHORT)
    assert not r.passed and not os.path.exists(target), r


UNPRIVILEGED_SCRIPT = """
import json, os, sys, uuid
sys.path.insert(0, sys.argv[1])
from sandbox import SandboxLimits, run_python
target = "/tmp/moeforge-sbx-test-" + uuid.uuid4().hex
lim = SandboxLimits(wall_s=5, cpu_s=2, nproc=8)
ok = run_python("print(6 * 7)", lim)
write = run_python(ESCAPE.replace("TARGET", repr(target)), lim)
net = run_python("import socket\\nsocket.create_connection(('127.0.0.1', 9), 1)", lim)
print(json.dumps({"ok": [ok.passed, ok.stdout], "write": write.passed, "exists": os.path.exists(target),
                  "net": net.passed, "isolation": ok.isolation}))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv") or not os.path.exists("/usr/bin/python3"),
    reason="needs root, setpriv and a system python to test the unprivileged (user namespace) path",
)
def test_unprivileged_caller_path():
    import json
    import shutil
    import subprocess
    import tempfile

    import rl.sandbox

    where = tempfile.mkdtemp(prefix="moeforge-sbx-unpriv-")
    try:
        os.chmod(where, 0o755)
        modules = sorted(Path(rl.sandbox.__file__).parent.glob("sandbox*.py"))  # trainer side + launcher
        for src in modules:
            shutil.copy(src, where)
        with open(os.path.join(where, "check.py"), "w") as f:
            f.write(UNPRIVILEGED_SCRIPT.replace("ESCAPE", repr(REMOUNT_ESCAPE)))
        for name in [m.name for m in modules] + ["check.py"]:
            os.chmod(os.path.join(where, name), 0o644)
        cmd = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
               os.path.join(where, "check.py"), where]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        shutil.rmtree(where, ignore_errors=True)
    if proc.returncode != 0 and "sandbox" not in proc.stderr:
        pytest.skip(f"system python cannot run the check: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] == [True, "42\n"]
    assert not out["write"] and not out["exists"] and not out["net"]
