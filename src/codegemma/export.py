"""Write a Hugging Face Gemma checkpoint as a GGUF file that llama.cpp and Ollama run.

    codegemma export gguf ./codegemma-2b --type q8_0 --out codegemma-2b.Q8_0.gguf

The layout is llama.cpp's own for architecture `gemma` (`convert_hf_to_gguf.py`, GemmaModel):
its tensor names (gguf.py's table), RMSNorm weights stored as the scale 1 + w in F32, no
`output.weight` (the head is tied to `token_embd`), `gemma.*` hyperparameters, and a vocabulary
of model "llama" with the FIM ids (`tokenizer.ggml.fim_pre/suf/mid_token_id`), the file
separator as `fim_sep_token_id` (llama.cpp ends generation at it, so `/infill` stops at
`<|file_separator|>`) and `<end_of_turn>` as `eot_token_id`. `--type` sets every matrix's type,
the embedding's included ("pure": no per-tensor mix like llama-quantize's Q4_K_M); a matrix whose
rows do not divide into the type's blocks is written F32. The file is written beside the target
and renamed into place, so an interrupted export leaves no half-written GGUF.

The vocabulary is always written as model "llama" (llama.cpp's SPM tokenizer: repeatedly merge
the adjacent pair whose concatenation is the highest-scored piece; byte fallback), because that is
the tokenizer llama.cpp runs for Gemma and it reproduces ours:
- from a sentencepiece `tokenizer.model`, its pieces, scores and types as they are;
- from a `tokenizer.json` (HF BPE with byte fallback, Gemma's " " -> "▁" normalizer and no
  pre-tokenizer, as `codegemma.train.tokenizer_trainer` writes), each piece scores minus the rank
  of the merge that makes it. SPM's highest score is then BPE's lowest-ranked merge, so both
  apply the same merges in the same order wherever the pair being merged is the piece's own
  merge; they could differ only where a piece is also the concatenation of two other adjacent
  pieces, which BPE training does not produce from its own merges (the tests check that both
  tokenize sample code identically). A "gpt2" BPE vocabulary with merges is not an option:
  llama.cpp's BPE maps bytes to GPT-2's printable alphabet and pre-splits text with regexes, so
  our "▁" pieces and byte tokens would not survive it.
Token types: the ids our Tokenizer never produces from text (its special ids: bos/eos/pad, FIM,
turn and reserved tokens) are CONTROL, so llama.cpp does not match them in typed text either; the
unknown token UNKNOWN, `<0xNN>` BYTE, the rest as the file has them (NORMAL for BPE). A tokenizer
smaller than the embedding is padded with `[PAD{i}]` pieces of type UNUSED, as llama.cpp's
converter pads, because llama.cpp wants one token per embedding row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from codegemma.checkpoint import load_model, resolve_model
from codegemma.config import ModelConfig
from codegemma.errors import CheckpointError, TokenizerError, UsageError
from codegemma.fileio import atomic_path
from codegemma.gguf import ARCH, GLOBAL_TENSORS, LAYER_TENSORS
from codegemma.quant import block_format, quantize
from codegemma.tokenizer import Tokenizer

TYPES = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
FILE_TYPES = {"F32": 0, "BF16": 32, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's llama_ftype
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)  # GGUF token types
PAD_SCORE = -1000.0


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]


# -- vocabulary -----------------------------------------------------------------------------------
def gguf_vocab(tokenizer: Tokenizer, size: int) -> Vocab:
    """The GGUF ("llama" model) vocabulary reproducing `tokenizer`, padded to `size` tokens."""
    data = tokenizer.path.read_bytes()
    if tokenizer.kind == "tokenizer.json":
        tokens, scores, types = _from_bpe_json(tokenizer, data)
    else:
        tokens, scores, types = _from_sentencepiece(data)
    byte_ids = {tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    for i in range(len(tokens)):
        if i == tokenizer.unk_id:
            types[i] = UNKNOWN
        elif i in byte_ids:
            types[i] = BYTE
        elif i in tokenizer.special_ids:
            types[i] = CONTROL
    if len(tokens) > size:
        raise CheckpointError(f"{tokenizer.path}: {len(tokens)} tokens but {size} embedding rows")
    for i in range(1, size - len(tokens) + 1):
        tokens.append(f"[PAD{i}]")
        scores.append(PAD_SCORE)
        types.append(UNUSED)
    return Vocab(tokens, scores, types)


def _from_sentencepiece(data: bytes) -> tuple[list[str], list[float], list[int]]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(data)
    pieces = list(proto.pieces)
    return [p.piece for p in pieces], [p.score for p in pieces], [int(p.type) for p in pieces]


def _from_bpe_json(tokenizer: Tokenizer, data: bytes) -> tuple[list[str], list[float], list[int]]:
    spec = json.loads(data)
    model = spec.get("model") or {}
    where = f"{tokenizer.path}"
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise TokenizerError(f"{where}: GGUF export needs a byte-fallback BPE tokenizer.json")
    if spec.get("pre_tokenizer") is not None or not _is_gemma_normalizer(spec.get("normalizer")):
        raise TokenizerError(
            f"{where}: GGUF export reproduces Gemma's tokenizer.json layout (normalizer "
            f'Replace(" ", "▁"), no pre-tokenizer); this file differs, and llama.cpp would '
            f"split text differently",
            fix="export a model whose tokenizer is a sentencepiece tokenizer.model, or one "
            "trained by `codegemma tokenizer train`",
        )
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    lowest = -float(len(merges) + 1)  # pieces no merge makes never win a merge
    scores = [-float(rank[t]) if t in rank else lowest for t in tokens]
    return tokens, scores, [NORMAL] * len(tokens)


def _is_gemma_normalizer(spec: dict | None) -> bool:
    steps = spec.get("normalizers", []) if spec and spec.get("type") == "Sequence" else [spec]
    return len(steps) == 1 and _is_space_replace(steps[0])


def _is_space_replace(step: dict | None) -> bool:
    return bool(
        step
        and step.get("type") == "Replace"
        and step.get("pattern") == {"String": " "}
        and step.get("content") == "▁"
    )


# -- tensors --------------------------------------------------------------------------------------
def gguf_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (llama.cpp's names)."""
    for theirs, ours in GLOBAL_TENSORS.items():
        if name == ours:
            return theirs
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and name.endswith(".weight"):
        inner = ".".join(parts[3:-1])
        for theirs, ours in LAYER_TENSORS.items():
            if inner == ours:
                return f"blk.{parts[2]}.{theirs}.weight"
    raise CheckpointError(f"tensor {name!r} has no place in a Gemma GGUF")


def tensor_type(weight: Tensor, type_name: str) -> str:
    """The ggml type a tensor is written in: norms F32 (as llama.cpp's converter writes them),
    matrices `type_name`, or F32 when their rows do not divide into its blocks."""
    if weight.dim() == 1:
        return "F32"
    return type_name if weight.shape[-1] % block_format(type_name).block_size == 0 else "F32"


def tensor_bytes(weight: Tensor, type_name: str) -> np.ndarray:
    """The bytes the GGUF stores for one tensor of type `type_name` (from `tensor_type`): uint8
    [rows, row bytes], or [bytes] for a norm, stored as its scale 1 + w."""
    w = weight.detach().to("cpu")
    if w.dim() == 1:  # llama.cpp multiplies by the stored norm weight
        return (w.float() + 1.0).numpy().view(np.uint8)
    return quantize(w, type_name).numpy()


# -- metadata -------------------------------------------------------------------------------------
def _write_metadata(writer, config: ModelConfig, vocab: Vocab, tok: Tokenizer, name: str, t: str):
    import gguf

    K = gguf.Keys
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(FILE_TYPES[t])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    s = tok.special
    writer.add_bos_token_id(s.bos)
    writer.add_eos_token_id(s.eos)
    writer.add_pad_token_id(s.pad)
    if s.unk is not None:
        writer.add_unk_token_id(s.unk)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_uint32(K.Tokenizer.FIM_PRE_ID, s.fim_prefix)
    writer.add_uint32(K.Tokenizer.FIM_SUF_ID, s.fim_suffix)
    writer.add_uint32(K.Tokenizer.FIM_MID_ID, s.fim_middle)
    writer.add_uint32(K.Tokenizer.FIM_SEP_ID, s.file_separator)
    if s.end_of_turn is not None:
        writer.add_eot_token_id(s.end_of_turn)
    template = _chat_template(tok.path.parent)
    if template:
        writer.add_chat_template(template)


def _chat_template(directory: Path) -> str | None:
    cfg = directory / "tokenizer_config.json"
    try:
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


# -- export ---------------------------------------------------------------------------------------
def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    type: str = "bf16",
    name: str | None = None,
) -> Path:
    """Write the checkpoint at `model_dir` (a directory or HF-cache id) as a GGUF file at `out`,
    matrices in `type` (f32, bf16, q8_0, q4_0). Tensors are converted and written one at a time
    (the weights stay memory-mapped), and the file appears only once complete."""
    t = TYPES.get(type.lower())
    if t is None:
        raise UsageError(f"--type {type!r} is not one of {', '.join(TYPES)}")
    path = resolve_model(model_dir)
    tokenizer = Tokenizer.load(path)
    model, config = load_model(path)  # mmap views in the checkpoint's dtype: nothing copied
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not config.tie_word_embeddings:
        raise CheckpointError(f"{path}: llama.cpp's gemma architecture ties the output head")
    out = Path(out).expanduser()
    with atomic_path(out) as tmp:
        _write(tmp, config, vocab, tokenizer, state, name or path.name, t)
    return out


def _write(tmp: Path, config, vocab, tokenizer, state: dict[str, Tensor], name: str, t: str):
    import gguf

    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _write_metadata(writer, config, vocab, tokenizer, name, t)
        kinds = {ours: tensor_type(w, t) for ours, w in state.items()}
        for ours, kind in kinds.items():  # pass 1: names, types and sizes, nothing converted
            w, fmt = state[ours], block_format(kind)
            rows = () if w.dim() == 1 else (w.shape[0],)
            shape = (*rows, fmt.row_bytes(w.shape[-1]))
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor_info(
                gguf_name(ours), shape, np.dtype(np.uint8), math.prod(shape), qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for ours, kind in kinds.items():  # pass 2: one converted tensor in memory at a time
            writer.write_tensor_data(np.ascontiguousarray(tensor_bytes(state[ours], kind)))
    finally:
        writer.close()


# -- command line ---------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `codegemma export gguf DIR --type bf16|q8_0|q4_0|f32 --out FILE`."""
    parser = subparsers.add_parser("export", help="write a checkpoint in another format")
    sub = parser.add_subparsers(dest="export_command", required=True)
    p = sub.add_parser(
        "gguf",
        help="write a GGUF file for llama.cpp / Ollama",
        description="Every matrix (the embedding included) in --type; norms in F32.",
    )
    p.add_argument("model", metavar="DIR", help="model directory or HF-cache id")
    p.add_argument("--type", choices=tuple(TYPES), default="bf16", help="weight type (bf16)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--name", default=None, help="general.name (default: the directory's name)")
    p.set_defaults(func=_cmd_gguf)


def _cmd_gguf(args: argparse.Namespace) -> int:
    out = export_gguf(args.model, args.out, type=args.type, name=args.name)
    print(f"wrote {out} ({out.stat().st_size} bytes, {TYPES[args.type]})")
    return 0
