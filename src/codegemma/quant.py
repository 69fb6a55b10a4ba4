"""Weights in ggml's block formats (the layouts GGUF files store), read and written in plain torch.

A quantized matrix [N, K] is N rows of K/block_size blocks each, every block a fixed number of
bytes (ggml's `ggml-common.h` structs, little-endian, fp16 scales):

- Q8_0: 32 values in 34 bytes: fp16 scale d, then 32 int8 q; value = q * d.
- Q4_0: 32 values in 18 bytes: fp16 d, then 16 bytes of nibbles; value = (q - 8) * d, where the
  low nibble of byte j is element j and the high nibble element j + 16.
- Q5_0: 32 values in 22 bytes: fp16 d, a little-endian uint32 of fifth bits (bit j: element j),
  16 bytes of nibbles as Q4_0's; value = (q - 16) * d. llama-quantize writes it where a Q4_K
  row does not divide into 256-value blocks (a model narrower than Gemma's, e.g. in tests); the
  kernels do not read it, so such matrices take the reference path.
- Q4_K: 256 values in 144 bytes: fp16 d and dmin, 12 bytes packing eight 6-bit scales and mins,
  128 bytes of nibbles (per 64 values: 32 low nibbles, then the same bytes' high nibbles); value
  = d * scale * q - dmin * min.
- Q6_K: 256 values in 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8
  scales, fp16 d; value = d * scale * (q - 32).

F32, F16 and BF16 are "blocks" of one value. Dequantization performs exactly the float32
operations of gguf-py's `gguf.quants` (which mirrors ggml's reference C), in the same order, so its
results equal `gguf.quants.dequantize` bit for bit; `quantize` does the same for Q8_0 and Q4_0
(ggml's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`).

In the model, `QuantizedLinear` and `QuantizedEmbedding` hold the raw blocks as a uint8 buffer
named `weight` ([out_features, bytes per row]; from a GGUF file a view of its memory map, never
requantized). `QuantizedMatrix.project` is their matmul: the reference path dequantizes the whole
matrix to the activations' dtype and calls F.linear, on any device. On CPU, with the kernels
(kernels/cpu_quant.h) and no autograd, the same product runs from the blocks: for a few rows
(decoding) `kernels.qgemv` decodes each block in registers; for more (prefill) the matrix is
dequantized in tiles of rows small enough to stay in the last-level cache, each multiplied by
torch's GEMM (`DEQUANT_TILE`). Both see the values `dequantize` gives; the few-row kernel sums
against them in fp32, before any rounding of the weights to bf16. The engine's whole-step decode
(kernels/step.py) reads the same blocks.

    blocks = quantize(weight, "Q8_0")                  # uint8 [N, K // 32 * 34]
    torch.equal(dequantize(blocks, "Q8_0"), ...)       # float32 [N, K]
    quantize_model(model, "q4_0")                      # every matrix, the embedding included
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codegemma import kernels
from codegemma.errors import UsageError


@dataclass(frozen=True)
class BlockFormat:
    """One ggml tensor type: `ggml_type` is its id in GGUF tensor infos (ggml's `ggml_type`)."""

    name: str
    ggml_type: int
    block_size: int  # values per block
    type_size: int  # bytes per block

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of k values; k must be a whole number of blocks."""
        if k % self.block_size:
            raise UsageError(
                f"{self.name} stores rows in blocks of {self.block_size} values; a row of {k} "
                f"values does not divide into them"
            )
        return k // self.block_size * self.type_size


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("F32", 0, 1, 4),
        BlockFormat("F16", 1, 1, 2),
        BlockFormat("Q4_0", 2, 32, 18),
        BlockFormat("Q5_0", 6, 32, 22),
        BlockFormat("Q8_0", 8, 32, 34),
        BlockFormat("Q4_K", 12, 256, 144),
        BlockFormat("Q6_K", 14, 256, 210),
        BlockFormat("BF16", 30, 1, 2),
    )
}
QUANTIZERS = ("Q8_0", "Q4_0")  # the formats `quantize` writes (besides the float ones)
FLOAT_FORMATS = ("F32", "F16", "BF16")
_CHUNK_BLOCKS = 1 << 16  # blocks quantized per step, bounding the float32 temporaries
# Values per tile when a many-row matmul dequantizes a matrix for torch's GEMM: 16 MB in bf16,
# within the last-level cache when the GEMM reads it, and few GEMM calls per matrix
DEQUANT_TILE = 1 << 23


def block_format(name: str | BlockFormat) -> BlockFormat:
    """The format named `name` (case-insensitive: "q8_0", "Q8_0")."""
    if isinstance(name, BlockFormat):
        return name
    fmt = FORMATS.get(str(name).upper())
    if fmt is None:
        raise UsageError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}")
    return fmt


# -- dequantization -------------------------------------------------------------------------------
def dequantize(data: Tensor, fmt: str | BlockFormat) -> Tensor:
    """uint8 data [..., row bytes] in format `fmt` -> float32 [..., row values]."""
    fmt = block_format(fmt)
    if data.dtype != torch.uint8 or data.dim() == 0 or data.shape[-1] % fmt.type_size:
        raise ValueError(
            f"{fmt.name} data must be uint8 [..., n * {fmt.type_size}] bytes, got "
            f"{data.dtype} {tuple(data.shape)}"
        )
    lead = data.shape[:-1]
    blocks = data.reshape(-1, fmt.type_size)
    values = _DEQUANTIZE[fmt.name](blocks)
    return values.reshape(*lead, data.shape[-1] // fmt.type_size * fmt.block_size)


def _f16(b: Tensor) -> Tensor:
    """Bytes [n, 2m] of little-endian fp16 -> float32 [n, m], NaN payloads kept as gguf-py (numpy)
    keeps them (torch's own cast makes every NaN 0x7fffffff)."""
    h = b.contiguous().view(torch.int16)
    f = h.view(torch.float16).float()
    bits = h.to(torch.int32) & 0xFFFF
    nan = ((bits & 0x7C00) == 0x7C00) & ((bits & 0x03FF) != 0)
    if bool(nan.any()):
        exact = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x03FF) << 13)
        f = torch.where(nan, exact.view(torch.float32), f)
    return f


def _nibbles(qs: Tensor) -> Tensor:
    """Bytes [n, ..., m] -> [n, ..., 2, m]: low nibbles, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _deq_f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32)


def _deq_f16(b: Tensor) -> Tensor:
    return _f16(b)


def _deq_bf16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.bfloat16).float()  # exact: bf16 is fp32's top half


def _deq_q8_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _deq_q4_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).reshape(-1, 32).to(torch.int8) - 8
    return d * q.float()


def _deq_q5_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    qh = b[:, 2:6].to(torch.int64)
    high = (qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24)[:, None]
    fifth = (high >> torch.arange(32, device=b.device)) & 1
    q = (_nibbles(b[:, 6:]).reshape(-1, 32).to(torch.int64) | fifth << 4).to(torch.int8) - 16
    return d * q.float()


def _q4_k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and mins of a Q4_K block from its 12 packed bytes."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scales, mins


def _deq_q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scales, mins = _q4_k_scales(b[:, 4:16])
    d = (d * scales.float()).reshape(n, 8, 1)
    dm = (dmin * mins.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, 256)


def _deq_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)


_DEQUANTIZE = {
    "F32": _deq_f32,
    "F16": _deq_f16,
    "BF16": _deq_bf16,
    "Q8_0": _deq_q8_0,
    "Q4_0": _deq_q4_0,
    "Q5_0": _deq_q5_0,
    "Q4_K": _deq_q4_k,
    "Q6_K": _deq_q6_k,
}


# -- quantization ---------------------------------------------------------------------------------
def quantize(x: Tensor, fmt: str | BlockFormat) -> Tensor:
    """Float x [..., K] -> uint8 [..., row bytes] in `fmt` (Q8_0, Q4_0, or a float format).

    Runs on CPU in float32 whatever x's device (the reference's exact roundings; a GPU's division
    by a scalar is not IEEE division), in chunks of rows so temporaries stay small. Returns a CPU
    tensor."""
    fmt = block_format(fmt)
    if fmt.name not in QUANTIZERS + FLOAT_FORMATS:
        raise UsageError(
            f"codegemma quantizes to {', '.join(QUANTIZERS)} (and stores F32, F16, BF16); "
            f"{fmt.name} can be read, not written"
        )
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"quantize takes a float tensor [..., K], got {x.dtype} {tuple(x.shape)}")
    row = fmt.row_bytes(x.shape[-1])
    x = x.detach().to("cpu")
    if fmt.name in FLOAT_FORMATS:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt.name]
        return x.to(dtype).contiguous().view(torch.uint8).reshape(*x.shape[:-1], row)
    blocks = x.reshape(-1, fmt.block_size)
    out = torch.empty(blocks.shape[0], fmt.type_size, dtype=torch.uint8)
    encode = _quantize_q8_0 if fmt.name == "Q8_0" else _quantize_q4_0
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start : start + _CHUNK_BLOCKS].float()
        out[start : start + _CHUNK_BLOCKS] = encode(chunk)
    return out.reshape(*x.shape[:-1], row)


def _inverse(d: Tensor) -> Tensor:
    """1 / d, and 0 where d is 0 (ggml's `d ? 1.0f/d : 0.0f`)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)


def _finite(q: Tensor) -> Tensor:
    """Where a block is so small that 1/d overflows, ggml's cast of inf/nan to an integer is
    undefined in C; x86 gives 0 and so does this. The fp16 scale of such a block is 0, so it
    dequantizes to zeros either way."""
    return torch.where(q.isfinite(), q, torch.zeros_like(q))


def _fp16_bytes(d: Tensor) -> Tensor:
    return d.to(torch.float16).view(torch.uint8)  # [n, 1] -> [n, 2], round to nearest even


def _round_away(v: Tensor) -> Tensor:
    """roundf: half away from zero, computed as gguf-py's np_roundf does."""
    a = v.abs()
    floored = a.floor()
    return torch.sign(v) * (floored + (2 * (a - floored)).floor())


def _quantize_q8_0(blocks: Tensor) -> Tensor:
    amax = blocks.abs().amax(dim=1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)
    q = _finite(_round_away(blocks * _inverse(d)))
    return torch.cat((_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)), dim=1)


def _quantize_q4_0(blocks: Tensor) -> Tensor:
    at = blocks.abs().argmax(dim=1, keepdim=True)  # the first of equal magnitudes, as ggml
    d = blocks.gather(1, at) / torch.full_like(at, -8, dtype=torch.float32)
    q = _finite((blocks * _inverse(d) + 8.5).trunc())
    q = q.to(torch.uint8).clamp(0, 15).reshape(-1, 2, 16)
    packed = q[:, 0] | (q[:, 1] << 4)  # element j in the low nibble, j + 16 in the high one
    return torch.cat((_fp16_bytes(d), packed), dim=1)


# -- modules --------------------------------------------------------------------------------------
class QuantizedMatrix(nn.Module):
    """A [rows, cols] weight held as ggml blocks: `weight` is a uint8 buffer [rows, row bytes]."""

    def __init__(
        self,
        rows: int,
        cols: int,
        fmt: str | BlockFormat,
        weight: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.format = block_format(fmt)
        self.rows, self.cols = rows, cols
        shape = (rows, self.format.row_bytes(cols))
        if weight is None:
            weight = torch.zeros(shape, dtype=torch.uint8, device=device)
        if weight.dtype != torch.uint8 or tuple(weight.shape) != shape:
            raise ValueError(
                f"{self.format.name} weight of {rows}x{cols} values must be uint8 {list(shape)}, "
                f"got {weight.dtype} {list(weight.shape)}"
            )
        self.register_buffer("weight", weight)

    @classmethod
    def from_float(cls, weight: Tensor, fmt: str | BlockFormat) -> QuantizedMatrix:
        """Quantize a float matrix [rows, cols]; the blocks go to the weight's device."""
        blocks = quantize(weight, fmt).to(weight.device)
        return cls(weight.shape[0], weight.shape[1], fmt, blocks)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole matrix [rows, cols] as floats of `dtype`."""
        return dequantize(self.weight, self.format).to(dtype)

    def project(self, x: Tensor) -> Tensor:
        """x [..., cols] @ W^T -> [..., rows], in x's dtype: the product with `dequantize`'s
        values (see the module docstring for the CPU kernels' path)."""
        lib = self._kernels(x)
        if lib is None:
            return F.linear(x, self.dequantize(x.dtype))  # the reference path
        x = x.contiguous()
        if x.numel() <= kernels.MAX_ROWS_QUANT * self.cols:
            return kernels._qgemv(lib, x, self.weight, kernels.QUANT_FORMATS[self.format.name])
        return self._tiled(x)

    def _kernels(self, x: Tensor):
        """The kernels' library when they may compute x @ W^T, else None."""
        if x.dtype not in kernels.DTYPE_FORMATS or self.format.name not in kernels.QUANT_FORMATS:
            return None
        if not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            return None
        return kernels.usable(self.weight)

    def _tiled(self, x: Tensor) -> Tensor:
        """x @ W^T for many rows: tiles of W's rows dequantized (into one reused buffer) and
        multiplied by kernels.linear, each into its columns of the output."""
        tile = max(1, min(self.rows, DEQUANT_TILE // self.cols))
        buffer = _tile_buffer(tile * self.cols, x.dtype)
        if tile == self.rows:  # one tile: the GEMM writes the output itself
            w = buffer[: self.rows * self.cols].view(self.rows, self.cols)
            return kernels.linear(x, kernels.dequantize(self.weight, self.format, x.dtype, out=w))
        out = torch.empty(x.shape[:-1] + (self.rows,), dtype=x.dtype)
        for n0 in range(0, self.rows, tile):
            n1 = min(self.rows, n0 + tile)
            w = buffer[: (n1 - n0) * self.cols].view(n1 - n0, self.cols)
            kernels.dequantize(self.weight[n0:n1], self.format, x.dtype, out=w)
            out[..., n0:n1] = kernels.linear(x, w)
        return out

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, format={self.format.name}"


_tiles = threading.local()  # per thread: one dequantization buffer per dtype, reused


def _tile_buffer(numel: int, dtype: torch.dtype) -> Tensor:
    """A flat buffer of at least numel values, kept across calls (fresh memory costs a page fault
    per 4 KB, more than dequantizing into it)."""
    buffers = _tiles.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf


class QuantizedLinear(QuantizedMatrix):
    """nn.Linear without bias, W [out_features, in_features] quantized."""

    @property
    def in_features(self) -> int:
        return self.cols

    @property
    def out_features(self) -> int:
        return self.rows

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x)


class QuantizedEmbedding(QuantizedMatrix):
    """An embedding table [vocab, hidden] quantized; a lookup dequantizes only the rows it reads.
    `project` is the tied output head over the same table."""

    def forward(self, ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """ids [...] -> rows [..., hidden] in `dtype`."""
        return dequantize(self.weight[ids], self.format).to(dtype)


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QuantizedMatrix) for m in module.modules())


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str | BlockFormat) -> nn.Module:
    """Replace every nn.Linear (bias-free) by a QuantizedLinear and every nn.Embedding by a
    QuantizedEmbedding in format `fmt` (Q8_0 or Q4_0), in place; modules already quantized are
    kept as they are. Norms stay float. Returns `model`."""
    fmt = block_format(fmt)
    if fmt.name not in QUANTIZERS:
        raise UsageError(f"quantize to one of {', '.join(q.lower() for q in QUANTIZERS)}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise UsageError(f"cannot quantize {name}: it has a bias")
                setattr(parent, name, QuantizedLinear.from_float(child.weight, fmt))
            elif isinstance(child, nn.Embedding):
                setattr(parent, name, QuantizedEmbedding.from_float(child.weight, fmt))
    return model
