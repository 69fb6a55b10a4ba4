"""CPU kernels for decoding and for quantized matrices, compiled on first use.

A decode step multiplies one activation row per sequence by every weight matrix, so on CPU it is
bound by how fast the weights stream from memory, and torch's GEMM stays well below the read
bandwidth on these shapes (docs/benchmarks.md, bench_gemv.py). `cpu.c` has a matmul for a few rows
that reads each weight row once per call and runs at the memory's speed, for fp32/bf16 matrices
(`gemv`) and for matrices in ggml's block formats (`qgemv`, cpu_quant.h: Q8_0, Q4_0, Q4_K, Q6_K
decoded in registers to quant.py's float32 values, so the result is the float matmul of the
dequantized matrix), a dequantization into fp32/bf16 (`dequantize`, for prefill: a float GEMM on
dequantized tiles), and the whole decode step of a Gemma model in one call (step.py's
`DecodeStep`, which the engine builds for its KV cache).

The C file ships with the package and is compiled on first use with the system C compiler
(`$CC`, else `cc`/`gcc`) for this CPU (-march=native; the code uses AVX2/AVX-512 intrinsics and
never AMX), into `$XDG_CACHE_HOME/codegemma/kernels/<hash>/` (a temp file renamed into place, so
concurrent first uses are safe). Without a compiler, off x86-64, or with `CODEGEMMA_KERNELS=0`,
`library()` is None and callers keep torch's ops. model.py calls none of the compiled kernels:
the engine (decode) and quant.py (quantized matmuls) choose them, and only for plain CPU tensors
outside autograd and torch.compile (`usable`).

`linear` is the other choice made here, between two GEMMs that torch itself ships: every float
matmul of model.py and quant.py goes through it. torch's fp32 GEMM is MKL's, and MKL takes its
AVX-512 code only on Intel CPUs; elsewhere (AMD's EPYC, which has AVX-512 too) it runs its AVX2
code, and torch's oneDNN matmul is 2-3x faster on prefill-sized products (bench_linear.py).
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

SOURCE = Path(__file__).with_name("cpu.c")  # includes cpu_quant.h, and cpu_typed.h once per dtype
HEADERS = (SOURCE.with_name("cpu_typed.h"), SOURCE.with_name("cpu_quant.h"))
# Activation rows per call, by dtype: above these torch's GEMM is as fast (bench_gemv.py --rows).
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 4}
# The same against weight rows of at least WIDE_K values (cpu.c's KWIDE), which cpu.c reads in
# blocks of rows when there are several activation rows: bf16 still wins at 8 (bench_gemv.py, 2b).
WIDE_K = 2048
MAX_ROWS_WIDE = {torch.float32: 16, torch.bfloat16: 8}
# Activation rows up to which `qgemv` (each weight row decoded once per 8 rows) beats dequantizing
# the matrix for torch's GEMM (bench_gemv.py --formats); quant.py switches there.
MAX_ROWS_QUANT = 16
# fp32 products of at least this many multiply-adds (M * K * N) go to oneDNN where `onednn_fp32()`;
# below it oneDNN's cost per call loses to MKL (bench_linear.py: 8x192 @ 192x768 ties)
ONEDNN_MIN_MACS = 1 << 21
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ISA_NAMES = {1: "avx2", 2: "avx512", 3: "avx512-bf16"}
# ggml type ids (GGUF's, quant.FORMATS' ggml_type) the kernels read: the two float dtypes, as the
# matrices' own, and the block formats of cpu_quant.h
DTYPE_FORMATS = {torch.float32: 0, torch.bfloat16: 30}
QUANT_FORMATS = {"Q8_0": 8, "Q4_0": 2, "Q4_K": 12, "Q6_K": 14}
_DTYPES = tuple(DTYPE_FORMATS)
_PLAIN = (Tensor, nn.Parameter)
_threads = torch.get_num_threads  # torch's intra-op setting, passed to every OpenMP region


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "codegemma" / "kernels"


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's vendor, model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("vendor_id", "model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cpu_flags() -> list[str]:
    return next((ln for ln in _cpu_key().splitlines() if ln.startswith("flags")), "").split()


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (the avx512_bf16 or amx_bf16 flag): there torch's
    bf16 GEMM is several times faster than its fp32 one."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def onednn_fp32() -> bool:
    """Whether fp32 CPU matmuls should go to torch's oneDNN instead of MKL: on an x86-64 CPU with
    AVX-512 that is not Intel's, whose MKL sgemm keeps to AVX2 (see the module's docstring).
    `CODEGEMMA_ONEDNN=1` or `0` decides instead."""
    forced = os.environ.get("CODEGEMMA_ONEDNN")
    if forced in ("0", "1"):
        return forced == "1" and torch.backends.mkldnn.is_available()
    key = _cpu_key()
    intel = "GenuineIntel" in key or "vendor_id" not in key  # unknown: keep torch's own choice
    return torch.backends.mkldnn.is_available() and "avx512f" in _cpu_flags() and not intel


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """F.linear(x, weight) (x [..., K], weight [N, K], no bias), by oneDNN where `onednn_fp32()`
    and the product is large enough: plain fp32 CPU tensors outside autograd and torch.compile.
    Each output is a float32 dot product either way; oneDNN may sum it in another order."""
    if (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and x.is_cpu
        and weight.is_cpu
        and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and onednn_fp32()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


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
            [
                SOURCE.read_bytes(),
                *(h.read_bytes() for h in HEADERS),
                cc.encode(),
                " ".join(flags).encode(),
                _cpu_key().encode(),
            ]
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
            [cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} with {cc} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class ModelDims(ctypes.Structure):
    """cpu.c's model_dims: a Gemma decoder's sizes and its KV cache's, for the decode step."""

    _fields_ = [
        *(
            (name, ctypes.c_int64)
            for name in (
                "layers",
                "hidden",
                "heads",
                "kv_heads",
                "head_dim",
                "intermediate",
                "vocab",
                "cache_rows",
                "cache_len",
            )
        ),
        ("eps", ctypes.c_float),
        ("embed_scale", ctypes.c_float),
    ]


class _Library:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        self.isa = lib.codegemma_gemv_isa()
        self.fns: dict[str, dict[torch.dtype, ctypes._CFuncPtr]] = {}
        if not self.isa:
            return
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        signatures = {
            "gemv": [ptr, ptr, ptr, i64, i64, i64, i32],  # x, w, y, M, N, K, threads
            "qgemv": [ptr, ptr, i32, ptr, i64, i64, i64, i32],  # xf, w, fmt, y, M, N, K, thr.
            # dims, layer pointers, their formats, embed, its format, final norm, lm_head, its
            # format, tokens, positions, rows, cos, sin, B, logits, scratch, threads
            "decode": [ctypes.POINTER(ModelDims), ptr, ptr, ptr, i32, ptr, ptr, i32]
            + [ptr] * 5
            + [i64, ptr, ptr, i32],
        }
        for op, argtypes in signatures.items():
            self.fns[op] = {}
            for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                fn = getattr(lib, f"codegemma_{op}_{suffix}")
                fn.argtypes, fn.restype = argtypes, (ctypes.c_int if op == "decode" else None)
                self.fns[op][dtype] = fn
        self.dequantize = lib.codegemma_dequantize  # w, fmt, out, bf16?, rows, K, threads
        self.dequantize.argtypes, self.dequantize.restype = (
            [ptr, i32, ptr, i32, i64, i64, i32],
            None,
        )
        self.scratch_bytes = lib.codegemma_decode_scratch_bytes
        self.scratch_bytes.argtypes = [ctypes.POINTER(ModelDims), i64]
        self.scratch_bytes.restype = i64


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
    """The library when the kernels may read these tensors: plain (not a DTensor or other
    subclass: the kernels read raw storage), contiguous CPU tensors needing no gradient, outside
    torch.compile. None means: use torch."""
    if torch.compiler.is_compiling():
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if (
            not t.is_cpu
            or type(t) not in _PLAIN
            or (grad and t.requires_grad)
            or not t.is_contiguous()
        ):
            return None
    return library()


def max_rows(dtype: torch.dtype, k: int) -> int:
    """How many activation rows the float kernel takes against weight rows of k values (0: none)."""
    return (MAX_ROWS_WIDE if k >= WIDE_K else MAX_ROWS).get(dtype, 0)


def _require() -> _Library:
    lib = library()
    if lib is None:
        raise RuntimeError("codegemma kernels are not available here; use torch's ops")
    return lib


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight[N, K]^T with the kernel: CPU, fp32 or bf16 (both the same), at most
    max_rows(dtype, K) rows in x. Raises ValueError otherwise, or RuntimeError when kernels are
    off."""
    lib = _require()
    if x.dtype != weight.dtype or x.dtype not in _DTYPES:
        raise ValueError(
            f"gemv takes fp32 or bf16 x and weight of one dtype, got {x.dtype} and {weight.dtype}"
        )
    if (
        not x.is_cpu
        or not weight.is_cpu
        or weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or x.numel() > max_rows(x.dtype, x.shape[-1]) * x.shape[-1]
    ):
        raise ValueError(
            f"gemv takes CPU x [<= {max_rows(x.dtype, x.shape[-1])} rows, K] and weight [N, K], "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    return _gemv(lib, x.contiguous(), weight.contiguous())


def _gemv(lib: _Library, x: Tensor, weight: Tensor) -> Tensor:
    """The call itself, for checked, contiguous arguments."""
    n, k = weight.shape
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype)
    if not k:  # an empty sum
        return y.zero_()
    if n:
        lib.fns["gemv"][x.dtype](
            x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // k, n, k, _threads()
        )
    return y


def _check_blocks(blocks: Tensor, fmt, k: int) -> int:
    """The ggml type id of quantized `blocks` [N, row bytes of k values] in BlockFormat `fmt`."""
    if fmt.name not in QUANT_FORMATS:
        raise ValueError(f"the kernels read {', '.join(QUANT_FORMATS)} blocks, not {fmt.name}")
    if (
        blocks.dtype != torch.uint8
        or blocks.dim() != 2
        or blocks.shape[1] != fmt.row_bytes(k)
        or not blocks.is_cpu
    ):
        raise ValueError(
            f"{fmt.name} blocks of rows of {k} values must be CPU uint8 [N, {fmt.row_bytes(k)}], "
            f"got {blocks.device} {blocks.dtype} {tuple(blocks.shape)}"
        )
    return QUANT_FORMATS[fmt.name]


def qgemv(x: Tensor, blocks: Tensor, fmt) -> Tensor:
    """x [..., K] (fp32 or bf16) @ W^T for W [N, K] held as `blocks` (uint8 [N, row bytes]) in the
    quantized BlockFormat `fmt` (quant.py): the float32 product with the dequantized matrix,
    summed in fp32 and rounded once to x's dtype. Any number of rows (it pays up to
    MAX_ROWS_QUANT). Raises ValueError for bad arguments, RuntimeError when kernels are off."""
    lib = _require()
    if x.dtype not in _DTYPES or not x.is_cpu:
        raise ValueError(f"qgemv takes CPU fp32 or bf16 x, got {x.device} {x.dtype}")
    k = x.shape[-1]
    code = _check_blocks(blocks, fmt, k)
    return _qgemv(lib, x, blocks.contiguous(), code)


def _qgemv(lib: _Library, x: Tensor, blocks: Tensor, code: int) -> Tensor:
    k, n = x.shape[-1], blocks.shape[0]
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype)
    m = x.numel() // k if k else 0
    if not k:
        return y.zero_()
    if n and m:
        xf = x.float().contiguous()
        lib.fns["qgemv"][x.dtype](
            xf.data_ptr(), blocks.data_ptr(), code, y.data_ptr(), m, n, k, _threads()
        )
    return y


def dequantize(blocks: Tensor, fmt, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """Quantized `blocks` [N, row bytes] in BlockFormat `fmt` -> [N, K] of fp32 or bf16 (into
    `out` when given): quant.dequantize's float32 values, bf16 rounded once to nearest even."""
    lib = _require()
    if dtype not in _DTYPES:
        raise ValueError(f"dequantize writes fp32 or bf16, not {dtype}")
    k = blocks.shape[1] // fmt.type_size * fmt.block_size if blocks.dim() == 2 else -1
    code = _check_blocks(blocks, fmt, k)
    blocks = blocks.contiguous()
    shape = (blocks.shape[0], k)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be contiguous {dtype} {list(shape)}, got {out.dtype} {out.shape}"
        )
    if out.numel():
        lib.dequantize(
            blocks.data_ptr(),
            code,
            out.data_ptr(),
            dtype == torch.bfloat16,
            shape[0],
            k,
            _threads(),
        )
    return out
