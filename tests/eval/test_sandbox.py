"""The hostile battery: every program is contained, scored failed with a reason, host unaffected."""

import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pytest

from codegemma.eval.execution import execute
from codegemma.eval.sandbox import (
    MARKER_VAR,
    Limits,
    Sandbox,
    host_tag,
    host_uids,
    namespaces_available,
    remove_tree,
)
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


# -- escapes found by the independent probe: each reproduced as the probe ran it ---------------
def needs_full_isolation(sandbox) -> None:
    if not sandbox.use_namespaces:
        pytest.skip("needs root and namespaces (the probe ran `isolation: full`)")


class UnixListeners:
    """Listening path sockets (mode 0777) and a FIFO (0666) in host places; counts what reaches them."""

    def __init__(self):
        tag = secrets.token_hex(4)
        self.tmpdir = tempfile.mkdtemp(prefix="cg-probe-", dir="/var/tmp")
        os.chmod(self.tmpdir, 0o755)
        self.writable = HERE / f".cg-probe-{tag}"  # a world-writable host directory in the repo
        self.writable.mkdir()
        self.writable.chmod(0o777)
        paths = [
            f"/run/cg-probe-{tag}.sock",
            f"/tmp/cg-probe-{tag}.sock",
            os.path.join(self.tmpdir, "s.sock"),
            str(HERE / f".cg-probe-{tag}.sock"),
            str(self.writable / "s.sock"),
        ]
        site = sysconfig.get_paths()["purelib"]  # a directory the sandbox shows read-only
        if os.access(site, os.W_OK):
            paths.append(os.path.join(site, f"cg-probe-{tag}.sock"))
        self.sockets, self.servers = paths, []
        for p in paths:
            s = socket.socket(socket.AF_UNIX)
            s.bind(p)
            os.chmod(p, 0o777)
            s.listen()
            s.settimeout(0.05)
            self.servers.append(s)
        self.dgram = f"/run/cg-probe-{tag}.dgram"
        d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        d.bind(self.dgram)
        os.chmod(self.dgram, 0o777)
        d.settimeout(0.05)
        self.servers.append(d)
        self.fifo = f"/run/cg-probe-{tag}.fifo"
        os.mkfifo(self.fifo)
        os.chmod(self.fifo, 0o666)
        self.fifo_fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.reached: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self):
        while not self.done.is_set():
            for s in self.servers:
                try:
                    if s.type == socket.SOCK_DGRAM:
                        self.reached.append(f"{s.getsockname()}: {s.recv(100)!r}")
                    else:
                        conn, _ = s.accept()
                        self.reached.append(str(s.getsockname()))
                        conn.close()
                except OSError:
                    pass
            try:
                data = os.read(self.fifo_fd, 100)
                if data:
                    self.reached.append(f"fifo: {data!r}")
            except BlockingIOError:
                pass

    def close(self):
        time.sleep(0.2)
        self.done.set()
        self.thread.join()
        for s in self.servers:
            s.close()
        os.close(self.fifo_fd)
        for p in [*self.sockets, self.dgram, self.fifo]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        remove_tree(self.tmpdir)
        remove_tree(str(self.writable))


def test_unix_sockets_fifos_and_host_directories_are_out_of_reach(sandbox, host):
    needs_full_isolation(sandbox)
    assert score(sandbox, "    return 1\n").passed  # the zygote exists before the listeners do
    probe = UnixListeners()
    tag = secrets.token_hex(4)
    dirs = [
        "/",
        "/run",
        "/run/lock",
        "/tmp",
        "/var/tmp",
        "/dev/shm",
        "/var",
        "/var/lib",
        "/etc",
        "/usr",
        "/usr/local",
        "/root",
        os.path.expanduser("~"),
        str(HERE),
        str(HERE.parents[1]),
        str(probe.writable),
        probe.tmpdir,
        sys.prefix,
        sysconfig.get_paths()["purelib"],
        "/dev",
    ]
    created = [os.path.join(d, f"cg-probe-{tag}") for d in dirs]
    try:
        body = (
            "    import os, socket\n"
            f"    for p in {probe.sockets + [probe.dgram, probe.fifo]!r}:\n"
            "        print('visible' if os.path.lexists(p) else 'absent', p)\n"
            f"    for p in {probe.sockets!r}:\n"
            "        try:\n"
            "            s = socket.socket(socket.AF_UNIX)\n            s.settimeout(1)\n"
            "            s.connect(p)\n            s.sendall(b'escaped')\n            print('connected', p)\n"
            "        except OSError as e:\n            print('refused', p, e)\n"
            "    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):\n"
            "        try:\n"
            "            a, b = socket.socketpair(socket.AF_UNIX, kind)\n"
            f"            a.sendto(b'escaped', {probe.dgram!r})\n            print('sent', kind)\n"
            "        except OSError as e:\n            print('refused socketpair', kind, e)\n"
            "    try:\n"
            f"        fd = os.open({probe.fifo!r}, os.O_WRONLY | os.O_NONBLOCK)\n"
            "        os.write(fd, b'escaped')\n        print('wrote fifo')\n"
            "    except OSError as e:\n        print('refused fifo', e)\n"
            f"    for p in {created!r}:\n"
            "        try:\n"
            "            with open(p, 'w') as f:\n                f.write('escaped')\n"
            "            print('created', p)\n"
            "        except OSError as e:\n            print('refused', p, e)\n"
            "    return 1\n"
        )
        r = sandbox.run("def f():\n" + body, check=CHECK, call=("check", "f"))  # all of stdout
    finally:
        probe.close()
    assert probe.reached == [], (probe.reached, r.stdout)
    # Two layers: outside the bound system and interpreter trees nothing of the host exists for
    # the run, and no AF_UNIX socket can be made to connect anywhere (socketpairs excepted).
    site = sysconfig.get_paths()["purelib"]
    for p in [*probe.sockets, probe.dgram, probe.fifo]:
        if not p.startswith(site):
            assert f"absent {p}" in r.stdout, r.stdout
    reached = [x for x in r.stdout.splitlines() if x.startswith(("connected ", "sent ", "wrote "))]
    assert reached == [], r.stdout
    leaked = [p for p in created if os.path.exists(p)]
    for p in leaked:
        os.unlink(p)
    assert leaked == [], r.stdout
    # its private directories work: the program could write to them, and they are gone
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run"):
        assert f"created {d}/cg-probe-{tag}" in r.stdout, r.stdout
    assert r.completed, r  # a correct program still passes


READ_ONLY_PROBE = """
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
d = sys.argv[1]
assert libc.unshare(0x20000) == 0  # CLONE_NEWNS
assert libc.mount(b"none", b"/", None, 16384 | (1 << 18), None) == 0  # MS_REC | MS_PRIVATE
assert libc.mount(d.encode(), d.encode(), None, 4096, None) == 0  # MS_BIND
assert libc.mount(None, d.encode(), None, 32 | 4096 | 1, None) == 0  # remount, bind, rdonly
os.setgid(65534)
os.setuid(65534)
try:
    open(os.path.join(d, "new"), "w")
except OSError as e:
    print("create", e.errno)
s = socket.socket(socket.AF_UNIX)
s.connect(os.path.join(d, "s.sock"))
print("connected")
os.open(os.path.join(d, "f.fifo"), os.O_WRONLY | os.O_NONBLOCK)
print("fifo opened")
"""


def test_a_read_only_mount_does_not_stop_connect_or_fifo_writes(tmp_path):
    """The premise of covering sockets and FIFOs in the read-only trees, checked on this kernel:
    a read-only bind refuses new files (EROFS), but a socket on it can still be connected and a
    FIFO on it opened for writing by anyone the modes allow."""
    if not namespaces_available():
        pytest.skip("needs root and mount namespaces")
    d = tempfile.mkdtemp(prefix="cg-ro-", dir="/var/tmp")
    os.chmod(d, 0o755)
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(os.path.join(d, "s.sock"))
        os.chmod(os.path.join(d, "s.sock"), 0o777)
        server.listen()
        os.mkfifo(os.path.join(d, "f.fifo"))
        os.chmod(os.path.join(d, "f.fifo"), 0o666)
        reader = os.open(os.path.join(d, "f.fifo"), os.O_RDONLY | os.O_NONBLOCK)
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY_PROBE, d], capture_output=True, text=True, timeout=30
        )
        os.close(reader)
        assert done.stdout.split("\n")[:3] == ["create 30", "connected", "fifo opened"], done
    finally:
        server.close()
        remove_tree(d)


def test_sockets_and_fifos_in_the_bound_trees_are_covered(host):
    """A socket or FIFO inside a directory the run sees read-only is covered by /dev/null when
    the root is built: read-only alone does not stop a connect() or a FIFO write."""
    if not namespaces_available():
        pytest.skip("needs root and namespaces")
    tree = HERE / f".cg-tree-{secrets.token_hex(4)}"  # bound read-only, like a toolchain's
    sock_path, fifo_path = str(tree / "deep" / "s.sock"), str(tree / "deep" / "f.fifo")
    server = socket.socket(socket.AF_UNIX)
    reader = -1
    try:
        (tree / "deep").mkdir(parents=True)
        server.bind(sock_path)
        os.chmod(sock_path, 0o777)
        server.listen()
        server.setblocking(False)
        os.mkfifo(fifo_path)
        os.chmod(fifo_path, 0o666)
        reader = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
        with Sandbox(LIMITS, read_only=[str(tree)]) as sb:  # a new zygote: it scans the tree
            program = (
                "import os, stat\n"
                f"for p in ({sock_path!r}, {fifo_path!r}):\n"
                "    print(p, stat.S_ISCHR(os.stat(p).st_mode))\n"
                "try:  # the cover is /dev/null; under a nodev mount opening it is refused\n"
                f"    fd = os.open({fifo_path!r}, os.O_WRONLY | os.O_NONBLOCK)\n"
                "except PermissionError:\n"
                "    print('refused')\n"
                "else:\n"
                "    os.write(fd, b'escaped')\n"
            )
            r = sb.run(program)
        assert r.completed, r
        assert f"{sock_path} True" in r.stdout and f"{fifo_path} True" in r.stdout, r.stdout
        with pytest.raises(BlockingIOError):
            server.accept()
        try:
            data = os.read(reader, 100)  # b"": no writer ever reached this FIFO
        except BlockingIOError:
            data = b""
        assert data == b""
    finally:
        server.close()
        if reader >= 0:
            os.close(reader)
        remove_tree(str(tree))


def test_a_toolchain_directory_is_shown_read_only_and_nothing_beside_it(tmp_path, host):
    """`Sandbox(read_only=...)`: what a compiled language's steps will need (a compiler's
    directory) is bound read-only; its siblings stay out of the run."""
    if not namespaces_available():
        pytest.skip("needs root and namespaces")
    tool = tmp_path / "toolchain"
    (tool / "bin").mkdir(parents=True)
    (tool / "bin" / "cc").write_text("#!/bin/sh\necho compiled\n")
    (tool / "bin" / "cc").chmod(0o755)
    (tmp_path / "private.txt").write_text("not for the run")
    with Sandbox(LIMITS, read_only=[str(tool)]) as sb:
        program = (
            "import os, subprocess\n"
            f"print(subprocess.run([{str(tool / 'bin' / 'cc')!r}], capture_output=True, text=True).stdout)\n"
            f"print('sibling', os.path.exists({str(tmp_path / 'private.txt')!r}))\n"
            "try:\n"
            f"    open({str(tool / 'new')!r}, 'w')\n"
            "except OSError as e:\n    print('write', e.errno)\n"
        )
        r = sb.run(program)
    assert r.completed, r
    assert r.stdout.split("\n") == ["compiled", "", "sibling False", "write 30", ""], r.stdout


SYSV_IPC = (
    "    import ctypes\n"
    "    libc = ctypes.CDLL(None, use_errno=True)\n"
    "    flags = 0o1000 | 0o666  # IPC_CREAT | 0666\n"
    "    print('shm', libc.shmget({key}, 4096, flags))\n"
    "    print('msg', libc.msgget({key}, flags))\n"
    "    print('sem', libc.semget({key}, 1, flags))\n"
    "    return 1\n"
)


def sysv_objects(key: int) -> list[str]:
    """Host System V IPC objects with this key, or owned by a sandbox uid."""
    uids = host_uids()
    found = []
    for kind in ("shm", "msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        head = lines[0].split()
        for line in lines[1:]:
            row = dict(zip(head, line.split(), strict=False))
            if int(row["key"]) == key or int(row["uid"]) in uids:
                found.append(f"{kind} {line}")
    return found


def remove_sysv(key: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    shm, msg, sem = libc.shmget(key, 0, 0), libc.msgget(key, 0), libc.semget(key, 0, 0)
    if shm >= 0:
        libc.shmctl(shm, 0, None)  # IPC_RMID
    if msg >= 0:
        libc.msgctl(msg, 0, None)
    if sem >= 0:
        libc.semctl(sem, 0, 0)


def test_system_v_ipc_dies_with_the_run(sandbox, host):
    needs_full_isolation(sandbox)
    if not Path("/proc/sysvipc/shm").exists():
        pytest.skip("no /proc/sysvipc on this kernel")
    key = 0x5C000000 + secrets.randbelow(1 << 20)
    try:
        r = score(sandbox, SYSV_IPC.format(key=key))
        made = {line.split()[0] for line in r.stdout.splitlines() if not line.endswith(" -1")}
        assert made == {"shm", "msg", "sem"}, r.stdout  # the run could make all three, privately
        assert sysv_objects(key) == []
    finally:
        remove_sysv(key)


FRAME_WALK = (  # the probe's four lines, at module level
    "    return 0\n"
    "import sys, os\n"
    "f = sys._getframe().f_back\n"
    "while f is not None and not ('token' in f.f_locals and 'result_fd' in f.f_locals): f = f.f_back\n"
    "os.write(f.f_locals['result_fd'], (f.f_locals['token'] + '\\n').encode()); os._exit(0)\n"
)
# Every place the driver might keep a secret, every descriptor it might write to.
FORGE = (
    "    return 0\n"
    "import gc, os, re, sys\n"
    "HEX = re.compile(rb'[0-9a-f]{{32}}')\n"
    "def forge(secrets):\n"
    "    # one line per descriptor (a result line with garbage around it would not count)\n"
    "    line = secrets[0] + b'\\n' if secrets else b'passed\\n'\n"
    "    lines = [b'passed ' + s + b'\\n' for s in secrets] + [b'passed\\n']\n"
    "    for fd in range(3, 256):\n"
    "        try:\n            os.write(fd, line)\n"
    "        except OSError:\n            pass\n"
    "    for d in ('/proc/1/fd', f'/proc/{{os.getppid()}}/fd'):\n"
    "        try:\n            names = os.listdir(d)\n"
    "        except OSError:\n            continue\n"
    "        for n in names:\n"
    "            try:\n                fd = os.open(f'{{d}}/{{n}}', os.O_WRONLY)\n"
    "            except OSError:\n                continue\n"
    "            for line in lines[:200]:\n"
    "                try:\n                    os.write(fd, line)\n"
    "                except OSError:\n                    break\n"
    "    os._exit(0)\n"
    "{find}\n"
)
FIND_IN_FRAMES = (
    "found = []\n"
    "f = sys._getframe()\n"
    "while f is not None:\n"
    "    for scope in (f.f_locals, f.f_globals):\n"
    "        for v in list(scope.values()):\n"
    "            if isinstance(v, str) and HEX.fullmatch(v.encode()):\n"
    "                found.append(v.encode())\n"
    "            if isinstance(v, dict):\n"
    "                found += [x.encode() for x in v.values() if isinstance(x, str) and HEX.fullmatch(x.encode())]\n"
    "            for cell in getattr(v, '__closure__', None) or ():\n"
    "                c = cell.cell_contents\n"
    "                if isinstance(c, str) and HEX.fullmatch(c.encode()):\n"
    "                    found.append(c.encode())\n"
    "    f = f.f_back\n"
    "forge(found)\n"
)
FIND_IN_GC = (
    "found = []\n"
    "for o in gc.get_objects():\n"
    "    for v in (o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()):\n"
    "        if isinstance(v, str) and HEX.fullmatch(v.encode()):\n"
    "            found.append(v.encode())\n"
    "forge(found)\n"
)
FIND_IN_MEMORY = (
    "import ctypes\n"
    "ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: /proc/self/mem becomes ours\n"
    "found = []\n"
    "with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:\n"
    "    for line in maps:\n"
    "        addr, perms = line.split()[:2]\n"
    "        lo, hi = (int(x, 16) for x in addr.split('-'))\n"
    "        if 'r' not in perms or 'w' not in perms or hi - lo > 1 << 28:\n"
    "            continue\n"
    "        try:\n            mem.seek(lo)\n            chunk = mem.read(hi - lo)\n"
    "        except (OSError, ValueError, OverflowError):\n            continue\n"
    "        found += re.findall(rb'(?<![0-9a-f])([0-9a-f]{32})(?![0-9a-f])', chunk)\n"
    "import collections\n"
    "forge([s for s, _ in collections.Counter(found).most_common()])\n"
)


ATTACK_THE_CHECKER = (  # read the checker's memory, take its descriptors, or kill it
    "import ctypes, signal\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "found = []\n"
    "for pid in (1, os.getppid()):\n"
    "    print('attach', pid, libc.ptrace(16, pid, None, None), ctypes.get_errno())\n"
    "    try:\n"
    "        with open(f'/proc/{pid}/mem', 'rb') as m:\n"
    "            found += HEX.findall(m.read(1 << 20))\n"
    "    except OSError as e:\n        print('mem', pid, e)\n"
    "    try:\n"
    "        pidfd = os.pidfd_open(pid)\n"
    "        for n in range(3, 16):\n"
    "            try:\n                fd = libc.syscall(438, pidfd, n, 0)  # pidfd_getfd\n"
    "                if fd >= 0:\n                    os.write(fd, b'passed\\n')\n"
    "            except OSError:\n                pass\n"
    "    except OSError as e:\n        print('pidfd', pid, e)\n"
    "    try:\n        os.kill(pid, signal.SIGKILL)\n"
    "    except OSError as e:\n        print('kill', pid, e)\n"
    "forge(found)\n"
)


@pytest.mark.parametrize(
    "body",
    [
        FRAME_WALK,
        FORGE.format(find=FIND_IN_FRAMES),
        FORGE.format(find=FIND_IN_GC),
        FORGE.format(find=FIND_IN_MEMORY),
        FORGE.format(find="forge([])"),  # the result descriptor's number alone
        FORGE.format(find=ATTACK_THE_CHECKER),
    ],
    ids=[
        "probe-frame-walk",
        "frames-globals-closures",
        "gc-objects",
        "proc-self-mem",
        "fd-numbers",
        "ptrace-or-kill-the-checker",
    ],
)
def test_a_pass_cannot_be_forged_from_inside(sandbox, host, body):
    failed(score(sandbox, body), "failed")


def test_shadowing_a_builtin_the_check_uses_does_not_pass(sandbox, host):
    task = Task(
        task_id="hostile/abs-global",
        prompt="def f():\n",
        canonical_solution="    return 1.5\n",
        test="def check(candidate):\n    assert abs(candidate() - 1.5) < 1e-6\n",
        entry_point="f",
        kind="humaneval",
    )
    body = "    return 99\nabs = lambda x: 0\nimport math\nmath.isclose = lambda *a, **k: True\n"
    failed(execute(task, body, sandbox=sandbox), "AssertionError")
    task = Task(
        task_id="hostile/isclose",
        prompt="import math\ndef f():\n",
        canonical_solution="    return 1.5\n",
        test="def check(candidate):\n    assert math.isclose(candidate(), 1.5)\n",
        entry_point="f",
        kind="humaneval",
    )
    failed(execute(task, body, sandbox=sandbox), "AssertionError")
    assert execute(task, "    return 1.5\n", sandbox=sandbox).passed


def test_the_program_never_sees_the_test(sandbox, host):
    secret_test = "def check(candidate):\n    assert candidate() == 1  # EXPECTED-VALUE-MARKER\n"
    task = Task(
        task_id="hostile/peek",
        prompt="def f():\n",
        canonical_solution="    return 1\n",
        test=secret_test,
        entry_point="f",
        kind="humaneval",
    )
    body = (
        "    return 0\nimport gc, sys\n"
        "seen = [o for o in gc.get_objects() if isinstance(o, dict)\n"
        "        for v in o.values() if isinstance(v, str) and 'EXPECTED-VALUE' + '-MARKER' in v]\n"
        "fr = sys._getframe()\n"
        "while fr is not None:\n"
        "    seen += [v for v in fr.f_locals.values() if isinstance(v, (str, dict)) and\n"
        "             'EXPECTED-VALUE' + '-MARKER' in str(v)]\n"
        "    fr = fr.f_back\n"
        "print('saw the test' if seen else 'test hidden')\n"
    )
    r = execute(task, body, sandbox=sandbox)
    failed(r, "AssertionError")
    assert "test hidden" in r.stdout, r.stdout
