"""The Gemma 1 decoder (CodeGemma 2B / 7B) in one readable file.

Numerics follow transformers' `GemmaForCausalLM` exactly, so logits agree to float tolerance:
RMSNorm computed in fp32 and scaled by (1 + w); MLP down(gelu_tanh(gate(x)) * up(x)); embeddings
multiplied by sqrt(hidden) cast to the weight dtype (bf16 sqrt(3072) = 55.5); rotary embeddings
(half-split) with cos/sin computed in fp32 then cast to the activation dtype; attention scaled by
head_dim^-0.5 with fp32 softmax (inside SDPA); MQA/GQA/MHA by `num_key_value_heads`; tied
input/output embeddings unless the config unties them.

Parameter names are transformers' (`model.layers.N.self_attn.q_proj.weight` ...), so a state dict
moves between the two without renaming (see checkpoint.py).

Incremental decoding uses `KVCache`: a static buffer allocated once, indexed by per-row positions.
Each row of a batch carries its own positions, so prompts of different lengths are right-padded and
decoded side by side, and a server can put unrelated requests in different rows (slots): a query at
position p attends to cache entries 0..p of its own row only, and padding written beyond a row's end
is overwritten before it is ever attended to.

Plain torch, as gpt-fast's model.py: no compiled kernels are called from here (the float matmuls go
through `Linear`, i.e. kernels.linear, which only picks between torch's own GEMMs, MKL's and
oneDNN's, by the CPU: the same product, its sums perhaps in another order). Speed is applied from
outside: the engine (engine/engine.py) runs its decode steps on CPU through kernels.step.DecodeStep,
the whole step in one call with this file's math, built from whatever weights the model holds; a
direct call of this model with a cache always runs the modules.

Quantized weights (quant.py: ggml's Q8_0, Q4_0, Q4_K, Q6_K blocks, e.g. from a GGUF file) replace
the Linear layers and the embedding by `QuantizedLinear` / `QuantizedEmbedding`: the lookup
dequantizes only the rows it reads, the tied output head multiplies by the quantized table, and
the norms stay float in the compute dtype (`compute_dtype`). Those modules compute their matmuls
themselves (quant.py: the dequantize-and-matmul reference, or CPU kernels for the same math).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codegemma import kernels
from codegemma.config import ModelConfig
from codegemma.quant import QuantizedEmbedding, QuantizedMatrix, is_quantized


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored raw; the scale is (1 + weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


class Linear(nn.Linear):
    """nn.Linear without bias, computed by kernels.linear (the faster of torch's GEMMs here)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        if bias:
            raise ValueError("Gemma's linear layers have no bias")
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear(x, self.weight)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        empty = torch.empty(head_dim // 2)  # on the meta device: reset_buffers() fills it later
        # (torch.arange on meta imports torch._dynamo: 1.5 s and 68 MB of a model's load)
        inv_freq = empty if empty.is_meta else self._inv_freq(empty.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device)
        return 1.0 / (self.theta ** (exponents / self.head_dim))

    def reset_buffers(self, device: torch.device) -> None:
        self.inv_freq = self._inv_freq(device)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions [B, T] -> cos, sin [B, 1, T, D], computed in fp32 as transformers does
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


class LayerCache(nn.Module):
    """Keys and values of one layer for `batch_size` rows of up to `max_seq_len` positions."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # [B, Hkv, S, D]
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, at: CacheIndex, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, Hkv, T, D] at (at.rows, at.positions); return the keys/values
        [B, Hkv, at.kv_len, D] those rows attend to."""
        rows, positions, start = at.rows, at.positions, at.start
        if start is not None:
            span = slice(start, start + k.shape[2])
            self.k[rows, :, span] = k
            self.v[rows, :, span] = v
        else:
            if isinstance(rows, slice):
                k_rows, v_rows = self.k[rows], self.v[rows]
                r = torch.arange(k.shape[0], device=k.device)[:, None]
            else:
                k_rows, v_rows, r = self.k, self.v, rows[:, None]
            k_rows[r, :, positions] = k.transpose(1, 2).to(self.k.dtype)
            v_rows[r, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, : at.kv_len], self.v[rows, :, : at.kv_len]


class KVCache(nn.Module):
    """Static KV cache for all layers, allocated once (gpt-fast style)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                f"({config.max_position_embeddings}); shorten the prompt or max_new_tokens"
            )
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.layers = nn.ModuleList(
            LayerCache(
                batch_size, max_seq_len, config.num_key_value_heads, config.head_dim, dtype, device
            )
            for _ in range(config.num_hidden_layers)
        )


@dataclass(frozen=True)
class CacheIndex:
    """Where one forward writes into the KV cache, and what its queries read back.

    rows: cache rows, a slice of contiguous slots (decode: the cache is read as a view) or a [B]
    tensor of row ids (prefill into scattered slots: those rows are gathered); positions [B, T];
    kv_len: keys 0..kv_len-1 are read; start: set when every row writes positions
    start..start+T-1, so the write is a slice copy instead of a scatter."""

    rows: Tensor | slice
    positions: Tensor
    kv_len: int
    start: int | None


def cache_mask(input_pos: Tensor, rows: Tensor | slice) -> tuple[Tensor | None, CacheIndex]:
    """Which cache entries each query sees: keys 0..p of its own row for a query at position p.

    Returns (mask [B, 1, T, kv_len] or None, the CacheIndex). The mask is None when none is
    needed: every row decoding at the same position (all kv_len keys visible), or a prefill from
    position 0 in every row (plain causal attention)."""
    B, T = input_pos.shape
    lo, hi = (int(v) for v in torch.aminmax(input_pos))
    if T == 1 and lo == hi:
        return None, CacheIndex(rows, input_pos, hi + 1, lo)
    if hi == T - 1 and torch.equal(
        input_pos, torch.arange(T, device=input_pos.device).expand(B, T)
    ):
        return None, CacheIndex(rows, input_pos, T, 0)
    keys = torch.arange(hi + 1, device=input_pos.device)
    mask = keys[None, None, None, :] <= input_pos[:, None, :, None]
    return mask, CacheIndex(rows, input_pos, hi + 1, None)


def segment_mask(segment_ids: Tensor) -> Tensor:
    """Attention of packed training rows: query i sees key j iff j <= i and both lie in the same
    segment (one repository sample). segment_ids [B, T] -> bool mask [B, 1, T, T]."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d, q, kv = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = Linear(d, q)
        self.k_proj = Linear(d, kv)
        self.v_proj = Linear(d, kv)
        self.o_proj = Linear(q, d)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: LayerCache | None,
        at: CacheIndex | None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(at, k, v)  # [B, Hkv, kv_len, D]
        y = attend(q, k, v, mask, causal=mask is None and (cache is None or T > 1))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, H, T, D] and k, v [B, Hkv, S, D] -> [B, H, T, D].

    Causal (prefill from position 0, training): SDPA's causal kernel over repeated kv heads.
    Otherwise (decoding, or training on rows of several repositories): the query heads sharing a
    kv head are folded into the query axis, so MQA/GQA attend without copying keys and values
    per head; `mask` [B, 1, T, S] (None = all visible)."""
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    if causal and T > 1:
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5)
    q = q.reshape(B, k.shape[1], n_rep * T, D)  # heads h = j * n_rep + r share kv head j
    if mask is not None:
        mask = mask.repeat(1, 1, n_rep, 1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5)
    return y.view(B, H, T, D)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        at: CacheIndex | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, at)
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        if not self.embed_tokens.weight.is_meta:  # nn.Embedding's own N(0, 1) init; on the meta
            # device there is nothing to draw, and drawing imports torch._dynamo (1.5 s, 68 MB)
            self.embed_tokens.reset_parameters()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@functools.cache
def embedding_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """sqrt(hidden) rounded to the weight dtype first, exactly as transformers does (bf16 sqrt(3072)
    = 55.5); a Python float of that value multiplies the same as the 0-d tensor would."""
    return torch.tensor(hidden_size**0.5, dtype=dtype).item()


class GemmaForCausalLM(nn.Module):
    """Gemma decoder. `model(input_ids)` -> logits [B, T, vocab] in the weights' dtype."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        )
        self.gradient_checkpointing = False

    @property
    def output_embedding(self) -> Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations and the KV cache have: the embedding's, or with a quantized
        embedding (uint8 blocks) that of the final norm, which is never quantized."""
        w = self.model.embed_tokens.weight
        return w.dtype if w.is_floating_point() else self.model.norm.weight.dtype

    @property
    def quantized(self) -> bool:
        """Whether any weight is held in a quantized block format (quant.py)."""
        return is_quantized(self)

    def forward(
        self,
        input_ids: Tensor,
        input_pos: Tensor | None = None,
        cache: KVCache | None = None,
        rows: Tensor | slice | None = None,
        logits_index: Tensor | None = None,
        segment_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab] (see `hidden_states` for the arguments); logits_index [B]
        computes them only at that time step per row -> [B, 1, vocab]."""
        h = self.hidden_states(input_ids, input_pos, cache, rows, segment_ids, attention_mask)
        if logits_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_index][:, None]  # [B, 1, D]
        return self.output_head(h)

    def hidden_states(
        self,
        input_ids: Tensor,
        input_pos: Tensor | None = None,
        cache: KVCache | None = None,
        rows: Tensor | slice | None = None,
        segment_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The final hidden states [B, T, hidden], after the final norm (`output_head` turns any
        of them into logits). input_ids [B, T]; input_pos [B, T] absolute positions (default
        0..T-1); cache: a KVCache, written at (rows, input_pos); rows: cache rows, a [B] tensor of
        row ids or a slice of B contiguous rows (default slice(0, B)).
        Without a cache, attention is causal unless one of these says otherwise:
        segment_ids [B, T] (training on packed rows): a token attends only to the tokens at or
        before it with its segment id (`segment_mask`); give input_pos restarting at each
        segment's start (train/data.py derives both from the row's <bos> tokens);
        attention_mask [B, 1, T, T] bool: query i attends key j where it is True (token trees
        packed into a row, eval/lm_harness.py)."""
        B, T = input_ids.shape
        if cache is not None and (segment_ids is not None or attention_mask is not None):
            raise ValueError("segment_ids and attention_mask are for forwards without a KV cache")
        if segment_ids is not None and attention_mask is not None:
            raise ValueError("give segment_ids or attention_mask, not both")
        if input_pos is None:
            input_pos = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.embed(input_ids)
        cos, sin = self.rotary(input_pos, h.dtype)
        mask, at = attention_mask, None
        if cache is not None:
            mask, at = cache_mask(input_pos, slice(0, B) if rows is None else rows)
        elif segment_ids is not None:
            mask = segment_mask(segment_ids)
        for i, layer in enumerate(self.model.layers):
            args = (cos, sin, mask, None if cache is None else cache.layers[i], at)
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, *args, use_reentrant=False)
            else:
                h = layer(h, *args)
        return self.model.norm(h)

    def output_head(self, h: Tensor) -> Tensor:
        """Logits [..., vocab] of final hidden states h [..., hidden]: the tied embedding table
        (or lm_head), quantized or not."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(head, QuantizedMatrix):
            return head.project(h)
        return kernels.linear(h, self.output_embedding)

    def embed(self, input_ids: Tensor) -> Tensor:
        table = self.model.embed_tokens
        if isinstance(table, QuantizedEmbedding):  # dequantizes the looked-up rows only
            h = table(input_ids, self.compute_dtype)
        else:
            h = F.embedding(input_ids, table.weight)
        return h * embedding_scale(self.config.hidden_size, h.dtype)

    # -- construction helpers (used by checkpoint.py and train/) ---------------------------
    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers, e.g. after building on the meta device."""
        device = device or self.model.embed_tokens.weight.device
        if torch.device(device).type == "meta":
            raise ValueError("materialise the weights before reset_buffers()")
        self.rotary.reset_buffers(torch.device(device))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> GemmaForCausalLM:
        """Normal(0, std) for matrices, scaled down for residual outputs; zero norms (scale 1)."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)
        return self

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        device = self.model.embed_tokens.weight.device
        return KVCache(self.config, batch_size, max_seq_len, self.compute_dtype, device)
