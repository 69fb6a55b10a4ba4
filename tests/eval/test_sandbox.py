"""The hostile battery: every program is contained, scored failed with a reason, host unaffected."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codegemma.eval.execution import execute
from codegemma.eval.sandbox import MARKER_VAR, Limits, Sandbox, host_tag, host_uids, remove_tree
from codegemma.eval.tasks import Task

HERE = Path(__file__).parent
CHECK = "def check(candidate):\n    assert candidate() == 1\n    assert candidate() == 1\n"
LIMITS = Limits(timeout_s=2.0, memory_bytes=512 << 20, max_output_bytes=16 << 10)


def sandbox_processes() -> set[int]:
    """Processes of our sandboxes' uids, or carrying our sandboxes' marker: none may outlive a run.

    Scoped to this test process, so another pytest worker's evaluation running beside it is not
    mistaken for a survivor of ours."""
    uids = host_uids()
    marker = f"{MARKER_VAR}={host_tag()}".encode()
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        uid = int(status.split("Uid:")[1].split()[0])
        if "State:\tZ" not in status and (uid in uids or marker in environ):
            found.add(int(pid))
    return found


def sandbox_dirs() -> set[str]:
    return {p for p in os.listdir("/tmp") if p.startswith(f"codegemma-sandbox-{host_tag()}")}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(LIMITS) as sb:
        yield sb


@pytest.fixture
def host(tmp_path):
    before = sandbox_dirs()
    yield
    deadline = time.monotonic() + 2
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == set(), "a sandboxed process survived its run"
    assert sandbox_dirs() <= before, "a sandbox working directory was left behind"


def score(sandbox: Sandbox, body: str):
    task = Task(
        task_id="hostile/0",
        prompt="def f():\n",
        canonical_solution="    return 1\n",
        test=CHECK,
        entry_point="f",
        kind="humaneval",
    )
    return execute(task, body, sandbox=sandbox)


def failed(result, *reasons: str) -> None:
    assert not result.passed, result
    assert any(r in result.reason for r in reasons), result.reason


def test_a_correct_program_passes(sandbox, host):
    r = score(sandbox, "    return 1\n")
    assert r.passed and r.reason == "passed"
    if os.geteuid() == 0 and sys.platform.startswith("linux"):
        assert r.isolation == "full", "root on Linux should get full isolation here"


def test_fork_bomb(sandbox, host):
    if not sandbox.use_uid and not sandbox.use_namespaces:
        pytest.skip("no separate uid and no pid namespace: a fork bomb would hit the host")
    body = "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n"
    t = time.monotonic()
    failed(score(sandbox, body), "timed out", "SIGKILL", "exit code")
    assert time.monotonic() - t < LIMITS.timeout_s + 3


def test_infinite_loop(sandbox, host):
    t = time.monotonic()
    failed(score(sandbox, "    while True:\n        pass\n"), "timed out")
    assert time.monotonic() - t < LIMITS.timeout_s + 2


def test_memory_bomb(sandbox, host):
    failed(score(sandbox, "    x = bytearray(8 << 30)\n    return 1\n"), "MemoryError")
    body = "    xs = []\n    while True:\n        xs.append(bytearray(1 << 24))\n"
    failed(score(sandbox, body), "MemoryError", "timed out")


def test_disk_filler(sandbox, host):
    one_file = "    with open('big', 'wb') as f:\n        while True:\n            f.write(b'x' * (1 << 20))\n"
    failed(score(sandbox, one_file), "SIGXFSZ", "File too large", "No space")
    many = (
        "    import os, tempfile\n    for d in ('.', tempfile.gettempdir(), '/dev/shm'):\n"
        "        for i in range(1000):\n"
        "            with open(os.path.join(d, f'f{i}'), 'wb') as f:\n"
        "                f.write(b'x' * (8 << 20))\n"
    )
    failed(score(sandbox, many), "No space", "SIGXFSZ", "Permission", "File too large")


def test_files_outside_its_directory(sandbox, host):
    sentinel = HERE / f".sentinel-{os.getpid()}"
    sentinel.write_text("keep me")
    sentinel.chmod(0o644)
    try:
        body = (
            f"    import os, shutil\n    p = {str(sentinel)!r}\n"
            "    for attempt in (lambda: os.remove(p), lambda: open(p, 'a').write('x'),\n"
            "                    lambda: open(p + '.new', 'w').write('x'),\n"
            "                    lambda: shutil.rmtree(os.path.dirname(p))):\n"
            "        try:\n            attempt()\n        except OSError:\n            pass\n"
            "    return 0\n"
        )
        r = score(sandbox, body)
        failed(r, "AssertionError")
        assert sentinel.read_text() == "keep me"
        assert not Path(str(sentinel) + ".new").exists()
        assert (HERE / "test_sandbox.py").exists()
    finally:
        sentinel.unlink()


def test_reading_the_users_home_and_private_files(sandbox, host):
    if not sandbox.use_uid:
        pytest.skip("runs under our own uid: our files are its files")
    secret_dir = HERE / f".private-{os.getpid()}"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "key").write_text("SECRET-VALUE")
    home = os.path.expanduser("~")
    try:
        body = (
            f"    import os\n    for p in ({str(secret_dir / 'key')!r}, {home!r} + '/.bashrc',\n"
            f"              {home!r} + '/.profile', {home!r} + '/.gitconfig'):\n"
            "        try:\n            print(open(p).read())\n        except OSError as e:\n"
            "            print('denied', type(e).__name__)\n"
            f"    try:\n        print(os.listdir({home!r}))\n    except OSError:\n"
            "        print('denied listing')\n    return 0\n"
        )
        r = score(sandbox, body)
        failed(r, "AssertionError")
        assert "SECRET-VALUE" not in r.stdout
        real = set(os.listdir(home)) - {".pyenv"}  # Python's own files may be bound back in
        assert not any(name in r.stdout for name in real if len(name) > 4), r.stdout
    finally:
        remove_tree(str(secret_dir))


def test_opening_a_socket(sandbox, host):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted = []
    done = threading.Event()

    def accept():
        while not done.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    t = threading.Thread(target=accept)
    t.start()
    body = (
        f"    import socket\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    s.sendall(b'exfiltrate')\n    return 1\n"
    )
    r = score(sandbox, body)
    time.sleep(0.2)
    done.set()
    t.join()
    server.close()
    if not sandbox.use_namespaces and "no network namespace" in r.isolation:
        pytest.skip(f"network isolation unavailable here: {r.isolation}")
    failed(r, "OSError", "ConnectionRefused", "unreachable", "timed out", "Network")
    assert accepted == []


def test_killing_its_parent_and_others(sandbox, host):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        body = (
            f"    import os, signal\n    for pid in (os.getppid(), {victim.pid}, {os.getpid()}):\n"
            "        try:\n            os.kill(pid, signal.SIGKILL)\n"
            "        except OSError:\n            pass\n    return 0\n"
        )
        if not sandbox.use_uid and not sandbox.use_namespaces:
            pytest.skip("same uid, same pid namespace: nothing stops it")
        r = score(sandbox, body)
        failed(r, "AssertionError", "SIGKILL")
        assert victim.poll() is None, "the sandbox killed a host process"
    finally:
        victim.kill()
        victim.wait()


def test_daemon_left_behind(sandbox, host):
    body = (
        "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n"
        "        if os.fork() == 0:\n            os.closerange(0, 64)\n"
        "            while True:\n                time.sleep(0.05)\n        os._exit(0)\n"
        "    time.sleep(0.2)\n    return 0\n"
    )
    failed(score(sandbox, body), "AssertionError")
    # the `host` fixture asserts that the daemon is gone


def test_flooding_stdout(sandbox, host):
    t = time.monotonic()
    failed(score(sandbox, "    while True:\n        print('x' * 1000)\n"), "output limit")
    assert time.monotonic() - t < LIMITS.timeout_s


def test_os_exit_in_the_middle_of_the_tests(sandbox, host):
    body = (
        "    import os\n    global calls\n    calls = globals().get('calls', 0) + 1\n"
        "    if calls == 2:\n        os._exit(0)\n    return 1\n"
    )
    failed(score(sandbox, body), "exited before the tests finished (exit code 0)")


@pytest.mark.parametrize(
    "body",
    [
        # redefine the checker: the test's own `check` is defined after the completion
        "    return 0\ndef check(candidate):\n    pass\n",
        # leave before the tests run
        "    return 0\nimport sys\nsys.exit(0)\n",
        "    return 0\nimport os\nos._exit(0)\n",
        # print what a success might look like, then leave
        "    return 0\nprint('passed')\nimport os\nos._exit(0)\n",
        # swallow the tests into a string literal
        "    return 0\nx = '''\n",
        # make the assertions vacuous by patching builtins the check uses
        "    return 0\nimport builtins\nbuiltins.AssertionError = None\nbuiltins.print = None\n",
        # exit from inside the tests, with success status
        "    raise SystemExit(0)\n",
        # forge the driver's result line
        "    import os\n    os.write(3, b'ok\\n')\n    return 0\n",
        # hide failures in an atexit hook
        "    import atexit, os\n    atexit.register(lambda: os._exit(0))\n    return 0\n",
    ],
)
def test_monkey_patching_the_checker(sandbox, host, body):
    failed(score(sandbox, body), "failed")


def test_patched_builtins_do_not_reach_the_check(sandbox, host):
    task = Task(
        task_id="hostile/abs",
        prompt="def f():\n",
        canonical_solution="    return 1.5\n",
        test="def check(candidate):\n    assert abs(candidate() - 1.5) < 1e-6\n",
        entry_point="f",
        kind="humaneval",
    )
    body = "    import builtins\n    builtins.abs = lambda x: 0\n    return 99\n"
    failed(execute(task, body, sandbox=sandbox), "AssertionError")
    assert execute(task, "    return 1.5\n", sandbox=sandbox).passed


def test_forged_token_line_after_success_fails(sandbox, host):
    r = score(sandbox, "    import os\n    os.write(3, b'x\\n')\n    return 1\n")
    failed(r, "exit code", "failed")


def test_stdin_is_empty_and_env_is_scrubbed(sandbox, host, monkeypatch):
    monkeypatch.setenv("CODEGEMMA_TEST_SECRET", "s3cr3t")
    body = (
        "    import os, sys\n    print(repr(sys.stdin.read()) if sys.stdin else 'closed')\n"
        "    print(sorted(os.environ))\n    print(os.environ.get('CODEGEMMA_TEST_SECRET'))\n"
        "    return 0\n"
    )
    r = score(sandbox, body)
    assert r.stdout.splitlines()[0] in ("''", "closed")
    assert "s3cr3t" not in r.stdout


def test_degraded_mode_contains_the_basics(host):
    with Sandbox(LIMITS, namespaces=False) as sb:
        assert score(sb, "    return 1\n").passed
        failed(score(sb, "    while True:\n        pass\n"), "timed out")
        failed(score(sb, "    while True:\n        print('x' * 1000)\n"), "output limit")
        failed(score(sb, "    x = bytearray(8 << 30)\n"), "MemoryError")
        r = score(
            sb,
            "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n"
            "        os.execv('/bin/sleep', ['sleep', '30'])\n    return 0\n",
        )
        failed(r, "AssertionError")
        assert "degraded" in r.isolation or r.isolation == "full"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="max_open_files"):
        Limits(max_open_files=3)
