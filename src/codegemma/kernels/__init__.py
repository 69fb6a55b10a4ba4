"""CPU kernels for decoding, and the functions that use them where they are faster.

A decode step multiplies one activation row per sequence by every weight matrix, so on CPU it is
bound by how fast the weights stream from memory; torch's GEMM reaches ~60% of the read bandwidth
on these shapes (see docs/benchmarks.md). `cpu.c` has a matmul for a few rows that reads each
weight row once per call and runs at the memory's speed, and fused RMSNorm and rotary embedding
(one pass each where torch takes 6-10 small ops, which dominate a small model's step).

The C file ships with the package and is compiled on first use with the system C compiler
(`$CC`, else `cc`/`gcc`; about a second) for this CPU (-march=native), into
`$XDG_CACHE_HOME/codegemma/kernels/<hash>/` (a temp file renamed into place, so concurrent
first uses are safe). Without a compiler, off x86-64, or with `CODEGEMMA_KERNELS=0`, every
function here is plain torch. Autograd, torch.compile, tensor subclasses and non-CPU tensors
always take the torch path, so training is untouched.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")
# Activation rows per call, by dtype: above these torch's GEMM is as fast (bench_gemv.py --rows).
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 4}
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ISA_NAMES = {1: "avx2", 2: "avx512", 3: "avx512-bf16"}
_DTYPES = (torch.float32, torch.bfloat16)
_PLAIN = (Tensor, nn.Parameter)
_threads = torch.get_num_threads  # torch's intra-op setting, passed to every OpenMP region


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "codegemma" / "kernels"


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def build(directory: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile cpu.c for this CPU (once; later calls find it) and return the library's path.
    `extra_flags` (e.g. -mno-avx512f) build a lower instruction-set variant, for tests.
    Raises RuntimeError naming the compiler's complaint when it cannot be built."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc) for codegemma's kernels")
    flags = (*CFLAGS, *extra_flags)
    key = hashlib.sha256(
        b"\0".join(
            [SOURCE.read_bytes(), cc.encode(), " ".join(flags).encode(), _cpu_key().encode()]
        )
    ).hexdigest()[:16]
    out = (directory or cache_dir()) / key / "libcodegemma_cpu.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} with {cc} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class _Library:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        self.isa = lib.codegemma_gemv_isa()
        ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        signatures = {
            "gemv": [ptr, ptr, ptr, i64, i64, i64, i32],  # x, w, y, M, N, K, threads
            "rmsnorm": [ptr, ptr, ptr, i64, i64, f32, i32],  # x, w, y, rows, dim, eps, threads
            "rotary": [ptr, ptr, ptr, i64, i64, i64, i32],  # x, cos, sin, rows, heads, dim, thr.
        }
        self.fns: dict[str, dict[torch.dtype, ctypes._CFuncPtr]] = {}
        for op, argtypes in signatures.items():
            if op == "gemv" and not self.isa:
                continue
            self.fns[op] = {}
            for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                fn = getattr(lib, f"codegemma_{op}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self.fns[op][dtype] = fn


@functools.cache
def library() -> _Library | None:
    """The compiled kernels, or None where they are off or unavailable (then torch's ops run)."""
    if os.environ.get("CODEGEMMA_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        lib = _Library(build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("codegemma kernels unavailable, using torch's ops: %s", e)
        return None
    if not lib.isa:
        log.info("this CPU has neither AVX2+FMA nor AVX-512: using torch's ops")
        return None
    return lib


def isa() -> str | None:
    """The instruction set the kernels were built for, or None when they are not in use."""
    lib = library()
    return ISA_NAMES[lib.isa] if lib else None


def usable(*tensors: Tensor) -> _Library | None:
    """The library when the kernels may run on these tensors: plain CPU tensors (not a DTensor or
    other subclass: the kernels read raw storage) of one dtype, fp32 or bf16, needing no gradient,
    outside torch.compile. None means: use torch."""
    dtype = tensors[0].dtype
    if dtype not in _DTYPES or torch.compiler.is_compiling():
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if (
            t.dtype != dtype
            or not t.is_cpu
            or type(t) not in _PLAIN
            or (grad and t.requires_grad)
            or not t.is_contiguous()
        ):
            return None
    return library()


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight[N, K]^T with the kernel: CPU, fp32 or bf16 (both the same), at most
    MAX_ROWS[dtype] rows in x. Raises ValueError otherwise, or RuntimeError when kernels are off."""
    lib = library()
    if lib is None:
        raise RuntimeError("codegemma kernels are not available here; use F.linear")
    if x.dtype != weight.dtype or x.dtype not in _DTYPES:
        raise ValueError(
            f"gemv takes fp32 or bf16 x and weight of one dtype, got {x.dtype} and {weight.dtype}"
        )
    if (
        not x.is_cpu
        or not weight.is_cpu
        or weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or x.numel() > MAX_ROWS[x.dtype] * x.shape[-1]
    ):
        raise ValueError(
            f"gemv takes CPU x [<= {MAX_ROWS[x.dtype]} rows, K] and weight [N, K], "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    return _gemv(lib, x.contiguous(), weight.contiguous())


def _gemv(lib: _Library, x: Tensor, weight: Tensor) -> Tensor:
    """The call itself, for checked, contiguous arguments (a decode step makes ~100 of these, so
    every microsecond of Python here shows)."""
    n, k = weight.shape
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype)
    if not k:  # an empty sum
        return y.zero_()
    if n:
        lib.fns["gemv"][x.dtype](
            x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // k, n, k, _threads()
        )
    return y


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through the kernel for few rows (decoding); F.linear itself otherwise."""
    if x.numel() <= MAX_ROWS.get(x.dtype, 0) * x.shape[-1] and (lib := usable(x, weight)):
        y = _gemv(lib, x, weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def rms_norm(lib: _Library, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Gemma's RMSNorm (fp32 math, (1 + w) scale) of contiguous x [..., D] by the kernel; `lib`
    from `usable(x, weight)`."""
    y = torch.empty_like(x)
    dim = x.shape[-1]
    lib.fns["rmsnorm"][x.dtype](
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps, _threads()
    )
    return y


def rotary_(lib: _Library, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, D] (contiguous) in place by cos, sin [B, 1, T, D]; `lib` from
    `usable(x, cos, sin)`. Returns x."""
    B, T, H, D = x.shape
    lib.fns["rotary"][x.dtype](
        x.data_ptr(), cos.data_ptr(), sin.data_ptr(), B * T, H, D, _threads()
    )
    return x


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose forward is `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
