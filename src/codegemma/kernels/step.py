"""The whole decode step of a Gemma model in one kernel call, for one (model, KV cache) pair.

`DecodeStep.build(model, cache)` reads the tensors the step needs from the model as it is (every
layer's norms and matrices, fp32/bf16 or in a block format of quant.py, the embedding, the final
norm, the output head, and the cache's buffers) and returns a step, or None where cpu.c cannot
run this model (no kernels here, a layer with a bias, mixed dtypes, tensors off the CPU). The
engine builds one when it allocates its cache and checks `current(model, cache)` when new
requests enter (the tensors it holds are still the model's: not replaced, converted or moved);
nothing watches the model otherwise, so a model changed in place is read as it is at each call,
and one whose tensors were replaced is seen at the next check.

A call takes N rows, each a (token, position, cache row): one new token per sequence, or several
per sequence (a speculative draft being verified), since every row's keys and values are written
before any row attends, and a row attends to positions 0..its own of its cache row, as
model.cache_mask lets the module path do.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from codegemma import kernels
from codegemma.model import GemmaForCausalLM, KVCache, embedding_scale
from codegemma.quant import QuantizedMatrix

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


def _tensor(module: nn.Module, dtype: torch.dtype) -> tuple[Tensor, int] | None:
    """A norm's or a matrix's weight and its format id for cpu.c, or None where the step cannot
    read it: anything but a bias-free weight of the cache's dtype or in a block format it knows."""
    held = module._parameters if not isinstance(module, QuantizedMatrix) else module._buffers
    tensors = [*module._parameters.values(), *module._buffers.values()]
    if module._modules or sum(t is not None for t in tensors) != 1:
        return None  # e.g. a bias, an adapter: not Gemma's layer
    t = held.get("weight")
    if t is None:
        return None
    if isinstance(module, QuantizedMatrix):
        code = kernels.QUANT_FORMATS.get(module.format.name)
    else:
        code = kernels.DTYPE_FORMATS[dtype] if t.dtype == dtype else None
    return None if code is None else (t, code)


def _layer_modules(layer: nn.Module) -> list[nn.Module] | None:
    """A decoder layer's norms and matrices in LAYER_PARTS' order (None: other children)."""
    m = layer._modules
    attn, mlp = m.get("self_attn"), m.get("mlp")
    if len(m) != 4 or attn is None or mlp is None or layer._parameters or layer._buffers:
        return None
    a, f = attn._modules, mlp._modules
    if len(a) != 4 or len(f) != 3 or attn._parameters or mlp._parameters:
        return None
    parts = [m.get("input_layernorm"), a.get("q_proj"), a.get("k_proj"), a.get("v_proj")]
    parts += [a.get("o_proj"), m.get("post_attention_layernorm")]
    parts += [f.get("gate_proj"), f.get("up_proj"), f.get("down_proj")]
    return None if None in parts else parts


def _gather(model: nn.Module, cache: nn.Module) -> tuple[list[Tensor], list[int]] | None:
    """Every tensor the step reads, in its order (per layer LAYER_PARTS, then embedding, final
    norm, output head) with their formats; None where the step cannot run this model. Plain
    attribute walks, so that the engine's check at each prefill costs little."""
    if not isinstance(model, GemmaForCausalLM) or not isinstance(cache, KVCache):
        return None
    dtype = cache.layers[0].k.dtype
    if dtype not in kernels.DTYPE_FORMATS:
        return None
    tensors, codes = [], []
    float_code = kernels.DTYPE_FORMATS[dtype]
    for layer, layer_cache in zip(model.model.layers, cache.layers, strict=True):
        modules = _layer_modules(layer)
        if modules is None:
            return None
        for module in modules:
            found = _tensor(module, dtype)
            if found is None:
                return None
            tensors.append(found[0])
            codes.append(found[1])
        for t in (layer_cache.k, layer_cache.v):
            if t.dtype != dtype:
                return None
            tensors.append(t)
            codes.append(float_code)
    head = model.model.embed_tokens if model.lm_head is None else model.lm_head
    for module in (model.model.embed_tokens, model.model.norm, head):
        found = _tensor(module, dtype)
        if found is None:
            return None
        tensors.append(found[0])
        codes.append(found[1])
    with torch.no_grad():  # gradients never flow through the step: the engine runs it inference
        if kernels.usable(*tensors) is None:
            return None
    return tensors, codes


class DecodeStep:
    """cpu.c's codegemma_decode for one model and cache: for N <= `max_rows` rows, the embedding,
    every layer (norms, q/k/v, rotary, cache write, attention over each row's cached positions,
    o, MLP, residuals), the final norm and the output head, in one OpenMP team, with the
    roundings of the torch modules (the matmuls' and the softmax's sums in another order;
    quantized matrices as their dequantized float32 values, see cpu_quant.h)."""

    def __init__(
        self,
        model: GemmaForCausalLM,
        cache: KVCache,
        tensors: list[Tensor],
        codes: list[int],
        lib: kernels._Library,
    ) -> None:
        c = model.config
        self.dtype = cache.layers[0].k.dtype
        self.dims = kernels.ModelDims(
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            cache_rows=cache.batch_size,
            cache_len=cache.max_seq_len,
            eps=c.rms_norm_eps,
            embed_scale=embedding_scale(c.hidden_size, self.dtype),
        )
        self.tensors, self.codes = tensors, codes
        self._ptrs = [t.data_ptr() for t in tensors]
        n = len(LAYER_PARTS) * c.num_hidden_layers
        self._table = (ctypes.c_void_p * n)(*self._ptrs[:n])
        self._formats = (ctypes.c_int * n)(*codes[:n])
        self._fn = lib.fns["decode"][self.dtype]
        self._lib, self._rotary = lib, model.rotary
        self._scratch: dict[int, Tensor] = {}
        self.max_rows = self._max_rows(c, codes)

    @classmethod
    def build(cls, model: nn.Module, cache: nn.Module) -> DecodeStep | None:
        """The step for this model and cache as they are now, or None where it cannot run."""
        lib = kernels.library()
        gathered = _gather(model, cache) if lib is not None else None
        return None if gathered is None else cls(model, cache, *gathered, lib)

    def current(self, model: nn.Module, cache: nn.Module) -> bool:
        """Whether the model and cache still hold the very tensors (same memory, same formats)
        this step reads."""
        gathered = _gather(model, cache)
        return (
            gathered is not None
            and gathered[1] == self.codes
            and [t.data_ptr() for t in gathered[0]] == self._ptrs
        )

    def _max_rows(self, config, codes: list[int]) -> int:
        """Rows a call takes: where the float matrices' kernel stops beating torch's GEMM, by the
        shortest of their rows (kernels.max_rows); MAX_ROWS_QUANT when all are quantized."""
        c, float_code = config, kernels.DTYPE_FORMATS[self.dtype]
        k = {
            0: c.hidden_size,  # q, k, v, gate, up
            1: c.num_attention_heads * c.head_dim,  # o
            2: c.intermediate_size,  # down
        }
        of_part = {1: 0, 2: 0, 3: 0, 4: 1, 6: 0, 7: 0, 8: 2}
        rows = kernels.MAX_ROWS_QUANT
        for i, code in enumerate(codes[: len(LAYER_PARTS) * c.num_hidden_layers]):
            part = i % len(LAYER_PARTS)
            if part in of_part and code == float_code:
                rows = min(rows, kernels.max_rows(self.dtype, k[of_part[part]]))
        if codes[-1] == float_code:  # the output head
            rows = min(rows, kernels.max_rows(self.dtype, c.hidden_size))
        return rows

    def __reduce__(self):  # ctypes pointers cannot be copied or pickled: a copy builds its own
        return type(None), ()

    def __call__(self, ids: Tensor, positions: Tensor, rows: Tensor | slice | None) -> Tensor:
        """Logits [B, T, vocab] of ids [B, T] at positions [B, T] in cache rows `rows` (a [B]
        tensor, a slice of B contiguous rows, None: 0..B-1), as model(ids, positions, cache,
        rows=rows) gives them. IndexError when a token, position or row is out of range (nothing
        is written then); ValueError for more than max_rows tokens."""
        B, T = ids.shape
        if self.max_rows < B * T:
            raise ValueError(f"this decode step takes at most {self.max_rows} rows, got {B * T}")
        if rows is None or isinstance(rows, slice):
            start = 0 if rows is None else rows.start or 0
            rows = torch.arange(start, start + B)
        cos, sin = self._rotary(positions, self.dtype)  # [B, 1, T, D]
        flat = torch.int64
        logits = self.run(
            ids.reshape(-1).to(flat).contiguous(),
            positions.reshape(-1).to(flat).contiguous(),
            rows.to(flat).repeat_interleave(T) if T > 1 else rows.to(flat).contiguous(),
            cos.reshape(B * T, -1).contiguous(),
            sin.reshape(B * T, -1).contiguous(),
        )
        return logits.view(B, T, -1)

    def run(self, tokens: Tensor, positions: Tensor, rows: Tensor, cos: Tensor, sin: Tensor):
        """The kernel call: tokens, positions, rows [N] int64; cos, sin [N, head_dim] in the
        dtype. Returns logits [N, vocab]."""
        N = tokens.shape[0]
        scratch = self._scratch.get(N)
        if scratch is None:
            size = self._lib.scratch_bytes(ctypes.byref(self.dims), N)
            scratch = self._scratch[N] = torch.empty(size, dtype=torch.uint8)
        logits = torch.empty(N, self.dims.vocab, dtype=self.dtype)
        embed, final_norm, head = self.tensors[-3:]
        embed_code, head_code = self.codes[-3], self.codes[-1]
        failed = self._fn(
            ctypes.byref(self.dims),
            self._table,
            self._formats,
            embed.data_ptr(),
            embed_code,
            final_norm.data_ptr(),
            head.data_ptr(),
            head_code,
            tokens.data_ptr(),
            positions.data_ptr(),
            rows.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            N,
            logits.data_ptr(),
            scratch.data_ptr(),
            kernels._threads(),
        )
        if failed:
            d = self.dims
            raise IndexError(
                f"decode step out of range: token ids must be < {d.vocab}, positions < the "
                f"cache's max_seq_len {d.cache_len}, cache rows < its batch size {d.cache_rows}; "
                f"got tokens {tokens.tolist()}, positions {positions.tolist()}, rows "
                f"{rows.tolist()}"
            )
        return logits
