"""Run untrusted Python (model output) in its own processes, contained, and report what happened.

Never `exec` in the harness. On Linux as root (what CI runs as), each run is forked by a warm
fork server (`_driver.py --zygote`) that lives in its own empty network namespace, its own IPC
namespace, and a new root made of read-only binds of the system and interpreter directories only
(see docs/eval.md, "The sandbox", for the table). Every run then gets
- a new session, pid namespace (pid 1 is the run's checker: when it ends the kernel kills every
  process the run left, daemons included), mount namespace with private size-limited tmpfs over
  /tmp, /run, /var/tmp and /dev/shm (its working directory is /tmp/work, gone with the run), a
  /proc of its own, and an IPC namespace of its own (System V objects die with it);
- two processes: the program's, under an unprivileged uid of its own with a seccomp filter (no
  AF_UNIX sockets but stream socketpairs, only AF_INET/AF_INET6 sockets, no io_uring), and the
  checker's, under another uid, non-dumpable, which runs the check and alone holds the verdict;
- rlimits on CPU time, address space, processes, file size, open files, core dumps;
- a scrubbed environment, stdin from /dev/null, stdout/stderr captured up to a cap (a flood is
  killed), a wall-clock timeout that kills the whole session.
Elsewhere (not root, no CAP_SYS_ADMIN) each run is a fresh `python -I _driver.py` checker that
forks the program's process: rlimits, the seccomp filter, a fresh temporary directory, an
unprivileged user+network+IPC namespace when the kernel allows one, and leftovers found by an
environment marker and killed. `Isolation.describe()` says "full" or "degraded (...)" naming
what is missing; results carry it.

    with Sandbox(Limits(timeout_s=3)) as sb:
        r = sb.run("def f(): return 1", check="def check(c): assert c() == 1", call=("check", "f"))
    r.completed  # True only if the checker ran the check to its end and wrote this run's token
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import queue
import secrets
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DRIVER = Path(__file__).with_name("_driver.py")
MARKER_VAR = "CODEGEMMA_SANDBOX_ID"
# uids with no passwd entry, away from the usual subuid (100000+) and systemd (61184+) ranges;
# offset by our pid so two harnesses on one host rarely share a slot.
UID_BASE = 310_000
UIDS_PER_HOST = 256
UNSHARE = (
    "unshare",
    "--pid",
    "--fork",
    "--net",
    "--mount",
    "--ipc",
    "--mount-proc",
    "--kill-child",
)


def host_uids(pid: int | None = None) -> range:
    """The slot uids of the harness process `pid` (default: this one)."""
    base = UID_BASE + ((os.getpid() if pid is None else pid) % 4096) * UIDS_PER_HOST
    return range(base, base + UIDS_PER_HOST)


def host_tag(pid: int | None = None) -> str:
    """Prefix of the markers and working directories of the harness process `pid`, so that a
    harness (or a test) can tell its own leftovers from another's running beside it."""
    return f"{os.getpid() if pid is None else pid}-"


@dataclass(frozen=True, kw_only=True)
class Limits:
    timeout_s: float = 3.0  # wall clock
    memory_bytes: int | None = 1 << 30  # address space; None: unlimited (then bound data_bytes)
    data_bytes: int | None = None  # RLIMIT_DATA, for runtimes that reserve huge address ranges
    max_processes: int = 32
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    max_output_bytes: int = 64 << 10  # per stream; more is a flood and the run is killed
    tmpfs_bytes: int = 64 << 20  # each private tmpfs (work dir included)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_bytes", "data_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        for name in (
            "max_processes",
            "max_file_bytes",
            "max_open_files",
            "max_output_bytes",
            "tmpfs_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_open_files < 8:
            raise ValueError("max_open_files must be >= 8: Python itself needs a few descriptors")

    @property
    def cpu_s(self) -> int:
        return int(self.timeout_s) + 1


@dataclass(frozen=True, kw_only=True)
class Isolation:
    network: bool = False  # empty network namespace
    pid_namespace: bool = False  # every process dies with the run
    ipc_namespace: bool = False  # System V IPC and POSIX message queues die with the run
    private_fs: bool = False  # a root of read-only binds; writable dirs are private tmpfs
    own_uid: bool = False  # unprivileged uid of its own
    syscall_filter: bool = False  # seccomp: no AF_UNIX sockets, no io_uring

    CHECKS = (
        ("network", "net", "no network namespace"),
        ("pid_namespace", "pid", "no pid namespace"),
        ("ipc_namespace", "ipc", "no ipc namespace"),
        ("private_fs", "fs", "host filesystem visible"),
        ("own_uid", "uid", "no separate uid"),
        ("syscall_filter", "sys", "no syscall filter"),
    )

    @property
    def full(self) -> bool:
        return all(getattr(self, name) for name, _, _ in self.CHECKS)

    def describe(self) -> str:
        if self.full:
            return "full"
        missing = [text for name, _, text in self.CHECKS if not getattr(self, name)]
        return f"degraded ({', '.join(missing)})"

    @classmethod
    def parse(cls, line: str) -> Isolation:
        """From the checker's `iso net=1 pid=1 ipc=1 fs=1 uid=1 sys=1` line."""
        flags = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
        return cls(**{name: flags.get(key) == "1" for name, key, _ in cls.CHECKS})


@dataclass(frozen=True, kw_only=True)
class SandboxResult:
    completed: bool  # the checker ran the check to its end and wrote this run's token; exit 0
    returncode: int | None  # the program's exit code when it ended early, else the run's
    error: str  # the checker's "ExcType: message" when the program or the check raised
    error_type: str  # its ExcType ("" when nothing raised)
    stdout: str  # tails, capped
    stderr: str
    timed_out: bool
    output_overflow: bool
    duration_s: float
    isolation: Isolation
    leftovers_killed: int  # processes found and killed after the run (degraded mode only)


@functools.cache
def namespaces_available() -> bool:
    """Root, on Linux, allowed to create network, mount and pid namespaces (probed once)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def scrubbed_env() -> dict[str, str]:
    # Nothing of the harness's environment: no tokens, no proxies, no PYTHONPATH.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
    }


# Per (python, read_only): the sockets and FIFOs a zygote of this process found in the trees it
# binds, so that later zygotes cover the same ones without walking the trees again.
_COVERED: dict[tuple[str, tuple[str, ...]], list[str]] = {}


class _Zygote:
    """Client of the driver's fork server: send a payload and four pipe ends, get pid and exit."""

    def __init__(self, python: str, read_only: tuple[str, ...] = ()) -> None:
        parent, child = socket.socketpair()
        key = (python, read_only)
        config = json.dumps({"read_only": list(read_only), "covered": _COVERED.get(key)})
        self.proc = subprocess.Popen(
            [python, "-I", str(DRIVER), "--zygote", config, str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=scrubbed_env(),
            cwd="/",
            start_new_session=True,
        )
        child.close()
        self.sock = parent
        self.reader = parent.makefile("rb")
        parent.settimeout(60)
        try:
            line = self.reader.readline()
        except OSError:
            line = b""
        self.ok = line.startswith(b"ready ")
        if self.ok:
            # the sockets and FIFOs of the bound trees, covered: the next zygote need not scan
            _COVERED.setdefault(key, json.loads(line[6:]))
        parent.settimeout(None)
        self.lock = threading.Lock()
        self.waiters: dict[str, queue.Queue] = {}
        if self.ok:
            threading.Thread(target=self._read, daemon=True, name="sandbox-zygote").start()

    def _read(self) -> None:
        for line in self.reader:
            kind, rid, value = line.decode().split()
            waiter = self.waiters.get(rid)
            if waiter is not None:
                waiter.put((kind, int(value)))
        self.ok = False
        for waiter in list(self.waiters.values()):
            waiter.put(("dead", 0))

    def spawn(self, payload: dict, fds: list[int]) -> tuple[str, queue.Queue]:
        rid = secrets.token_hex(8)
        waiter: queue.Queue = queue.Queue()
        self.waiters[rid] = waiter
        body = json.dumps(dict(payload, request=rid)).encode()
        data = len(body).to_bytes(8, "big") + body
        with self.lock:
            sent = socket.send_fds(self.sock, [data[:8]], fds)
            self.sock.sendall(data[sent:])
        return rid, waiter

    def done(self, rid: str) -> None:
        self.waiters.pop(rid, None)

    def close(self) -> None:
        self.sock.close()
        _killpg(self.proc.pid)
        self.proc.wait()


@dataclass(frozen=True, kw_only=True)
class Collected:
    """What a run wrote, as read by `_collect`: output tails, the result lines, how it ended."""

    stdout: bytes
    stderr: bytes
    result: bytes  # the checker's lines (fd 3)
    timed_out: bool
    overflow: bool  # stdout or stderr went past the cap: the run was killed


class Sandbox:
    """Thread-safe: `run` may be called from many threads; each call takes a uid slot (a pair:
    the program's uid and the checker's)."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        slots: int | None = None,
        namespaces: bool = True,
        separate_uid: bool = True,
        python: str = sys.executable,
        read_only: Sequence[str] = (),
    ) -> None:
        """`read_only`: more host directories the run may read (a compiler's, say), bound
        read-only into its root beside the system and interpreter directories."""
        self.limits = limits or Limits()
        self.python = python
        self.read_only = tuple(os.path.abspath(p) for p in read_only)
        self.use_namespaces = namespaces and namespaces_available()
        self.use_uid = separate_uid and os.geteuid() == 0
        if self.use_uid and not self.use_namespaces and not _uid_can_run_python(python):
            self.use_uid = False  # Python lives where another uid cannot read it (e.g. /root)
        if not self.use_uid:
            _not_dumpable()
        n = slots or max(os.cpu_count() or 1, 1) * 4
        uids = host_uids()
        pairs = len(uids) // 2
        self._slots: queue.Queue[tuple[int, int]] = queue.Queue()
        for i in range(n):
            self._slots.put((uids[2 * (i % pairs)], uids[2 * (i % pairs) + 1]))
        self._zygote: _Zygote | None = None
        self._zygote_lock = threading.Lock()

    def start(self) -> None:
        """Start the fork server (and build its root) now rather than on the first run."""
        self._get_zygote()

    def close(self) -> None:
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(
        self,
        program: str,
        *,
        check: str = "",
        call: tuple[str, str] | None = None,
        entry_point: str | None = None,
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Run `program` (untrusted) in its process; then the checker runs `check` (trusted test
        code) with the program's names, and `call[0](call[1])` if given. `entry_point` (or
        `call[1]`) may shadow a builtin of that name for the check; no other name may."""
        lim = limits or self.limits
        uid, check_uid = self._slots.get()
        try:
            payload = dict(
                program=program,
                uid=uid if self.use_uid else None,
                check_uid=check_uid if self.use_uid else None,
                tmpfs_bytes=lim.tmpfs_bytes,
                env=scrubbed_env(),
                limits=self._limits_payload(lim),
            )
            # Only the checker reads this, after the program's process exists: never in its memory.
            secret = dict(
                token=secrets.token_hex(16),
                check=check,
                call=list(call) if call else None,
                entry_point=entry_point,
            )
            zygote = self._get_zygote()
            if zygote is not None:
                return self._run_forked(zygote, payload, secret, lim)
            return self._run_exec(payload, secret, lim, (uid, check_uid))
        finally:
            self._slots.put((uid, check_uid))

    def run_commands(
        self,
        files: dict[str, str],
        commands: Sequence[tuple[Sequence[str], float]],
        *,
        env: dict[str, str] | None = None,
        exec_only: Sequence[str] = (),
        limits: Limits | None = None,
    ) -> CommandsResult:
        """Write `files` into the run's working directory and run `commands` (absolute argv,
        timeout seconds) there in order, each in its own confined process, stopping at the first
        that exits non-zero. `env` adds to the scrubbed environment (`{home}` in a value is the
        run's private home directory). With a compile step, the sources are deleted and the
        `exec_only` binaries made unreadable before the last command runs."""
        lim = limits or self.limits
        total = sum(t for _, t in commands) + 2.0  # the checker enforces each command's own
        wall = Limits(**{**lim.__dict__, "timeout_s": total})
        uid, check_uid = self._slots.get()
        try:
            payload = dict(
                program="",
                files=dict(files),
                commands=[dict(argv=list(a), timeout_s=float(t)) for a, t in commands],
                exec_only=list(exec_only),
                run_env=dict(env or {}),
                uid=uid if self.use_uid else None,
                check_uid=check_uid if self.use_uid else None,
                tmpfs_bytes=lim.tmpfs_bytes,
                env=scrubbed_env(),
                limits=self._limits_payload(lim),
            )
            secret = dict(token="", check="", call=None, entry_point=None)
            zygote = self._get_zygote()
            if zygote is not None:
                return self._run_forked(zygote, payload, secret, wall, parse=_commands_result)
            return self._run_exec(payload, secret, wall, (uid, check_uid), parse=_commands_result)
        finally:
            self._slots.put((uid, check_uid))

    def _limits_payload(self, lim: Limits) -> dict:
        return dict(
            cpu_s=lim.cpu_s,
            memory_bytes=lim.memory_bytes,
            data_bytes=lim.data_bytes,
            max_file_bytes=lim.max_file_bytes,
            max_open_files=lim.max_open_files,
            max_processes=self._nproc(lim),
        )

    def _get_zygote(self) -> _Zygote | None:
        if not self.use_namespaces:
            return None
        with self._zygote_lock:
            if self._zygote is None or not self._zygote.ok:
                if self._zygote is not None:
                    self._zygote.close()
                self._zygote = _Zygote(self.python, self.read_only)
                if not self._zygote.ok:
                    self.use_namespaces = False
                    self._zygote.close()
                    self._zygote = None
            return self._zygote

    # -- a run forked by the zygote (namespaces) --------------------------------------------
    def _run_forked(self, zygote: _Zygote, payload: dict, secret: dict, lim: Limits, parse=None):
        pipes = [os.pipe() for _ in range(3)]
        secret_r, secret_w = os.pipe()
        start = time.monotonic()
        rid, waiter = zygote.spawn(payload, [w for _, w in pipes] + [secret_r])
        for _, w in pipes:
            os.close(w)
        os.close(secret_r)
        _send_secret(secret_w, secret)
        state = {"pid": None, "code": None}

        def poll() -> int | None:
            while state["code"] is None and not waiter.empty():
                kind, value = waiter.get()
                if kind == "pid":
                    state["pid"] = value
                else:  # "exit", or "dead" when the zygote went away
                    state["code"] = value if kind == "exit" else -signal.SIGKILL
            return state["code"]

        def kill() -> None:
            poll()
            if state["pid"] is not None:
                _killpg(state["pid"])  # the session: the relay and pid 1 of the run
                _kill(state["pid"])  # in case the kill raced its setsid; pid 1 follows it

        try:
            out = _collect([r for r, _ in pipes], poll, kill, lim, start)
            deadline = time.monotonic() + 5
            while poll() is None and time.monotonic() < deadline:
                kill()  # only reached after a hard stop: the run is being killed anyway
                time.sleep(0.005)
        finally:
            zygote.done(rid)
            for r, _ in pipes:
                os.close(r)
        parse = parse or functools.partial(_result, token=secret["token"])
        return parse(out, state["code"], duration=time.monotonic() - start, killed=0)

    # -- a run in a fresh process (no namespaces) -------------------------------------------
    def _run_exec(
        self, payload: dict, secret: dict, lim: Limits, uids: tuple[int, int], parse=None
    ):
        hostdir = tempfile.mkdtemp(prefix=f"codegemma-sandbox-{host_tag()}")
        marker = host_tag() + secrets.token_hex(8)
        read_fd, write_fd = os.pipe()
        secret_r, secret_w = os.pipe()
        try:
            env = dict(scrubbed_env(), HOME=hostdir, TMPDIR=hostdir, **{MARKER_VAR: marker})
            path = os.path.join(hostdir, "payload.json")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(dict(payload, result_fd=write_fd, secret_fd=secret_r, env=env), f)
            start = time.monotonic()
            proc = subprocess.Popen(
                [self.python, "-I", str(DRIVER), path],
                cwd=hostdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd, secret_r),
                start_new_session=True,
            )
            os.close(write_fd)
            os.close(secret_r)
            write_fd = secret_r = -1
            _send_secret(secret_w, secret)
            secret_w = -1
            fds = [proc.stdout.fileno(), proc.stderr.fileno(), read_fd]
            out = _collect(fds, proc.poll, lambda: _killpg(proc.pid), lim, start)
            duration = time.monotonic() - start
            killed = self._kill_leftovers(proc, marker, uids)
            proc.stdout.close()
            proc.stderr.close()
            parse = parse or functools.partial(_result, token=secret["token"])
            return parse(out, proc.returncode, duration=duration, killed=killed)
        finally:
            for fd in (write_fd, secret_r, secret_w):
                if fd >= 0:
                    os.close(fd)
            os.close(read_fd)
            remove_tree(hostdir)

    def _nproc(self, lim: Limits) -> int:
        if self.use_uid:
            return lim.max_processes  # the slot's uid owns nothing else
        # Our own uid: the limit counts everything we already run, so leave room above that.
        return lim.max_processes + len(_processes_of_uid(os.getuid()))

    def _kill_leftovers(self, proc: subprocess.Popen, marker: str, uids: tuple[int, int]) -> int:
        _killpg(proc.pid)
        if proc.poll() is None:
            proc.wait()
        killed = 0
        for _ in range(50):  # a fork bomb may race the sweep; NPROC bounds it
            pids = _marked_processes(marker)
            if self.use_uid:
                for uid in uids:
                    pids |= _processes_of_uid(uid)
            pids.discard(os.getpid())
            if not pids:
                break
            for pid in pids:
                killed += _kill(pid)
            time.sleep(0.01)
        return killed


def _send_secret(fd: int, secret: dict) -> None:
    """Write the secret into its pipe and close it; what does not fit the pipe now goes from a
    thread (the checker reads it once the program's process exists; if the run dies first, the
    write fails and the thread ends)."""
    data = json.dumps(secret).encode()
    os.set_blocking(fd, False)
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except BrokenPipeError:
        os.close(fd)
        return
    if sent == len(data):
        os.close(fd)
        return

    def rest() -> None:
        os.set_blocking(fd, True)
        with contextlib.suppress(OSError):
            os.write(fd, data[sent:])
        os.close(fd)

    threading.Thread(target=rest, daemon=True, name="sandbox-secret").start()


def _not_dumpable() -> None:
    """Programs will run under our own uid: make this process non-dumpable, so that they cannot
    ptrace it or open its /proc/<pid>/mem and fd entries (the tokens, the result pipes)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE


def _uid_can_run_python(python: str) -> bool:
    try:
        done = subprocess.run(
            [python, "-I", "-c", "import typing, json"],
            user=UID_BASE,
            group=UID_BASE,
            extra_groups=[],
            capture_output=True,
            timeout=30,
            cwd="/",
            env=scrubbed_env(),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _collect(fds: list[int], poll, kill, lim: Limits, start: float) -> Collected:
    """Read stdout, stderr and the result pipe until EOF, timeout, or flood."""
    names = dict(zip(fds, ("stdout", "stderr", "result"), strict=True))
    bufs = {name: bytearray() for name in names.values()}
    sel = selectors.DefaultSelector()
    for fd, name in names.items():
        sel.register(fd, selectors.EVENT_READ, name)
    timed_out = overflow = False
    deadline = start + lim.timeout_s
    exited_at = hard_stop = None
    while True:
        now = time.monotonic()
        if exited_at is None and poll() is not None:
            exited_at = now
        if exited_at is not None and not sel.get_map():
            break  # exited and every pipe is drained
        if hard_stop is None and (now > deadline or (exited_at and now - exited_at > 0.5)):
            # Past the deadline, or the main process is gone and something still holds a pipe.
            timed_out = exited_at is None
            kill()
            hard_stop = now + 1.0
        if hard_stop is not None and now > hard_stop:
            break
        if not sel.get_map():
            time.sleep(0.001)  # pipes closed, exit status not reported yet
            continue
        for key, _ in sel.select(timeout=0.02):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                continue
            buf = bufs[key.data]
            buf += chunk
            cap = 4096 if key.data == "result" else lim.max_output_bytes
            if len(buf) > cap:
                overflow = overflow or key.data != "result"
                del buf[: len(buf) - cap]  # keep the tail: that is where the error is
                if key.data != "result" and hard_stop is None:
                    kill()
                    hard_stop = time.monotonic() + 1.0
    sel.close()
    return Collected(
        stdout=bytes(bufs["stdout"]),
        stderr=bytes(bufs["stderr"]),
        result=bytes(bufs["result"]),
        timed_out=timed_out,
        overflow=overflow,
    )


def _result(
    out: Collected, returncode: int | None, *, token: str, duration: float, killed: int
) -> SandboxResult:
    """The checker's lines: `iso ...`, then `passed TOKEN`, `error Type: msg` or `exit CODE`."""
    lines = out.result.decode("utf-8", "replace").splitlines()
    has_iso = bool(lines) and lines[0].startswith("iso ")
    iso = Isolation.parse(lines[0]) if has_iso else Isolation()
    rest = lines[1:] if has_iso else lines
    clean = returncode == 0 and not out.timed_out and not out.overflow
    completed = rest == [f"passed {token}"] and clean
    error = next((line[6:] for line in rest if line.startswith("error ")), "")
    program_exit = next((line[5:] for line in rest if line.startswith("exit ")), None)
    if program_exit is not None and program_exit.lstrip("-").isdigit() and not out.timed_out:
        returncode = int(program_exit)
    return SandboxResult(
        completed=completed,
        returncode=returncode,
        error=error,
        error_type=error.partition(":")[0].strip() if error else "",
        stdout=out.stdout.decode("utf-8", "replace"),
        stderr=out.stderr.decode("utf-8", "replace"),
        timed_out=out.timed_out,
        output_overflow=out.overflow,
        duration_s=duration,
        isolation=iso,
        leftovers_killed=killed,
    )


@dataclass(frozen=True, kw_only=True)
class CommandsResult:
    """A `run_commands` run: how its commands ended, the last one's output."""

    exit_codes: tuple[int | None, ...]  # per command started; None: it outlived its timeout
    reported: bool  # the checker ran to its end (else the run was killed: never a pass)
    stdout: str  # the last command's (earlier commands write theirs to stderr); capped tail
    stderr: str
    timed_out: bool  # a command, or the whole run, outlived its time
    output_overflow: bool
    duration_s: float
    isolation: Isolation
    leftovers_killed: int

    @property
    def returncode(self) -> int | None:
        """The last started command's exit code (None when none ran or it timed out)."""
        return self.exit_codes[-1] if self.exit_codes else None


def _commands_result(
    out: Collected, returncode: int | None, *, duration: float, killed: int
) -> CommandsResult:
    """The checker's lines: `iso ...`, then `cmd I exit CODE` or `cmd I timeout` per command."""
    lines = out.result.decode("utf-8", "replace").splitlines()
    has_iso = bool(lines) and lines[0].startswith("iso ")
    codes: list[int | None] = []
    for line in lines[1:] if has_iso else lines:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "cmd":
            codes.append(int(parts[3]) if parts[2] == "exit" else None)
    return CommandsResult(
        exit_codes=tuple(codes),
        stdout=out.stdout.decode("utf-8", "replace"),
        stderr=out.stderr.decode("utf-8", "replace"),
        timed_out=out.timed_out or None in codes,
        reported=returncode == 0,
        output_overflow=out.overflow,
        duration_s=duration,
        isolation=Isolation.parse(lines[0]) if has_iso else Isolation(),
        leftovers_killed=killed,
    )


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
        return 1
    except (ProcessLookupError, PermissionError):
        return 0


def _proc_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _processes_of_uid(uid: int) -> set[int]:
    """Live (non-zombie) processes whose real uid is `uid`."""
    found = set()
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                text = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            found.add(pid)
    return found


def _marked_processes(marker: str) -> set[int]:
    """Processes whose initial environment carries this run's marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = set()
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read():
                    found.add(pid)
        except OSError:
            continue
    return found


def remove_tree(path: str) -> None:
    """rmtree that also removes what the program made unreadable or unwritable."""

    def fix(func, p, _exc):
        for target in (os.path.dirname(p), p):
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(target, stat.S_IRWXU, follow_symlinks=False)
        try:
            func(p)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(p, onerror=fix)

    shutil.rmtree(path, onerror=fix)
