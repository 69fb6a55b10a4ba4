"""CPU kernels for decoding, and the functions that use them where they are faster.

A decode step multiplies one activation row per sequence by every weight matrix, so on CPU it is
bound by how fast the weights stream from memory, and torch's GEMM stays well below the read
bandwidth on these shapes (docs/benchmarks.md, bench_gemv.py). `cpu.c` has a matmul for a few rows that reads each
weight row once per call and runs at the memory's speed, and fused RMSNorm and rotary embedding
(one pass each where torch takes 6-10 small ops, which dominate a small model's step).

The C file ships with the package and is compiled on first use with the system C compiler
(`$CC`, else `cc`/`gcc`) for this CPU (-march=native), into
`$XDG_CACHE_HOME/codegemma/kernels/<hash>/` (a temp file renamed into place, so concurrent
first uses are safe). Without a compiler, off x86-64, or with `CODEGEMMA_KERNELS=0`, every
function here is plain torch. Autograd, torch.compile, tensor subclasses and non-CPU tensors
always take the torch path, so training is untouched.

`DecodeStep` runs a whole decode step of a Gemma model (every layer, for a few sequences) in one
call; GemmaForCausalLM.forward uses it for one-token steps with a KV cache (see model.py).
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
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.c")  # includes cpu_typed.h, once per dtype
HEADERS = (SOURCE.with_name("cpu_typed.h"),)
# Activation rows per call, by dtype: above these torch's GEMM is as fast (bench_gemv.py --rows).
MAX_ROWS = {torch.float32: 16, torch.bfloat16: 4}
# The same against weight rows of at least WIDE_K values (cpu.c's KWIDE), which cpu.c reads in
# blocks of rows when there are several activation rows: bf16 still wins at 8 (bench_gemv.py, 2b).
WIDE_K = 2048
MAX_ROWS_WIDE = {torch.float32: 16, torch.bfloat16: 8}
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
            [cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
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
        ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        signatures = {
            "gemv": [ptr, ptr, ptr, i64, i64, i64, i32],  # x, w, y, M, N, K, threads
            "rmsnorm": [ptr, ptr, ptr, i64, i64, f32, i32],  # x, w, y, rows, dim, eps, threads
            "rotary": [ptr, ptr, ptr, i64, i64, i64, i32],  # x, cos, sin, rows, heads, dim, thr.
        }
        if self.isa:
            # dims, layer pointers, embed, final norm, lm_head, tokens, positions, rows, cos, sin,
            # B, logits, scratch, threads
            signatures["decode"] = [ctypes.POINTER(ModelDims), ptr, *[ptr] * 8, i64, ptr, ptr, i32]
            self.scratch_bytes = lib.codegemma_decode_scratch_bytes
            self.scratch_bytes.argtypes = [ctypes.POINTER(ModelDims), i64]
            self.scratch_bytes.restype = i64
        self.fns: dict[str, dict[torch.dtype, ctypes._CFuncPtr]] = {}
        for op, argtypes in signatures.items():
            if op == "gemv" and not self.isa:
                continue
            self.fns[op] = {}
            for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                fn = getattr(lib, f"codegemma_{op}_{suffix}")
                fn.argtypes, fn.restype = argtypes, (ctypes.c_int if op == "decode" else None)
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


def max_rows(dtype: torch.dtype, k: int) -> int:
    """How many activation rows the kernel takes against weight rows of k values (0: none)."""
    return (MAX_ROWS_WIDE if k >= WIDE_K else MAX_ROWS).get(dtype, 0)


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight[N, K]^T with the kernel: CPU, fp32 or bf16 (both the same), at most
    max_rows(dtype, K) rows in x. Raises ValueError otherwise, or RuntimeError when kernels are
    off."""
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
        or x.numel() > max_rows(x.dtype, x.shape[-1]) * x.shape[-1]
    ):
        raise ValueError(
            f"gemv takes CPU x [<= {max_rows(x.dtype, x.shape[-1])} rows, K] and weight [N, K], "
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
    k = x.shape[-1]
    if x.numel() <= max_rows(x.dtype, k) * k and (lib := usable(x, weight)):
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


# What the decode step reads per layer, in cpu.c's order (its P_* enum): the layer's parameters
# as transformers names them (under model.layers.N.), then that layer's KV-cache buffers.
LAYER_PARTS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "k_cache",
    "v_cache",
)

# Bumped whenever any module registers a parameter or buffer (e.g. load_state_dict(assign=True)
# or `layer.weight = nn.Parameter(...)`), so a DecodeStep holding the old tensors knows it is stale.
_registrations = 0


def _registered(module: nn.Module, name: str, value: Tensor | None) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_buffer_registration_hook(_registered)


def shortest_row(dims: ModelDims) -> int:
    """The shortest weight row a decode step reads: the smallest K of its matrices."""
    return min(dims.hidden, dims.heads * dims.head_dim, dims.intermediate)


class NoDecodeStep:
    """What GemmaForCausalLM keeps when its step cannot be fused (e.g. a layer with a bias, a
    cache of another dtype), so that it does not look again every step; falsy. Stale, like a
    DecodeStep, once any module registers a parameter or buffer."""

    requires_grad, max_rows = False, 0

    def __init__(self, owner: nn.Module) -> None:
        self.owner = weakref.ref(owner)
        self._registrations = _registrations

    def __bool__(self) -> bool:
        return False

    def current(self) -> bool:
        return self._registrations == _registrations


class DecodeStep:
    """A whole decode step of a Gemma model with its KV cache in one kernel call (cpu.c's
    codegemma_decode): for B <= `max_rows` sequences, one new token each, the embedding,
    every layer (norms, q/k/v, rotary, cache write, attention over each row's cached positions,
    o, MLP, residuals), the final norm and the output head, all in one OpenMP team, with the
    roundings of the torch modules (the matmuls' and the softmax's sums in another order).

    Made by GemmaForCausalLM for one (model, cache) pair from the tensors it reads (`layers`: per
    layer, the LAYER_PARTS; all plain, contiguous CPU tensors of one dtype). It keeps their
    addresses: `current()` is False once any of them moved (model.to(), `.data =`) or any module
    registered a new parameter or buffer since, and the owner then makes a new one."""

    def __init__(
        self,
        lib: _Library,
        dims: ModelDims,
        layers: Sequence[Sequence[Tensor]],
        embed: Tensor,
        final_norm: Tensor,
        lm_head: Tensor,
        owner: nn.Module,
    ) -> None:
        if any(len(parts) != len(LAYER_PARTS) for parts in layers):
            raise ValueError(f"each layer needs its {len(LAYER_PARTS)} tensors: {LAYER_PARTS}")
        self.tensors = [*(t for parts in layers for t in parts), embed, final_norm, lm_head]
        self._ptrs = [t.data_ptr() for t in self.tensors]
        self._table = (ctypes.c_void_p * (len(self._ptrs) - 3))(*self._ptrs[:-3])
        self._lib, self._dims, self.dtype = lib, dims, embed.dtype
        self._fn = lib.fns["decode"][self.dtype]
        self.requires_grad = any(t.requires_grad for t in self.tensors)
        self.max_rows = max_rows(self.dtype, shortest_row(dims))
        self.owner = weakref.ref(owner)
        self._registrations = _registrations
        self._scratch: dict[int, Tensor] = {}

    def __reduce__(self):  # copies and pickles of a cache carry no step (ctypes pointers can't be
        return type(None), ()  # copied, and a copy's tensors live elsewhere): it is made afresh

    def current(self) -> bool:
        return self._registrations == _registrations and self._ptrs == [
            t.data_ptr() for t in self.tensors
        ]

    def __call__(
        self, tokens: Tensor, positions: Tensor, rows: Tensor, cos: Tensor, sin: Tensor
    ) -> Tensor:
        """tokens, positions, rows: [B] int64 (rows: the cache rows written and read); cos, sin:
        [B, head_dim] in the dtype. Returns logits [B, vocab]. IndexError when a token, position
        or row is out of range (nothing is written then)."""
        B = tokens.shape[0]
        if self.max_rows < B:
            raise ValueError(f"this decode step takes at most {self.max_rows} rows, got {B}")
        scratch = self._scratch.get(B)
        if scratch is None:
            size = self._lib.scratch_bytes(ctypes.byref(self._dims), B)
            scratch = self._scratch[B] = torch.empty(size, dtype=torch.uint8)
        logits = torch.empty(B, self._dims.vocab, dtype=self.dtype)
        embed, final_norm, lm_head = self.tensors[-3:]
        failed = self._fn(
            ctypes.byref(self._dims),
            self._table,
            embed.data_ptr(),
            final_norm.data_ptr(),
            lm_head.data_ptr(),
            tokens.data_ptr(),
            positions.data_ptr(),
            rows.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            B,
            logits.data_ptr(),
            scratch.data_ptr(),
            _threads(),
        )
        if failed:
            d = self._dims
            raise IndexError(
                f"decode step out of range: token ids must be < {d.vocab}, positions < the "
                f"cache's max_seq_len {d.cache_len}, cache rows < its batch size {d.cache_rows}; "
                f"got tokens {tokens.tolist()}, positions {positions.tolist()}, rows "
                f"{rows.tolist()}"
            )
        return logits
