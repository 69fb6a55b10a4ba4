"""Run untrusted Python (model output) in its own process, contained, and report what happened.

Never `exec` in the harness. On Linux as root (what CI runs as), each run is forked by a warm
fork server (`_driver.py --zygote`) that lives in its own empty network namespace and a mount
namespace where the user's home is hidden; every run then gets
- a new session, pid namespace (pid 1 is the run: when it ends the kernel kills every process it
  left, daemons included) and mount namespace with private size-limited tmpfs over /tmp,
  /var/tmp, /dev/shm, /run/lock (its working directory is /tmp/work, gone with the run);
- its own unprivileged uid per concurrent slot (root ignores RLIMIT_NPROC and file modes);
- rlimits on CPU time, address space, processes, file size, open files, core dumps;
- a scrubbed environment, stdin from /dev/null, stdout/stderr captured up to a cap (a flood is
  killed), a wall-clock timeout that kills the whole session.
Elsewhere (not root, no CAP_SYS_ADMIN) each run is a fresh `python -I _driver.py` process in a
new session, with the rlimits, a fresh temporary directory, an unprivileged user+network
namespace when the kernel allows one, and leftovers found by an environment marker and killed.
`Isolation.describe()` says "full" or "degraded (...)" naming what is missing; results carry it.

    with Sandbox(Limits(timeout_s=3)) as sb:
        r = sb.run("def f(): return 1", check="def check(c): assert c() == 1", call=("check", "f"))
    r.completed  # True only if the check returned and the driver wrote the secret token
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path

DRIVER = Path(__file__).with_name("_driver.py")
MARKER_VAR = "CODEGEMMA_SANDBOX_ID"
# uids with no passwd entry, away from the usual subuid (100000+) and systemd (61184+) ranges;
# offset by our pid so two harnesses on one host rarely share a slot.
UID_BASE = 310_000
UIDS_PER_HOST = 256
UNSHARE = ("unshare", "--pid", "--fork", "--net", "--mount", "--mount-proc", "--kill-child")


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
    memory_bytes: int = 1 << 30  # address space
    max_processes: int = 32
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    max_output_bytes: int = 64 << 10  # per stream; more is a flood and the run is killed
    tmpfs_bytes: int = 64 << 20  # each private tmpfs (work dir included)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in (
            "memory_bytes",
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
    private_tmp: bool = False  # writable dirs are private size-limited tmpfs
    own_uid: bool = False  # unprivileged uid of its own

    @property
    def full(self) -> bool:
        return self.network and self.pid_namespace and self.private_tmp and self.own_uid

    def describe(self) -> str:
        if self.full:
            return "full"
        missing = [
            name
            for name, ok in (
                ("no network namespace", self.network),
                ("no pid namespace", self.pid_namespace),
                ("no private tmp", self.private_tmp),
                ("no separate uid", self.own_uid),
            )
            if not ok
        ]
        return f"degraded ({', '.join(missing)})"

    @classmethod
    def parse(cls, line: str) -> Isolation:
        """From the driver's `iso net=1 pid=1 tmp=1 uid=1` line."""
        flags = dict(kv.split("=") for kv in line.split()[1:])
        return cls(
            network=flags.get("net") == "1",
            pid_namespace=flags.get("pid") == "1",
            private_tmp=flags.get("tmp") == "1",
            own_uid=flags.get("uid") == "1",
        )


@dataclass(frozen=True, kw_only=True)
class SandboxResult:
    completed: bool  # the check returned and the driver wrote the token; exit code 0
    returncode: int | None
    error: str  # the driver's "ExcType: message" when the program or check raised
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


class _Zygote:
    """Client of the driver's fork server: send a payload and three pipe ends, get pid and exit."""

    def __init__(self, python: str) -> None:
        parent, child = socket.socketpair()
        config = json.dumps({"hide": [os.path.expanduser("~")]})
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
        self.ok = self.reader.readline() == b"ready\n"
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


class Sandbox:
    """Thread-safe: `run` may be called from many threads; each call takes a uid slot."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        slots: int | None = None,
        namespaces: bool = True,
        separate_uid: bool = True,
        python: str = sys.executable,
    ) -> None:
        self.limits = limits or Limits()
        self.python = python
        self.use_namespaces = namespaces and namespaces_available()
        self.use_uid = separate_uid and os.geteuid() == 0
        if self.use_uid and not self.use_namespaces and not _uid_can_run_python(python):
            self.use_uid = False  # Python lives where another uid cannot read it (e.g. /root)
        n = slots or max(os.cpu_count() or 1, 1) * 4
        uids = host_uids()
        self._slots: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self._slots.put(uids[i % len(uids)])
        self._zygote: _Zygote | None = None
        self._zygote_lock = threading.Lock()

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
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Run `program` (untrusted), then `check` (trusted test code, pristine builtins) in a
        copy of its namespace, then `call[0](call[1])` if given."""
        lim = limits or self.limits
        uid = self._slots.get()
        try:
            payload = dict(
                program=program,
                check=check,
                call=list(call) if call else None,
                token=secrets.token_hex(16),
                uid=uid if self.use_uid else None,
                tmpfs_bytes=lim.tmpfs_bytes,
                env=scrubbed_env(),
                limits=dict(
                    cpu_s=lim.cpu_s,
                    memory_bytes=lim.memory_bytes,
                    max_file_bytes=lim.max_file_bytes,
                    max_open_files=lim.max_open_files,
                    max_processes=self._nproc(lim),
                ),
            )
            zygote = self._get_zygote()
            if zygote is not None:
                return self._run_forked(zygote, payload, lim)
            return self._run_exec(payload, lim, uid)
        finally:
            self._slots.put(uid)

    def _get_zygote(self) -> _Zygote | None:
        if not self.use_namespaces:
            return None
        with self._zygote_lock:
            if self._zygote is None or not self._zygote.ok:
                if self._zygote is not None:
                    self._zygote.close()
                self._zygote = _Zygote(self.python)
                if not self._zygote.ok:
                    self.use_namespaces = False
                    self._zygote.close()
                    self._zygote = None
            return self._zygote

    # -- a run forked by the zygote (namespaces) --------------------------------------------
    def _run_forked(self, zygote: _Zygote, payload: dict, lim: Limits) -> SandboxResult:
        pipes = [os.pipe() for _ in range(3)]
        start = time.monotonic()
        rid, waiter = zygote.spawn(payload, [w for _, w in pipes])
        for _, w in pipes:
            os.close(w)
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
        return _result(out, state["code"], payload["token"], time.monotonic() - start, 0)

    # -- a run in a fresh process (no namespaces) -------------------------------------------
    def _run_exec(self, payload: dict, lim: Limits, uid: int) -> SandboxResult:
        hostdir = tempfile.mkdtemp(prefix=f"codegemma-sandbox-{host_tag()}")
        marker = host_tag() + secrets.token_hex(8)
        read_fd, write_fd = os.pipe()
        try:
            env = dict(scrubbed_env(), HOME=hostdir, TMPDIR=hostdir, **{MARKER_VAR: marker})
            path = os.path.join(hostdir, "payload.json")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(dict(payload, result_fd=write_fd, env=env), f)
            start = time.monotonic()
            proc = subprocess.Popen(
                [self.python, "-I", str(DRIVER), path],
                cwd=hostdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
            os.close(write_fd)
            write_fd = -1
            fds = [proc.stdout.fileno(), proc.stderr.fileno(), read_fd]
            out = _collect(fds, proc.poll, lambda: _killpg(proc.pid), lim, start)
            duration = time.monotonic() - start
            killed = self._kill_leftovers(proc, marker, uid)
            proc.stdout.close()
            proc.stderr.close()
            return _result(out, proc.returncode, payload["token"], duration, killed)
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            os.close(read_fd)
            remove_tree(hostdir)

    def _nproc(self, lim: Limits) -> int:
        if self.use_uid:
            return lim.max_processes  # the slot's uid owns nothing else
        # Our own uid: the limit counts everything we already run, so leave room above that.
        return lim.max_processes + len(_processes_of_uid(os.getuid()))

    def _kill_leftovers(self, proc: subprocess.Popen, marker: str, uid: int) -> int:
        _killpg(proc.pid)
        if proc.poll() is None:
            proc.wait()
        killed = 0
        for _ in range(50):  # a fork bomb may race the sweep; NPROC bounds it
            pids = _marked_processes(marker)
            if self.use_uid:
                pids |= _processes_of_uid(uid)
            pids.discard(os.getpid())
            if not pids:
                break
            for pid in pids:
                killed += _kill(pid)
            time.sleep(0.01)
        return killed


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


def _collect(fds: list[int], poll, kill, lim: Limits, start: float) -> dict:
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
    return dict(bufs, timed_out=timed_out, overflow=overflow)


def _result(
    out: dict, returncode: int | None, token: str, duration: float, killed: int
) -> SandboxResult:
    lines = out["result"].decode("utf-8", "replace").splitlines()
    has_iso = bool(lines) and lines[0].startswith("iso ")
    iso = Isolation.parse(lines[0]) if has_iso else Isolation()
    rest = lines[1:] if has_iso else lines
    completed = rest == [token] and returncode == 0 and not out["timed_out"] and not out["overflow"]
    error = next((line[6:] for line in rest if line.startswith("error ")), "")
    return SandboxResult(
        completed=completed,
        returncode=returncode,
        error=error,
        stdout=out["stdout"].decode("utf-8", "replace"),
        stderr=out["stderr"].decode("utf-8", "replace"),
        timed_out=out["timed_out"],
        output_overflow=out["overflow"],
        duration_s=duration,
        isolation=iso,
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
