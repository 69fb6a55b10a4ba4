"""Read GGUF files (llama.cpp, Ollama) as a `GemmaForCausalLM` plus our `Tokenizer`.

The file is memory-mapped copy-on-write and its header parsed by `GGUFFile` (the format of
llama.cpp's docs/gguf.md, with the type tables of PyPI's `gguf`, llama.cpp's gguf-py): quantized
tensors become `QuantizedLinear` / `QuantizedEmbedding` whose uint8 `weight` is a view of the
mapping (never requantized, quant.py); F32/F16/BF16 tensors become ordinary parameters, views too
where their dtype is the compute dtype. gguf-py's own `GGUFReader` reads the same header but
builds two numpy views for every element of every array (each of a 256,000-token vocabulary's
strings, scores and types): 0.65 GiB while the file is open and part of it kept by the heap after,
so a Q8_0 2B took 19% more memory than llama.cpp (docs/benchmarks.md). `GGUFFile` decodes the
strings once and views number arrays whole; a test checks it against `GGUFReader` key by key.

What llama.cpp's converter (`convert_hf_to_gguf.py`, class GemmaModel) does to a Gemma, undone:
- names: `token_embd.weight`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}.weight`, `output_norm.weight`; no `output.weight` (tied head).
  Shapes are ggml's [ne0 = in, ne1 = out], i.e. torch's [out, in] read in reverse.
- RMSNorm weights are stored as (1 + w), the scale llama.cpp multiplies by; we hold w, so 1 is
  subtracted (in float32: for scales in [0.5, 2] exactly, so 1 + w is the stored scale again).
- the config is in `gemma.*` metadata, the tokenizer in `tokenizer.ggml.*`: model "llama"
  (sentencepiece-style) tokens, scores and token types, rebuilt here into a sentencepiece
  ModelProto (BPE, byte fallback, no dummy prefix unless `add_space_prefix`) and loaded by
  tokenizer.py's sentencepiece backend. Sentencepiece's BPE merges by piece score exactly as
  llama.cpp's SPM tokenizer does, so both split text alike.

    model, config, tokenizer = load_gguf("codegemma-2b.Q4_K_M.gguf")
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from torch import Tensor

from codegemma import kernels
from codegemma.config import ConfigError, ModelConfig
from codegemma.errors import CheckpointError, TokenizerError
from codegemma.model import GemmaForCausalLM
from codegemma.quant import (
    FLOAT_FORMATS,
    FORMATS,
    QuantizedEmbedding,
    QuantizedLinear,
    block_format,
    dequantize,
)
from codegemma.tokenizer import SPECIAL_STRINGS, Tokenizer

MAGIC = b"GGUF"
ARCH = "gemma"
EMBED = "token_embd.weight"
OUTPUT = "output.weight"
# llama.cpp's tensor names -> ours (transformers'), per layer under blk.N. / model.layers.N.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {
    EMBED: "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    OUTPUT: "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# tokenizer.ggml.*_token_id keys -> the SpecialTokens names they fix by id
TOKEN_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "fim_prefix": "tokenizer.ggml.fim_pre_token_id",
    "fim_suffix": "tokenizer.ggml.fim_suf_token_id",
    "fim_middle": "tokenizer.ggml.fim_mid_token_id",
    "file_separator": "tokenizer.ggml.fim_sep_token_id",
}
SUPPORTED = ", ".join(FORMATS)


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file starting with the GGUF magic (Ollama's blobs have no suffix)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def our_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if not Gemma's."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.weight"
    return None


# GGUF's metadata value types (gguf.GGUFValueType) as little-endian numpy scalars
_SCALARS = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: ggml's shape (ne0 first, i.e. torch's read in reverse), type,
    and its bytes as a uint8 view of the mapping."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


def _python(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    return [_python(v) for v in value] if isinstance(value, list) else value


class _Cursor:
    """Little-endian reads from the mapping, each checked against its end."""

    def __init__(self, buf: np.ndarray) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"truncated: {n} bytes wanted at offset {self.pos}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        dt = np.dtype(fmt)
        return self.take(dt.itemsize).view(dt)[0].item()

    def string(self) -> str:
        return bytes(self.take(self.scalar("<u8"))).decode("utf-8", errors="replace")

    def value(self, kind: int):
        """A metadata value of GGUF type `kind`: a Python scalar or str, or for an array a list
        of str, a numpy view of numbers, or a list of those (arrays of arrays)."""
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {kind} at offset {self.pos}")
        item, count = self.scalar("<u4"), self.scalar("<u8")
        if item in _SCALARS:
            dt = np.dtype(_SCALARS[item])
            return self.take(count * dt.itemsize).view(dt)
        return [self.value(item) for _ in range(count)]


@dataclass
class GGUFFile:
    """An opened GGUF file: its metadata as Python values and its tensors by llama.cpp name."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @classmethod
    def open(cls, path: str | os.PathLike) -> GGUFFile:
        path = Path(path)
        try:
            # copy-on-write: tensors become writable views (torch wants those), the file untouched
            buf = np.memmap(path, mode="c")
            return cls._parse(path, buf)
        except (ValueError, OSError) as e:
            raise CheckpointError(
                f"{path} cannot be read as GGUF: {e}",
                fix="re-download the file, or convert the model again with llama.cpp",
            ) from e

    @classmethod
    def _parse(cls, path: Path, buf: np.ndarray) -> GGUFFile:
        c = _Cursor(buf)
        if bytes(c.take(4)) != MAGIC:
            raise ValueError("it does not start with the GGUF magic")
        version = c.scalar("<u4")
        if version not in (2, 3):
            raise ValueError(
                f"GGUF version {version} (big-endian files read as a huge number): codegemma "
                f"reads little-endian versions 2 and 3, what llama.cpp writes"
            )
        n_tensors, n_kv = c.scalar("<u8"), c.scalar("<u8")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            if key in metadata:
                raise ValueError(f"metadata key {key!r} appears twice")
            metadata[key] = c.value(c.scalar("<u4"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(int(c.scalar("<u8")) for _ in range(c.scalar("<u4")))
            raw, offset = c.scalar("<u4"), c.scalar("<u8")
            infos.append((name, dims, raw, offset))
        align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-c.pos // align) * align
        tensors = {}
        for name, dims, raw, offset in infos:
            try:
                kind = GGMLQuantizationType(raw)
            except ValueError:
                raise ValueError(
                    f"tensor {name!r} has ggml type {raw}, which the gguf package does not "
                    f"know; supported types: {SUPPORTED}"
                ) from None
            block, size = GGML_QUANT_SIZES[kind]
            count = math.prod(dims)
            if count % block:
                raise ValueError(
                    f"tensor {name!r}: {count} values are not whole {kind.name} blocks"
                )
            at, nbytes = start + offset, count // block * size
            if at + nbytes > len(buf):
                raise ValueError(f"truncated: tensor {name!r} ends past the end of the file")
            tensors[name] = GGUFTensor(name, kind, dims, buf[at : at + nbytes])
        return cls(path, version, metadata, tensors)

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python values (an array as a list, of lists for nested ones)."""
        return _python(self.metadata.get(key, default))

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(
                f"{self.path} lacks the metadata key {key!r} a Gemma GGUF carries",
                fix="convert the model with llama.cpp's convert_hf_to_gguf.py or codegemma export",
            )
        return value

    def strings(self, key: str) -> list[str]:
        """A string array ([] when absent)."""
        value = self.metadata.get(key)
        return [] if value is None else list(value)

    def numbers(self, key: str) -> np.ndarray | None:
        """A number array as a numpy view of the file, or None when absent."""
        value = self.metadata.get(key)
        return None if value is None else np.asarray(value)


# -- config ---------------------------------------------------------------------------------------
def read_config(f: GGUFFile, dtype: torch.dtype | None = None) -> ModelConfig:
    """ModelConfig from `gemma.*` metadata; vocab from token_embd's rows; compute dtype `dtype`,
    else the embedding's float type, else (a quantized embedding) `quantized_compute_dtype()`."""
    arch = f.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(
            f"{f.path} holds a {arch!r} model; codegemma runs Gemma 1 ('gemma': CodeGemma 2B/7B)"
        )
    tensors = f.tensors
    if EMBED not in tensors:
        raise CheckpointError(f"{f.path} lacks {EMBED}; is it a complete Gemma GGUF?")
    embed = tensors[EMBED]
    heads = int(f.require(f"{ARCH}.attention.head_count"))
    hidden = int(f.require(f"{ARCH}.embedding_length"))
    if dtype is None:
        dtype = _float_dtype(embed.tensor_type.name) or quantized_compute_dtype()
    ids = {k: f.get(key) for k, key in TOKEN_ID_KEYS.items() if k in ("bos", "eos", "pad")}
    try:
        return ModelConfig(
            vocab_size=int(embed.shape[1]),
            hidden_size=hidden,
            intermediate_size=int(f.require(f"{ARCH}.feed_forward_length")),
            num_hidden_layers=int(f.require(f"{ARCH}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(f.get(f"{ARCH}.attention.head_count_kv", heads)),
            head_dim=int(f.get(f"{ARCH}.attention.key_length", hidden // heads)),
            max_position_embeddings=int(f.require(f"{ARCH}.context_length")),
            rms_norm_eps=_decimal(f.require(f"{ARCH}.attention.layer_norm_rms_epsilon")),
            rope_theta=_decimal(f.get(f"{ARCH}.rope.freq_base", 10000.0)),
            tie_word_embeddings=OUTPUT not in tensors,
            bos_token_id=int(ids["bos"] if ids["bos"] is not None else 2),
            eos_token_id=int(ids["eos"] if ids["eos"] is not None else 1),
            pad_token_id=int(ids["pad"] if ids["pad"] is not None else 0),
            torch_dtype=str(dtype).removeprefix("torch."),
        )
    except ConfigError as e:
        raise CheckpointError(f"{f.path}: its gemma.* metadata is not a valid config: {e}") from e


def quantized_compute_dtype() -> torch.dtype:
    """What a quantized GGUF computes in unless told: bf16 (Gemma's own dtype) on a CPU that
    multiplies bf16 natively, where prefill's dequantized GEMMs run several times faster than in
    fp32 (decode reads the blocks either way; docs/benchmarks.md, bench_llamacpp.py --dtype);
    fp32 elsewhere, where bf16 GEMMs are slow."""
    return torch.bfloat16 if kernels.native_bf16() else torch.float32


def _decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not
    9.99999997e-07): the value the writer started from, as config.json has it."""
    return float(str(np.float32(value)))


def _float_dtype(ggml_name: str) -> torch.dtype | None:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(ggml_name)


# -- tokenizer ------------------------------------------------------------------------------------
def read_tokenizer(f: GGUFFile) -> Tokenizer:
    """Our Tokenizer from `tokenizer.ggml.*` (model "llama": sentencepiece-style pieces)."""
    model = f.get("tokenizer.ggml.model")
    if model != "llama":
        raise TokenizerError(
            f"{f.path}: tokenizer.ggml.model is {model!r}; codegemma reads Gemma's "
            f"sentencepiece-style vocabulary ('llama')"
        )
    tokens = f.strings("tokenizer.ggml.tokens")
    scores = f.numbers("tokenizer.ggml.scores")
    types = f.numbers("tokenizer.ggml.token_type")
    if not tokens:
        raise TokenizerError(f"{f.path} has no tokenizer.ggml.tokens")
    scores = np.zeros(len(tokens)) if scores is None else scores
    types = np.ones(len(tokens), dtype=np.int32) if types is None else types
    if not len(scores) == len(types) == len(tokens):
        raise TokenizerError(
            f"{f.path}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token "
            f"types; the file is corrupt"
        )
    unk = f.get(TOKEN_ID_KEYS["unk"])
    proto = sentencepiece_proto(
        tokens,
        [float(s) for s in scores],
        [int(t) for t in types],
        unk_id=None if unk is None else int(unk),
        add_space_prefix=bool(f.get("tokenizer.ggml.add_space_prefix", True)),
    )
    names = dict(SPECIAL_STRINGS)
    for key, meta in TOKEN_ID_KEYS.items():
        i = f.get(meta)
        if i is not None and 0 <= int(i) < len(tokens):
            names[key] = tokens[int(i)]
    try:
        return Tokenizer.from_sentencepiece(proto, path=f.path, names=names)
    except TokenizerError as e:
        raise TokenizerError(f"the tokenizer in {f.path} cannot be used: {e}") from e


def sentencepiece_proto(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    *,
    unk_id: int | None,
    add_space_prefix: bool,
) -> bytes:
    """A serialized sentencepiece BPE ModelProto of these pieces. GGUF token types are
    sentencepiece's piece types (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5,
    BYTE 6); sentencepiece wants exactly one UNKNOWN piece, so `unk_id`'s piece is made it."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    unknown = [i for i, t in enumerate(types) if t == 2]
    if unk_id is None:
        unk_id = unknown[0] if unknown else None
    if unk_id is None:
        raise TokenizerError("the vocabulary has no unknown token (type UNKNOWN or unknown id)")
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = 6 in types
    m.trainer_spec.unk_id = unk_id
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = add_space_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind == 2 and i != unk_id:
            kind = 3  # a second "unknown" piece is kept as a control one
        p = m.pieces.add()
        p.piece, p.score = piece, score
        p.type = 2 if i == unk_id else kind if 1 <= kind <= 6 else 1
    return m.SerializeToString()


# -- weights --------------------------------------------------------------------------------------
def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[GemmaForCausalLM, ModelConfig, Tokenizer]:
    """(model in eval mode, config, tokenizer) from a GGUF file. Quantized tensors stay
    quantized; float tensors get the compute dtype (`dtype`, default the embedding's float type,
    `quantized_compute_dtype()` when it is quantized)."""
    device = torch.device("cpu" if device is None else device)
    f = GGUFFile.open(path)
    config = read_config(f, dtype)
    tokenizer = read_tokenizer(f)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{f.path}: {tokenizer.vocab_size} tokens but token_embd has {config.vocab_size} rows"
        )
    model = _build(f, config, device)
    return model.eval(), config, tokenizer


def describe_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """File size, tensor count and the count of each tensor type (as `describe` does for a
    Hugging Face directory); reads the header only."""
    f = GGUFFile.open(path)
    types: dict[str, int] = {}
    for t in f.tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "path": str(f.path),
        "format": "gguf",
        "total_bytes": f.path.stat().st_size,
        "num_tensors": len(f.tensors),
        "num_parameters": sum(t.n_elements for t in f.tensors.values()),
        "tensor_types": types,
    }


def _build(f: GGUFFile, config: ModelConfig, device: torch.device) -> GemmaForCausalLM:
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {}
    for t in f.tensors.values():
        name = our_name(t.name)
        if name is None or name not in expected:
            raise CheckpointError(
                f"{f.path} has tensor {t.name!r}, which a Gemma model does not use; is it a "
                f"Gemma GGUF?"
            )
        found[name] = t
    missing = sorted(expected.keys() - found.keys())
    if missing:
        raise CheckpointError(f"{f.path} lacks {len(missing)} tensor(s): {', '.join(missing[:5])}")
    dtype = getattr(torch, config.torch_dtype)
    state = {}
    for name, t in found.items():
        shape = tuple(reversed(t.shape))
        if shape != expected[name]:
            raise CheckpointError(
                f"{f.path}: tensor {t.name!r} has shape {list(shape)} but its gemma.* metadata "
                f"implies {list(expected[name])}"
            )
        fmt = _format(f, t)
        blocks = _bytes(t)
        if name.endswith("norm.weight"):  # llama.cpp stores the scale 1 + w
            state[name] = (dequantize(blocks, fmt).reshape(shape) - 1.0).to(device, dtype)
        elif fmt.name in FLOAT_FORMATS:
            state[name] = _float_view(blocks, fmt.name, shape).to(device, dtype)
        else:
            _install_quantized(model, name, shape, fmt, blocks.to(device))
    model.load_state_dict(state, strict=False, assign=True)
    model.reset_buffers(device)
    left = [n for n, x in [*model.named_parameters(), *model.named_buffers()] if x.is_meta]
    if left:
        raise CheckpointError(f"internal: tensors left on the meta device after load: {left}")
    return model


def _format(f: GGUFFile, t: Any):
    name = t.tensor_type.name
    if name not in FORMATS:
        raise CheckpointError(
            f"{f.path}: tensor {t.name!r} has type {name}, which codegemma cannot read; "
            f"supported types: {SUPPORTED}",
            fix="use a GGUF of a supported type (Q8_0, Q4_0, Q4_K_M, F16, BF16, F32), or "
            "re-quantize with llama.cpp's llama-quantize",
        )
    return block_format(name)


def _float_view(blocks: Tensor, fmt: str, shape: tuple[int, ...]) -> Tensor:
    """The raw bytes of an F32/F16/BF16 tensor viewed as that dtype (no copy)."""
    return blocks.contiguous().view(_float_dtype(fmt)).reshape(shape)


def _install_quantized(
    model: GemmaForCausalLM, name: str, shape: tuple[int, ...], fmt, blocks: Tensor
) -> None:
    """Replace the module owning `name` by its quantized counterpart holding `blocks`."""
    path = name.removesuffix(".weight")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    cls = QuantizedEmbedding if path == "model.embed_tokens" else QuantizedLinear
    setattr(parent, attr, cls(shape[0], shape[1], fmt, blocks))


def _bytes(t: Any) -> Tensor:
    """A tensor's data as uint8 [rows, row bytes] (one row for a vector), a view of the file."""
    rows = int(t.shape[1]) if len(t.shape) == 2 else 1
    return torch.from_numpy(t.data).reshape(rows, -1)


def tensor_bytes(path: str | os.PathLike) -> dict[str, tuple[str, Tensor]]:
    """Every tensor of a GGUF file by llama.cpp name: (ggml type name, uint8 [rows, row bytes])."""
    return {
        name: (t.tensor_type.name, _bytes(t)) for name, t in GGUFFile.open(path).tensors.items()
    }
