"""The trusted side of a sandboxed run (stdlib only; started by eval/sandbox.py, never imported).

Two ways in:
- `python -I _driver.py --zygote CONFIG SOCK_FD`: as root, a long-lived fork server. Once, it
  enters new network, mount and IPC namespaces and builds a new root: a read-only tmpfs holding
  read-only, nosuid, nodev binds of the system directories (/usr, /etc, /lib*, /bin, /sbin), the
  interpreter's own directories and any configured toolchain directory; a minimal /dev (null,
  zero, full, random, urandom); empty mount points for /proc, /tmp, /run, /var/tmp, /dev/shm.
  Every socket and FIFO found in the bound trees is covered by /dev/null. It then pivots into
  that root, so nothing else of the host's filesystem exists for it or its children. For each
  request it forks a relay that calls setsid and unshares pid, mount and IPC namespaces, then
  forks the checker as pid 1 there, so every process of the run dies with it.
- `python -I _driver.py PAYLOAD`: one run in a fresh process (the fallback when namespaces are
  unavailable: not root, or a container without CAP_SYS_ADMIN).

A run is two processes:
- the checker (this code, trusted): mounts the run's private tmpfs over /tmp, /run, /var/tmp and
  /dev/shm and a fresh /proc (hidepid=2), forks the program's process, then becomes a uid of its
  own, non-dumpable, and only then reads the check code and the run's token from the secret pipe
  (fd 4). It runs the check itself: every name the check takes from the program, and every value
  the program returns, reaches it as plain data (decoded by a strict decoder into new objects of
  builtin types) or as an opaque handle whose operations are carried out in the program's
  process. It writes the verdict on the result pipe (fd 3), which only it holds.
- the program's process (untrusted): its uid, rlimits, a seccomp filter (no AF_UNIX sockets but
  stream and seqpacket socketpairs, no sockets but AF_INET/AF_INET6, no io_uring, no foreign syscall ABI), the
  program, then a loop answering the checker's requests over a socketpair (fd 3 there). It never
  holds the token, the check code, the result pipe, or the secret pipe.

Result fd protocol (checker only): `iso net=N pid=N ipc=N fs=N uid=N sys=N`, then one verdict line:
`passed TOKEN` (the check returned), `error Type: message` (the program or the check raised), or
`exit CODE` (the program's process ended before the tests finished; a negative code is a signal).
"""

import builtins
import contextlib
import ctypes
import fcntl
import importlib
import json
import math
import operator
import os
import resource
import select
import signal
import socket
import stat
import sys
import sysconfig
import traceback
import types

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH, PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 2, 1, 4, 38
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
PRIVATE_DIRS = ("/tmp", "/run", "/var/tmp", "/dev/shm")  # a fresh tmpfs each, per run
DEVICES = ("null", "zero", "full", "random", "urandom")
STAGE = "/tmp/root"  # where the zygote assembles the new root (on a tmpfs of its own)
WORKDIR = "/tmp/work"
RESULT_FD, SECRET_FD, CHANNEL_FD = 3, 4, 3  # the checker's fds 3, 4; the program's fd 3
MAX_MESSAGE = 64 << 20
MAX_DEPTH = 100  # nesting sent by value; deeper parts go as handles
LIBC = ctypes.CDLL(None, use_errno=True)
ROOT_READY = False  # set in the zygote once the new root is in place; its children inherit it
EXTRA_READ_ONLY: list[str] = []  # the zygote's extra read-only directories (its config)

# seccomp: per architecture, the audit arch and the numbers of socket and socketpair.
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 53), "aarch64": (0xC00000B7, 198, 199)}
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
SYS_MOUNT_SETATTR = 442  # the same on every architecture (since Linux 5.12)
IO_URING = (425, 426, 427)  # io_uring_setup/enter/register: the same on every architecture


def mount(src, target: str, fstype, flags: int, data) -> bool:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    return LIBC.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) == 0


def prctl(option: int, *args) -> int:
    """prctl with every argument a full unsigned long (the kernel checks the unused ones are 0)."""
    args = [ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]
    return LIBC.prctl(option, *args, *[ctypes.c_ulong(0)] * (4 - len(args)))


# -- the zygote's one-time setup: a new root of read-only binds -------------------------------
def python_paths() -> list[str]:
    """The directories this interpreter and its libraries load from (outermost only)."""
    paths = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
    }
    paths |= {
        v
        for k, v in sysconfig.get_paths().items()
        if k in ("stdlib", "platstdlib", "purelib", "platlib")
    }
    return _outermost([os.path.realpath(p) for p in paths if os.path.isdir(p)])


def _outermost(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in out):
            out.append(p)
    return out


def _makedirs(path: str) -> None:
    parts = path.strip("/").split("/")
    for n in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:n])
        if not os.path.lexists(d):
            os.mkdir(d, 0o755)
            os.chmod(d, 0o755)  # whatever the umask: the sandbox uid must traverse it


def read_only(target: str) -> bool:
    """Make the mount at `target` and every mount below it read-only, nosuid, nodev."""
    attr = (ctypes.c_uint64 * 4)(MS_RDONLY | MS_NOSUID | MS_NODEV, 0, 0, 0)  # MOUNT_ATTR_*
    at_fdcwd, at_recursive, c_long = -100, 0x8000, ctypes.c_long
    done = LIBC.syscall(
        c_long(SYS_MOUNT_SETATTR),
        c_long(at_fdcwd),
        target.encode(),
        c_long(at_recursive),
        attr,
        c_long(ctypes.sizeof(attr)),
    )
    if done == 0:
        return True
    ok = True  # an older kernel: remount each mount of the subtree
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    for p in points:
        if p == target or p.startswith(target.rstrip("/") + "/"):
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            ok = mount(None, p, None, flags, None) and ok
    return ok


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def special_files(root: str) -> list[str]:
    """Sockets and FIFOs below `root` (symlinks not followed)."""
    found, stack = [], [root]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif not e.is_file(follow_symlinks=False) and not e.is_symlink():
                        mode = e.stat(follow_symlinks=False).st_mode
                        if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
                            found.append(e.path)
                except OSError:
                    continue
    return found


def build_root(extra: list[str], covered: list[str] | None) -> list[str] | None:
    """Assemble the new root at STAGE and pivot into it; the sockets and FIFOs covered (found by
    a scan of the bound trees unless `covered` lists them already), or None on failure."""
    links, sources = [], []
    for p in _outermost([*SYSTEM_DIRS, *python_paths(), *extra]):
        if not os.path.lexists(p):
            continue
        if os.path.islink(p) and p in SYSTEM_DIRS:  # /bin -> usr/bin: the same link
            links.append((p, os.readlink(p)))
        else:  # opened now: the tmpfs below hides the host's /tmp, which may hold one of them
            sources.append((p, os.open(p, os.O_PATH | os.O_CLOEXEC)))
    if not mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=700"):
        return None
    os.mkdir(STAGE, 0o755)
    if not mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755"):
        return None
    for p, target in links:
        _makedirs(os.path.dirname(STAGE + p))
        os.symlink(target, STAGE + p)
    for p, fd in sources:
        _makedirs(os.path.dirname(STAGE + p))
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.mkdir(STAGE + p, 0o755)
        else:
            os.close(os.open(STAGE + p, os.O_WRONLY | os.O_CREAT, 0o644))
        ok = mount(f"/proc/self/fd/{fd}", STAGE + p, None, MS_BIND | MS_REC, None)
        os.close(fd)
        if not (ok and read_only(STAGE + p)):
            return None
    # A read-only mount still lets a socket on it be connected and a FIFO be written: cover each.
    if covered is None:
        covered = [f[len(STAGE) :] for p, _ in sources for f in special_files(STAGE + p)]
    for f in covered:
        if not mount("/dev/null", STAGE + f, None, MS_BIND, None) and os.path.lexists(STAGE + f):
            return None
    dev = STAGE + "/dev"
    os.mkdir(dev, 0o755)
    if not mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755"):
        return None
    for name in DEVICES:
        os.close(os.open(f"{dev}/{name}", os.O_WRONLY | os.O_CREAT, 0o666))
        if not mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND, None):
            return None
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")
    for d in (*PRIVATE_DIRS, "/proc"):
        _makedirs(STAGE + d)
    os.symlink("/run", STAGE + "/var/run")
    flags = MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    mount(None, dev, None, flags, "size=64k,mode=755")
    if not mount(None, STAGE, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=755"):
        return None
    os.chdir(STAGE)
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is not None and LIBC.syscall(nr, b".", b".") == 0:
        LIBC.umount2(b".", MNT_DETACH)  # the old root, stacked on "." by pivot_root(".", ".")
    else:
        os.chroot(".")  # no untrusted code ever runs with the privilege to leave a chroot
    os.chdir("/")
    return covered


def network_isolated() -> bool:
    """True when the current network namespace has no interface but loopback (which is down)."""
    try:
        with open("/proc/self/net/dev") as f:
            names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    except OSError:
        return False
    return names in (["lo"], [])


# -- one run: the checker's setup --------------------------------------------------------------
def private_dirs(size: int) -> bool:
    """A fresh size-limited tmpfs over every writable place, and a /proc of the run's own.
    Read-only directories that live below one of those places are bound again on top."""
    if not mount("none", "/", None, MS_REC | MS_PRIVATE, None):
        return False
    below = [p for p in EXTRA_READ_ONLY if any(p.startswith(d + "/") for d in PRIVATE_DIRS)]
    held = [(p, os.open(p, os.O_PATH | os.O_CLOEXEC)) for p in below if os.path.lexists(p)]
    opts = f"size={size},mode=1777"
    ok = all(mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, opts) for d in PRIVATE_DIRS)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    ok = ok and mount("proc", "/proc", "proc", flags, "hidepid=2")
    for p, fd in held:  # through /proc/self/fd, which the run's own /proc now provides
        _makedirs(os.path.dirname(p))
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.mkdir(p, 0o755)
        else:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
        ok = ok and mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC, None)
        ok = ok and read_only(p)
        os.close(fd)
    return ok


def set_limits(lim: dict) -> None:
    """rlimits; `memory_bytes` None leaves the address space unlimited (a JVM, Go, Node or Mono
    reserves far more than it uses) and `data_bytes` then bounds the data segment instead."""
    r = resource
    infinity = r.RLIM_INFINITY
    for which, value in (
        (r.RLIMIT_CPU, lim["cpu_s"]),
        (r.RLIMIT_AS, lim["memory_bytes"] or infinity),
        (r.RLIMIT_DATA, lim.get("data_bytes") or infinity),
        (r.RLIMIT_FSIZE, lim["max_file_bytes"]),
        (r.RLIMIT_NOFILE, lim["max_open_files"]),
        (r.RLIMIT_CORE, 0),
        (r.RLIMIT_NPROC, lim["max_processes"]),
    ):
        r.setrlimit(which, (value, value))


def become(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def syscall_filter() -> bool:
    """seccomp: refuse AF_UNIX sockets (a path socket anywhere could be connected) except stream
    and seqpacket socketpairs (anonymous: nothing else can connect to them), every socket family but AF_INET/AF_INET6 (the empty network namespace covers
    those), io_uring (it would bypass the rest), and any other syscall ABI than the native one."""
    fprog = _filter_program()
    if fprog is None or prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        return False
    return prctl(22, 2, ctypes.byref(fprog)) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_FILTER: list = []  # built once (in the zygote, before any fork) and kept alive


def _filter_program():
    if _FILTER:
        return _FILTER[0]
    arch = SECCOMP_ARCH.get(os.uname().machine)
    if arch is None:
        return None
    audit_arch, nr_socket, nr_socketpair = arch
    ld, jeq, jge, ret, and_ = 0x20, 0x15, 0x35, 0x06, 0x54
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    prog: list[list] = []
    labels: dict[str, int] = {}

    def op(code, k=0, jt=None, jf=None):
        prog.append([code, jt, jf, k])

    op(ld, 4)  # seccomp_data.arch
    op(jeq, audit_arch, jf="deny")
    op(ld, 0)  # seccomp_data.nr
    op(jge, 0x40000000, jt="deny")  # x32 on x86_64; no syscall is numbered this high elsewhere
    op(jeq, nr_socket, jt="socket")
    op(jeq, nr_socketpair, jt="socketpair")
    for nr in IO_URING:
        op(jeq, nr, jt="deny")
    op(ret, allow)
    labels["socket"] = len(prog)
    op(ld, 16)  # args[0]: the family
    op(jeq, socket.AF_INET, jt="allow")
    op(jeq, socket.AF_INET6, jt="allow")
    op(ret, deny)
    labels["socketpair"] = len(prog)
    op(ld, 16)
    op(jeq, socket.AF_UNIX, jf="deny")
    op(ld, 24)  # args[1]: the type, with SOCK_CLOEXEC / SOCK_NONBLOCK
    op(and_, 0xF)
    op(jeq, socket.SOCK_STREAM, jt="allow")
    op(jeq, socket.SOCK_SEQPACKET, jt="allow")  # Rust's Command passes a pidfd over one
    op(ret, deny)
    labels["allow"] = len(prog)
    op(ret, allow)
    labels["deny"] = len(prog)
    op(ret, deny)
    jump = lambda i, to: 0 if to is None else labels[to] - i - 1  # noqa: E731
    code = (_SockFilter * len(prog))(
        *(_SockFilter(c, jump(i, jt), jump(i, jf), k) for i, (c, jt, jf, k) in enumerate(prog))
    )
    _FILTER.extend([_SockFprog(len(prog), code), code])
    return _FILTER[0]


# -- the values that cross between the checker and the program --------------------------------
class ProtocolError(BaseException):
    """The program's process sent something that is not a well-formed message."""


class ProgramEnded(BaseException):
    """The program's process is gone (exit, signal) or closed its channel."""


class RemoteError(Exception):
    """An exception of a type the checker does not have (one the program defined)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.remote_name = name


def encode(value, ref, depth: int = 0, active: set | None = None):
    """Plain data by value (builtin types and their subclasses, as the builtin type: a subclass's
    own __eq__ never crosses), anything else as `ref(value)`."""
    if value is None:
        return ["n"]
    if isinstance(value, bool):
        return ["b", int(value)]
    if isinstance(value, int):
        return ["i", format(int.__index__(value), "x")]
    if isinstance(value, float):
        return ["f", float.hex(value)]
    if isinstance(value, complex):
        return ["c", float.hex(value.real), float.hex(value.imag)]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, bytes):
        return ["y", bytes.hex(value)]
    if isinstance(value, bytearray):
        return ["Y", bytearray.hex(value)]
    kinds = ((dict, "d"), (list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F"))
    tag = next((t for kind, t in kinds if isinstance(value, kind)), None)
    active = set() if active is None else active
    if tag is None or depth >= MAX_DEPTH or id(value) in active:
        return ref(value)
    active.add(id(value))
    try:
        if tag == "d":
            items = [
                [encode(k, ref, depth + 1, active), encode(v, ref, depth + 1, active)]
                for k, v in dict.items(value)
            ]
        else:
            base = {"l": list, "t": tuple, "S": set, "F": frozenset}[tag]
            items = [encode(x, ref, depth + 1, active) for x in base.__iter__(value)]
    finally:
        active.discard(id(value))
    return [tag, items]


def decode(data, resolve):
    """New objects of builtin types only; ["h", n] becomes `resolve(n)`."""
    try:
        tag = data[0]
        if tag == "n":
            return None
        if tag == "b" and data[1] in (0, 1):
            return bool(data[1])
        if tag in ("i", "f", "c", "s", "y", "Y") and all(type(x) is str for x in data[1:]):
            if tag == "i":
                return int(data[1], 16)
            if tag == "f":
                return float.fromhex(data[1])
            if tag == "c":
                return complex(float.fromhex(data[1]), float.fromhex(data[2]))
            if tag == "s":
                return data[1]
            return bytes.fromhex(data[1]) if tag == "y" else bytearray.fromhex(data[1])
        if tag == "h" and type(data[1]) is int:
            return resolve(data[1])
        if tag == "d":
            return {decode(k, resolve): decode(v, resolve) for k, v in data[1]}
        kind = {"l": list, "t": tuple, "S": set, "F": frozenset}[tag]
        return kind(decode(x, resolve) for x in data[1])
    except (ProtocolError, ProgramEnded):
        raise
    except Exception as e:  # noqa: BLE001 - malformed: never trust the rest
        raise ProtocolError(f"bad value from the program: {type(e).__name__}") from None


class Channel:
    """Length-prefixed JSON messages over a stream socket."""

    def __init__(self, sock: socket.socket, pidfd: int | None = None) -> None:
        self.sock = sock
        self.pidfd = pidfd  # the checker's side: the program's exit ends the wait

    def send(self, message) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        self.sock.sendall(len(data).to_bytes(4, "big") + data)

    def recv(self):
        size = int.from_bytes(self._exact(4), "big")
        if size > MAX_MESSAGE:
            raise ProtocolError(f"message of {size} bytes")
        try:
            return json.loads(self._exact(size))
        except (ValueError, RecursionError):
            raise ProtocolError("a message that is not JSON") from None

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self.pidfd is not None:
                ready, _, _ = select.select([self.sock, self.pidfd], [], [])
                if self.sock not in ready:
                    raise ProgramEnded("the program's process ended")
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ProgramEnded("the program closed its channel")
            buf += chunk
        return bytes(buf)


# -- the program's process (untrusted once the program has started) ---------------------------
OPS = {
    "call": lambda f, args, kwargs: f(*args, **kwargs),
    "getattr": getattr,
    "setattr": setattr,
    "delattr": delattr,
    "exec": lambda source, namespace: exec(source, namespace),  # noqa: S102 - the check's setup
    "round": lambda x, *n: round(x, *n),
    "len": len,
    "bool": bool,
    "hash": hash,
    "str": str,
    "repr": repr,
    "format": format,
    "int": int,
    "float": float,
    "complex": complex,
    "index": operator.index,
    "abs": abs,
    "neg": operator.neg,
    "pos": operator.pos,
    "invert": operator.invert,
    "iter": iter,
    "next": next,
    "reversed": reversed,
    "trunc": math.trunc,
    "floor": math.floor,
    "ceil": math.ceil,
    "divmod": divmod,
    "contains": operator.contains,
    "getitem": operator.getitem,
    "setitem": operator.setitem,
    "delitem": operator.delitem,
}
for _name in (
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "matmul",
    "and_",
    "or_",
    "xor",
    "lshift",
    "rshift",
):
    OPS[_name.rstrip("_")] = getattr(operator, _name)


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0][:200] if text else ""


class Server:
    """Answers the checker: each request names an operation and its operands."""

    def __init__(self, channel: Channel, namespace: dict) -> None:
        self.channel = channel
        self.namespace = namespace
        self.objects: list = []
        self.index: dict[int, int] = {}

    def ref(self, value):
        n = self.index.get(id(value))
        if n is None or self.objects[n] is not value:
            n = len(self.objects)
            self.objects.append(value)
            self.index[id(value)] = n
        return ["h", n]

    def names(self) -> dict:
        out = {}
        for name, value in list(self.namespace.items()):
            if name == "__builtins__" or not isinstance(name, str):
                continue
            if isinstance(value, types.ModuleType):
                out[name] = ["m", str(getattr(value, "__name__", "")), self.ref(value)]
            else:
                out[name] = encode(value, self.ref)
        return out

    def serve(self, flush) -> None:
        while True:
            try:
                message = self.channel.recv()
            except BaseException:  # noqa: BLE001 - the checker is gone or done
                flush()
                os._exit(0)
            if message == ["bye"]:
                flush()
                os._exit(0)
            try:
                _, name, operands = message
                args = [decode(x, self.objects.__getitem__) for x in operands]
                value = OPS[name](*args)
                # a namespace stays the program's (exec(setup, candidate.__globals__) fills it)
                by_ref = name == "getattr" and args[1] in ("__globals__", "__dict__")
                reply = ["ok", self.ref(value) if by_ref else encode(value, self.ref)]
            except BaseException as e:  # noqa: BLE001 - the checker decides what it means
                try:
                    tb = "".join(traceback.format_exception(e)[-20:])[-4000:]
                except BaseException:  # noqa: BLE001
                    tb = ""
                reply = ["err", type(e).__name__, _first_line(e), tb]
            self.channel.send(reply)


def confine(payload: dict, in_namespaces: bool, workdir: str) -> dict:
    """The program's process, before any of the program runs: namespaces it can still make
    (fallback mode), rlimits, the seccomp filter, its uid, its directory and environment."""
    facts = {"uid": 0, "sys": 0, "ipc": int(in_namespaces)}
    uid = payload["uid"]
    if not in_namespaces:
        privileged = os.geteuid() == 0
        flags = CLONE_NEWNET | CLONE_NEWIPC | (0 if privileged else CLONE_NEWUSER)
        facts["ipc"] = int(LIBC.unshare(flags) == 0 or LIBC.unshare(CLONE_NEWIPC) == 0)
    facts["net"] = int(network_isolated())
    set_limits(payload["limits"])
    if uid is not None:
        os.chown(workdir, uid, uid)
        become(uid)
        facts["uid"] = 1
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    facts["sys"] = int(syscall_filter())
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(payload["env"], HOME=workdir, TMPDIR=workdir, PWD=workdir)
    return facts


def program_process(payload: dict, in_namespaces: bool, workdir: str) -> None:
    """Run the program, then answer the checker. Everything here after `exec` is the program's:
    nothing it could change or read decides the verdict."""
    channel = Channel(socket.socket(fileno=CHANNEL_FD))
    channel.send(["hello", confine(payload, in_namespaces, workdir)])
    pristine = dict(builtins.__dict__)
    out, err = sys.stdout, sys.stderr

    def flush():
        for stream in (out, err, sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()

    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(payload["program"], "<program>", "exec"), ns)  # noqa: S102
    except BaseException as e:  # noqa: BLE001 - SystemExit too: exiting early is a failure
        try:
            channel.send(["raised", type(e).__name__, _first_line(e)])
        except BaseException:  # noqa: BLE001
            channel.send(["raised", "unreportable", ""])
        try:
            builtins.__dict__.update(pristine)
            traceback.print_exc()
        finally:
            flush()
            os._exit(1)
    server = Server(channel, ns)
    channel.send(["ready", server.names()])
    server.serve(flush)


# -- the checker (trusted) --------------------------------------------------------------------
class Remote:
    """An object of the program's: every operation on it is carried out in its process."""

    __slots__ = ("_cg_link", "_cg_id")

    def __init__(self, link, ident: int) -> None:
        object.__setattr__(self, "_cg_link", link)
        object.__setattr__(self, "_cg_id", ident)

    def __getattr__(self, name):
        return self._cg_link.op("getattr", self, name)

    def __setattr__(self, name, value):
        self._cg_link.op("setattr", self, name, value)

    def __delattr__(self, name):
        self._cg_link.op("delattr", self, name)

    def __call__(self, *args, **kwargs):
        return self._cg_link.op("call", self, list(args), kwargs)

    def __round__(self, *n):
        return self._cg_link.op("round", self, *n)

    def __setitem__(self, key, value):
        self._cg_link.op("setitem", self, key, value)


def _forward(op: str, reflected: bool = False):
    if reflected:
        return lambda self, other: self._cg_link.op(op, other, self)
    return lambda self, *args: self._cg_link.op(op, self, *args)


BINARY_OPS = (
    "divmod",
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "matmul",
    "and",
    "or",
    "xor",
    "lshift",
    "rshift",
)
for _op in (
    "len",
    "bool",
    "hash",
    "str",
    "repr",
    "int",
    "float",
    "complex",
    "index",
    "abs",
    "neg",
    "pos",
    "invert",
    "iter",
    "next",
    "reversed",
    "trunc",
    "floor",
    "ceil",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "getitem",
    "delitem",
    "contains",
    "format",
):
    setattr(Remote, f"__{_op}__", _forward(_op))
for _op in BINARY_OPS:  # both operand orders
    setattr(Remote, f"__{_op}__", _forward(_op))
    setattr(Remote, f"__r{_op}__", _forward(_op, reflected=True))


class Link:
    """The checker's end of the channel. Once the program's process has ended or sent garbage it
    stays broken: the verdict can then only be a failure, whatever the check caught."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.broken: BaseException | None = None

    def ref(self, value):
        if isinstance(value, Remote) and object.__getattribute__(value, "_cg_link") is self:
            return ["h", object.__getattribute__(value, "_cg_id")]
        raise TypeError(
            f"a {type(value).__name__} cannot be passed to the program: only plain data "
            "(None, bool, int, float, complex, str, bytes, list, tuple, dict, set) and the "
            "program's own objects cross"
        )

    def remote(self, ident: int) -> Remote:
        return Remote(self, ident)

    def recv(self):
        if self.broken is not None:
            raise self.broken
        try:
            return self.channel.recv()
        except (ProtocolError, ProgramEnded) as e:
            self.broken = e
            raise

    def op(self, name: str, *operands):
        if self.broken is not None:
            raise self.broken
        try:
            self.channel.send(["op", name, [encode(x, self.ref) for x in operands]])
        except OSError:
            self.broken = ProgramEnded("the program closed its channel")
            raise self.broken from None
        reply = self.recv()
        if type(reply) is list and reply[:1] == ["ok"] and len(reply) == 2:
            return self.decode(reply[1])
        err = type(reply) is list and reply[:1] == ["err"] and len(reply) == 4
        if err and all(type(x) is str for x in reply[1:]):
            raise remote_exception(reply[1], reply[2], reply[3])
        self.broken = ProtocolError("a reply that is not one")
        raise self.broken

    def decode(self, data):
        try:
            return decode(data, self.remote)
        except ProtocolError as e:
            self.broken = e
            raise


def remote_exception(name: str, message: str, tb: str) -> BaseException:
    """The program's exception as one of the checker's own: the builtin type of that name, or a
    RemoteError. Nothing of the program's exception object crosses."""
    cls = getattr(builtins, name, None)
    exc: BaseException
    if isinstance(cls, type) and issubclass(cls, BaseException) and cls is not BaseException:
        try:
            exc = cls(message)
        except Exception:  # noqa: BLE001 - a type whose constructor wants other arguments
            exc = RemoteError(name, message)
    else:
        exc = RemoteError(name, message)
    exc.remote_traceback = tb  # type: ignore[attr-defined]
    return exc


def trusted_namespace(names, link: Link, keep: set[str]) -> dict:
    """The check's globals: the program's names (its values decoded, its objects as handles),
    except those that would shadow a builtin the check uses (unless `keep`, the names the check
    is meant to call); standard-library modules are the checker's own imports."""
    if type(names) is not dict:
        raise ProtocolError("the program's names are not a mapping")
    tns: dict = {}
    for name, data in names.items():
        if not name.isidentifier() or name == "__builtins__":
            continue
        if hasattr(builtins, name) and name not in keep:
            continue
        if type(data) is list and len(data) == 3 and data[0] == "m" and type(data[1]) is str:
            if data[1].partition(".")[0] in sys.stdlib_module_names:
                try:
                    tns[name] = importlib.import_module(data[1])
                    continue
                except Exception:  # noqa: BLE001, S110 - then the program's own
                    pass
            data = data[2]
        tns[name] = link.decode(data)
    tns["__name__"] = "__main__"

    def exec_(source, globals=None, locals=None):  # noqa: A002 - builtins.exec's signature
        if isinstance(globals, Remote):  # e.g. exec(setup, candidate.__globals__)
            return link.op("exec", source, globals)
        return exec(source, globals, locals)  # noqa: S102

    tns["__builtins__"] = dict(builtins.__dict__, exec=exec_)
    return tns


def report_failure(e: BaseException) -> str:
    name = getattr(e, "remote_name", type(e).__name__)
    try:
        traceback.print_exception(e)
        tb = getattr(e, "remote_traceback", "")
        if tb:
            sys.stderr.write("The program's side:\n" + tb)
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001, S110
        pass
    return f"error {name}: {_first_line(e)}"


def run_check(secret: dict, link: Link) -> str:
    """The verdict line. `passed` only when the check returned and the program's process was
    answering all along."""
    message = link.recv()
    if type(message) is list and message[:1] == ["raised"] and len(message) == 3:
        return f"error {str(message[1])[:100]}: {str(message[2])[:200]}"
    if type(message) is not list or message[:1] != ["ready"] or len(message) != 2:
        raise ProtocolError("the program's process did not report ready")
    keep = {x for x in (secret.get("call") or [])[1:] + [secret.get("entry_point")] if x}
    tns = trusted_namespace(message[1], link, keep)
    try:
        exec(compile(secret["check"], "<check>", "exec"), tns)  # noqa: S102
        if secret["call"]:
            func, arg = secret["call"]
            tns[func](tns[arg])
    except (ProgramEnded, ProtocolError):
        raise
    except BaseException as e:  # noqa: BLE001 - SystemExit included: the tests did not finish
        if link.broken is not None:
            raise link.broken from None
        return report_failure(e)
    if link.broken is not None:
        raise link.broken
    return f"passed {secret['token']}"


def checker(payload: dict, *, in_namespaces: bool) -> None:
    """pid 1 of the run (or the fallback's driver process): fork the program's process, then
    decide the verdict where that process cannot reach."""
    write = lambda line: os.write(RESULT_FD, (line + "\n").encode())  # noqa: E731
    iso = {
        "net": 0,
        "pid": int(in_namespaces and os.getpid() == 1),
        "ipc": 0,
        "fs": 0,
        "uid": 0,
        "sys": 0,
    }
    if in_namespaces:
        if not private_dirs(payload["tmpfs_bytes"]):
            os._exit(123)  # never fall back to the zygote's root: it is not ours to hand out
        iso["fs"] = int(ROOT_READY)
        os.mkdir(WORKDIR, 0o700)
        workdir = WORKDIR
    else:
        workdir = os.getcwd()  # the fresh directory the harness made for this run
    if payload.get("commands"):
        run_commands(payload, in_namespaces, workdir, write, iso)
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        try:
            fd = theirs.detach()
            ours.detach()
            os.dup2(fd, CHANNEL_FD)  # replaces this process's copy of the result pipe
            os.closerange(CHANNEL_FD + 1, 1 << 16)  # the secret pipe, the checker's end
            program_process(payload, in_namespaces, workdir)
        finally:
            os._exit(120)
    theirs.close()
    pidfd = os.pidfd_open(child) if hasattr(os, "pidfd_open") else None
    link = Link(Channel(ours, pidfd))
    try:
        hello = link.recv()
        if type(hello) is list and hello[:1] == ["hello"] and type(hello[1]) is dict:
            iso.update({k: int(hello[1].get(k) == 1) for k in ("net", "uid", "sys")})
            iso["ipc"] = int(hello[1].get("ipc") == 1)
    except (ProgramEnded, ProtocolError):
        pass
    write("iso " + " ".join(f"{k}={v}" for k, v in iso.items()))
    verdict = "error ProtocolError: the checker failed"
    try:
        set_limits(payload["limits"])
        if payload["check_uid"] is not None:
            become(payload["check_uid"])
        prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/<pid>/mem, fd or environ of ours
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        secret = read_secret()
        verdict = run_check(secret, link)
    except ProgramEnded as e:
        code = program_status(child, pidfd)
        verdict = f"exit {code}" if code is not None else f"error ProgramEnded: {e}"
    except ProtocolError as e:
        verdict = f"error ProtocolError: {_first_line(e)}"
    except BaseException as e:  # noqa: BLE001
        verdict = report_failure(e)
    finish(link, pidfd)
    write(verdict)
    os._exit(0 if verdict.startswith("passed ") else 1)


# -- a compiled language's run: commands in order, each in a confined process --------------------
def run_commands(payload: dict, in_namespaces: bool, workdir: str, write, iso: dict) -> None:
    """Write the program's files, then run each command (compile, then run) in a fresh process
    confined like the program's (uid, rlimits, seccomp; the command's own CPU limit) and write
    `cmd I exit CODE` or `cmd I timeout` per command; stop at the first non-zero exit. Only the
    last command's stdout is the run's stdout: earlier ones write it to stderr. Before the last
    command the sources are deleted and native binaries become root-owned and execute-only, so
    the running program cannot read its source or binary back (see docs/eval.md)."""
    home = os.path.join(os.path.dirname(workdir) if in_namespaces else workdir, "home")
    os.mkdir(home, 0o700)
    for name, text in payload["files"].items():
        with open(os.path.join(workdir, os.path.basename(name)), "w", encoding="utf-8") as f:
            f.write(text)
    if payload["uid"] is not None:
        for d in (workdir, home):
            os.chown(d, payload["uid"], payload["uid"])
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    env = dict(
        payload["env"], **{k: v.replace("{home}", home) for k, v in payload["run_env"].items()}
    )
    commands = payload["commands"]
    for i, command in enumerate(commands):
        last = i == len(commands) - 1
        if last and len(commands) > 1:
            hide_files(workdir, payload["files"], payload.get("exec_only", []))
        child, facts_r = spawn_command(payload, command, env, workdir, in_namespaces, last)
        facts = os.read(facts_r, 4096)
        os.close(facts_r)
        if i == 0:
            with contextlib.suppress(ValueError, AttributeError):  # no facts: degraded
                iso.update({k: int(v == 1) for k, v in json.loads(facts).items()})
            write("iso " + " ".join(f"{k}={v}" for k, v in iso.items()))
        code = wait_command(child, command["timeout_s"])
        write(f"cmd {i} " + ("timeout" if code is None else f"exit {code}"))
        if code != 0:
            break
    os._exit(0)


def hide_files(workdir: str, sources, exec_only) -> None:
    """Delete the sources; make each native binary root-owned and execute-only (mode 0111)."""
    for name in sources:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(workdir, os.path.basename(name)))
    for name in exec_only:
        path = os.path.join(workdir, os.path.basename(name))
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o111)
                os.close(fd)


def spawn_command(payload, command, env, workdir, in_namespaces, last):
    """Fork a process for `command`: confined, in its own process group, then exec. Returns its
    pid and a pipe on which it reports its isolation facts before the exec."""
    facts_r, facts_w = os.pipe()
    child = os.fork()
    if child != 0:
        os.close(facts_w)
        return child, facts_r
    try:
        os.close(facts_r)
        os.setpgid(0, 0)
        if not last:
            os.dup2(2, 1)
        os.closerange(3, facts_w)
        os.closerange(facts_w + 1, 1 << 16)
        limits = dict(payload["limits"], cpu_s=int(command["timeout_s"]) + 1)
        facts = confine(dict(payload, limits=limits), in_namespaces, workdir)
        os.write(facts_w, json.dumps(facts).encode())
        os.close(facts_w)
        os.environ.clear()
        os.environ.update(env, PWD=workdir)
        argv = command["argv"]
        os.execve(argv[0], argv, os.environ)
    except BaseException as e:  # noqa: BLE001
        with contextlib.suppress(BaseException):
            os.write(2, f"cannot run {command['argv'][0]}: {e}\n".encode())
    os._exit(127)


def wait_command(child: int, timeout_s: float) -> int | None:
    """The command's exit code (negative: a signal), or None when it outlived its timeout (then
    its process group is killed; anything it left elsewhere dies with the run)."""
    pidfd = os.pidfd_open(child)
    ready, _, _ = select.select([pidfd], [], [], timeout_s)
    os.close(pidfd)
    if not ready:
        with contextlib.suppress(OSError):
            os.killpg(child, signal.SIGKILL)
        os.waitpid(child, 0)
        return None
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def read_secret() -> dict:
    data = bytearray()
    while chunk := os.read(SECRET_FD, 1 << 16):
        data += chunk
    os.close(SECRET_FD)
    return json.loads(data)


def program_status(child: int, pidfd: int | None, timeout: float = 1.0) -> int | None:
    """The program's exit code (negative: a signal), waiting a little for it; None if it is
    still running (it closed its channel and went on)."""
    if pidfd is not None:
        select.select([pidfd], [], [], timeout)
    pid, status = os.waitpid(child, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if pid else None


def finish(link: Link, pidfd: int | None) -> None:
    """Let the program's process flush its output and leave (it cannot change the verdict). A
    process that broke its channel gets no such grace: it dies with the run."""
    if link.broken is not None:
        return
    try:
        link.channel.send(["bye"])
    except OSError:
        return
    if pidfd is not None:
        select.select([pidfd], [], [], 1.0)


# -- the fork server --------------------------------------------------------------------------
def _recv_request(sock: socket.socket) -> tuple[dict, list[int]] | None:
    head, fds, _, _ = socket.recv_fds(sock, 8, 4)
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


def place_fds(fds: list[int], first: int) -> None:
    """dup `fds` to first, first+1, ... whatever their numbers now (they may overlap those)."""
    high = [fcntl.fcntl(f, fcntl.F_DUPFD, first + len(fds)) for f in fds]
    for i, f in enumerate(high):
        os.dup2(f, first + i)
    for f in high:
        os.close(f)


def _child(payload: dict, fds: list[int], keep_closed: list[int]) -> None:
    """In the forked child: become a session, unshare pid+mount+ipc, fork pid 1, relay its status."""
    try:
        for fd in keep_closed:
            os.close(fd)
        os.setsid()
        if LIBC.unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC) != 0:
            os._exit(121)
        pid = os.fork()
        if pid == 0:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            devnull = os.open(os.devnull, os.O_RDONLY)
            place_fds([devnull, *fds], 0)  # stdin, stdout, stderr, result, secret
            os.closerange(SECRET_FD + 1, 1 << 16)
            checker(payload, in_namespaces=True)
        os.closerange(0, 1 << 16)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    except BaseException:  # noqa: BLE001 - never return into the server loop
        os._exit(122)


def zygote(config: dict, sock_fd: int) -> None:
    global ROOT_READY, EXTRA_READ_ONLY
    EXTRA_READ_ONLY = [os.path.abspath(p) for p in config.get("read_only", [])]
    sock = socket.socket(fileno=sock_fd)
    ok = LIBC.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC) == 0
    ok = ok and mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    ok = ok and network_isolated()
    covered = None
    try:
        if ok:
            covered = build_root(config.get("read_only", []), config.get("covered"))
    except OSError:
        covered = None
    ROOT_READY = covered is not None
    _filter_program()  # once here: every run's program process inherits it built
    if not ROOT_READY:
        sock.sendall(b"failed\n")
        return
    sock.sendall(b"ready " + json.dumps(covered).encode() + b"\n")
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
    place_fds([payload.pop("result_fd"), payload.pop("secret_fd")], RESULT_FD)
    os.closerange(SECRET_FD + 1, 1 << 16)
    checker(payload, in_namespaces=False)


if __name__ == "__main__":
    main()
