"""Load and save Hugging Face-format Gemma checkpoints (safetensors, one file or shards + index).

Key choice: loading copies no weight it does not have to. We parse the safetensors header ourselves
(8-byte little-endian length, JSON header of dtype/shape/data_offsets), make every tensor a
zero-copy view (`torch.frombuffer`) of a private copy-on-write `mmap` of its file, build the model
on the meta device and assign the views into it (`load_state_dict(assign=True)`). Only a dtype
conversion copies, one tensor at a time. The views hold the mmaps alive; in-place writes (training)
go to private pages and never reach the file, and loading adds almost nothing to the process's
memory beyond the page cache (peak RSS in docs/benchmarks.md). safetensors' own `safe_open` is
zero-copy too; we keep our own reader for its precise errors on truncated or corrupt files.

Saving writes with `safetensors.torch.save_file`, names files exactly as transformers does, and
commits atomically: a new directory is written beside the target and renamed into place; an
existing one is updated file by file with the old commit point (index or model.safetensors)
removed first and the new one written last, so a crash never leaves a directory that loads wrong.

`resolve_model` finds a model id such as `google/codegemma-2b` in the local Hugging Face cache,
offline; it also takes a GGUF file (`m.gguf`) or an Ollama model (`ollama:codegemma:2b`, resolved
through Ollama's local manifests to its GGUF blob), which gguf.py loads (`load_checkpoint`).

    model, config = load_model(resolve_model("google/codegemma-2b"), dtype="float32")
    save_model(model, config, "out/model", max_shard_bytes=2 * 2**30)
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codegemma.config import DTYPES as MODEL_DTYPES
from codegemma.config import ConfigError, ModelConfig
from codegemma.errors import CheckpointError
from codegemma.fileio import file_mode, write_text_atomic
from codegemma.gguf import GGUFFile, is_gguf, load_gguf
from codegemma.model import GemmaForCausalLM
from codegemma.tokenizer import Tokenizer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a larger length means a corrupt file

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "half": "float16",
    "float": "float32",
}


# -- safetensors reading --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """One tensor of a safetensors file: `begin`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= min(size - 8, MAX_HEADER_BYTES) else b""
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if n < 0:
        raise CheckpointError(
            f"{path} is {size} bytes, too small to be safetensors (it starts with an 8-byte "
            f"header length): the file is truncated; re-download or re-save it"
        )
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{path}: header length {n} exceeds the file size {size}: the file is truncated "
            f"or not safetensors; re-download or re-save it"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({e}); "
            f"the file is corrupt, re-download or re-save it"
        ) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; file corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ in the header must be an object of strings")
    entries = {name: _parse_entry(path, name, info, 8 + n, size) for name, info in header.items()}
    return SafetensorsHeader(path=path, tensors=entries, metadata=metadata, file_size=size)


def _parse_entry(path: Path, name: str, info: Any, data_start: int, size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{where}: header entry must have dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(
            f"{where} has unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)} "
            f"(quantized formats such as GGUF need converting to safetensors first)"
        )
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(map(_is_uint, offsets))
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} must be [begin, end], begin<=end")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    entry = TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)
    need = entry.numel * entry.torch_dtype.itemsize
    if end - begin != need:
        raise CheckpointError(
            f"{where}: data_offsets span {end - begin} bytes but shape {list(shape)} of {dtype} "
            f"needs {need}: the file is corrupt"
        )
    if end > size:
        raise CheckpointError(
            f"{where}: data_offsets end at byte {end}, beyond the file end ({size} bytes): the "
            f"file is truncated; re-download or re-save it"
        )
    return entry


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def mmap_tensors(
    path: str | os.PathLike,
    header: SafetensorsHeader | None = None,
) -> dict[str, Tensor]:
    """All tensors of a safetensors file as zero-copy CPU views of a private mmap of it."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors data is little-endian; this machine is big-endian")
    header = header or read_header(path)
    if not header.tensors:
        return {}
    with open(header.path, "rb") as f:
        # ACCESS_COPY: a writable private mapping (frombuffer needs writable memory); pages are
        # shared with the page cache until written, and writes never reach the file.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, e in header.tensors.items():
        itemsize = e.torch_dtype.itemsize
        if e.numel == 0:
            t = torch.empty(e.shape, dtype=e.torch_dtype)
        elif e.begin % itemsize:  # unaligned data cannot be viewed safely: copy this one
            t = torch.frombuffer(bytearray(mm[e.begin : e.end]), dtype=e.torch_dtype)
        else:  # the tensor keeps a reference to `mm`, so the mapping lives as long as it does
            t = torch.frombuffer(mm, dtype=e.torch_dtype, count=e.numel, offset=e.begin)
        out[name] = t.view(e.shape)
    return out


# -- model directories ----------------------------------------------------------------------------
def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        if is_gguf(path):
            what = "is a GGUF file, not a Hugging Face directory (codegemma.load reads it)"
        raise CheckpointError(
            f"model directory {path} {what}: pass a directory with config.json and "
            f"model.safetensors (or resolve a model id with resolve_model)"
        )
    return path


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index} is not a readable JSON index: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()
    ):
        raise CheckpointError(
            f"{index} must hold {{'weight_map': {{tensor name: shard file name}}}} with plain file "
            f"names in the same directory"
        )
    return weight_map


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, or model.safetensors."""
    path = _model_dir(model_dir)
    index = path / INDEX_NAME
    if index.is_file():
        shards = sorted(set(_read_index(index).values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise CheckpointError(
                    f"{index} names shard {shard!r}, which is missing from {path}: the download or "
                    f"save is incomplete; re-download the model or re-save it"
                )
        if not shards:
            raise CheckpointError(f"{index} lists no tensors; re-save the model")
        return [path / s for s in shards]
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    bins = sorted(p.name for p in path.glob("*.bin"))
    hint = (
        f"; found PyTorch pickles ({', '.join(bins[:3])}): convert them to safetensors, e.g. "
        f"transformers' save_pretrained"
        if bins
        else ""
    )
    raise CheckpointError(f"no weights in {path}: expected {WEIGHTS_NAME} or {INDEX_NAME}{hint}")


def _weight_entries(model_dir: Path) -> dict[str, tuple[SafetensorsHeader, TensorEntry]]:
    """Every tensor of the checkpoint with the header of its file; checks the index agrees."""
    found: dict[str, tuple[SafetensorsHeader, TensorEntry]] = {}
    for file in checkpoint_files(model_dir):
        header = read_header(file)
        for name, entry in header.tensors.items():
            if name in found:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice, in {found[name][0].path.name} and "
                    f"{file.name}: the checkpoint is inconsistent; re-save it"
                )
            found[name] = (header, entry)
    index = model_dir / INDEX_NAME
    if index.is_file():
        for name, shard in _read_index(index).items():
            if name not in found or found[name][0].path.name != shard:
                raise CheckpointError(
                    f"{index} places tensor {name!r} in {shard}, which does not hold it: the index "
                    f"and shards are from different saves; re-download or re-save the model"
                )
    return found


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """ModelConfig of a model directory, with errors naming the directory."""
    path = _model_dir(model_dir)
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{path} has no {CONFIG_NAME}: a model directory needs the Hugging Face config next to "
            f"its weights (download the whole model repo, or save with save_model)"
        )
    try:
        return ModelConfig.load(path)
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from e


def describe(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Files with sizes, dtype(s), tensor and parameter counts; reads headers only."""
    path = _model_dir(model_dir)
    entries = _weight_entries(path)
    files = checkpoint_files(path)
    dtypes: dict[str, int] = {}
    for _, e in entries.values():
        key = str(e.torch_dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + 1
    return {
        "path": str(path),
        "sharded": (path / INDEX_NAME).is_file(),
        "files": [{"name": f.name, "bytes": f.stat().st_size} for f in files],
        "total_bytes": sum(f.stat().st_size for f in files),
        "num_tensors": len(entries),
        "num_parameters": sum(e.numel for _, e in entries.values()),
        "dtype": next(iter(dtypes)) if len(dtypes) == 1 else "mixed",
        "dtypes": dtypes,
        "has_lm_head": LM_HEAD in entries,
    }


# -- loading --------------------------------------------------------------------------------------
def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch.float32, "float32", "fp32", "bf16" ... -> torch dtype; None or "auto" -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower().removeprefix("torch."))
    if name == "auto":
        return None
    if name not in MODEL_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {MODEL_DTYPES}")
    return getattr(torch, name)


def _first(names: Iterable[str], k: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def _check_names(
    what: str, expected: Mapping[str, torch.Size], found: Mapping[str, Any], config: ModelConfig
) -> None:
    missing = expected.keys() - found.keys()
    if missing:
        hint = (
            f"; the config has tie_word_embeddings=false, so {LM_HEAD} is required"
            if LM_HEAD in missing
            else ""
        )
        raise CheckpointError(
            f"{what} lacks {len(missing)} tensor(s) the model needs: {_first(missing)}{hint}"
        )
    unexpected = (
        found.keys() - expected.keys() - ({LM_HEAD} if config.tie_word_embeddings else set())
    )
    if unexpected:
        raise CheckpointError(
            f"{what} has {len(unexpected)} tensor(s) a Gemma model does not use: "
            f"{_first(unexpected)}; is it a Gemma checkpoint with transformers' parameter names?"
        )


def _check_state(
    path: Path,
    expected: Mapping[str, torch.Size],
    entries: Mapping[str, tuple[SafetensorsHeader, TensorEntry]],
    config: ModelConfig,
) -> None:
    _check_names(f"checkpoint {path}", expected, entries, config)
    if LM_HEAD in entries and LM_HEAD not in expected:  # tied: a redundant copy of the embedding
        expected = {**expected, LM_HEAD: expected[EMBED]}
    for name, shape in expected.items():
        header, e = entries[name]
        if e.shape != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {header.path.name} has shape {list(e.shape)} but "
                f"{path / CONFIG_NAME} implies {list(shape)}: config and weights disagree"
            )
        if not e.torch_dtype.is_floating_point:
            raise CheckpointError(
                f"tensor {name!r} in {header.path.name} has dtype {e.dtype}; Gemma weights are "
                f"floating point (quantized checkpoints are not supported)"
            )


def _checked(
    path: Path, dtype: torch.dtype | None
) -> tuple[ModelConfig, dict[str, tuple[SafetensorsHeader, TensorEntry]], GemmaForCausalLM]:
    """Config, weight headers and a meta-device model of `path`, checked against each other
    (names, shapes, dtypes) without reading a weight."""
    config = load_config(path)
    entries = _weight_entries(path)
    if EMBED not in entries:
        raise CheckpointError(f"checkpoint {path} lacks {EMBED}; is it a Gemma checkpoint?")
    config = _with_dtype(config, dtype or entries[EMBED][1].torch_dtype)
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    _check_state(path, {k: v.shape for k, v in model.state_dict().items()}, entries, config)
    return config, entries, model


def validate_model_dir(model_dir: str | os.PathLike) -> ModelConfig:
    """The checks `load_model` makes, from the headers alone: config.json parses and describes a
    Gemma model, and every weight it implies is present with the right shape and a float dtype.
    Raises CheckpointError naming the file and the fix."""
    return _checked(_model_dir(model_dir), None)[0]


def check_tokenizer_fits(tokenizer: Tokenizer, config: ModelConfig, path: Path) -> None:
    """A tokenizer may have fewer tokens than the embedding has rows (padded vocabularies), never
    more: ids past the table would fail at the first lookup."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path} has {tokenizer.vocab_size} tokens but {path / CONFIG_NAME} gives "
            f"the model vocab_size {config.vocab_size}: tokenizer and weights are from different "
            "models; put the model's own tokenizer files next to its weights"
        )


def load_model(
    model_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[GemmaForCausalLM, ModelConfig]:
    """Load (GemmaForCausalLM, ModelConfig) from a Hugging Face model directory, in eval mode.

    dtype=None keeps the checkpoint's dtype (that of the embedding; other float tensors are
    converted to it). On CPU in that dtype the weights stay views of the mmapped files: no copy.
    Otherwise each tensor is converted/moved on its own, so host memory never holds a second
    copy of the model. The returned config's torch_dtype is the dtype the model holds.
    """
    device = torch.device("cpu" if device is None else device)
    path = _model_dir(model_dir)
    config, entries, model = _checked(path, parse_dtype(dtype))
    target = getattr(torch, config.torch_dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    views: dict[Path, dict[str, Tensor]] = {}
    state = {}
    for name in expected:  # a tied checkpoint's lm_head copy was checked above, not loaded
        header = entries[name][0]
        if header.path not in views:
            views[header.path] = mmap_tensors(header.path, header)
        state[name] = views[header.path][name].to(device, target)  # no-op on CPU, same dtype
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers(device)  # non-persistent buffers (rotary inv_freq) are still on meta
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"internal: tensors left on the meta device after load: {left}")
    return model.eval(), config


def _with_dtype(config: ModelConfig, dtype: torch.dtype) -> ModelConfig:
    name = str(dtype).removeprefix("torch.")
    if name not in MODEL_DTYPES:
        raise CheckpointError(
            f"weights in {name} cannot be used; load with dtype in {MODEL_DTYPES}"
        )
    return config.replace(torch_dtype=name)


# -- saving ---------------------------------------------------------------------------------------
def save_model(
    model: torch.nn.Module,
    config: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write config.json, generation_config.json and safetensors weights, atomically.

    One model.safetensors, or shards model-0000i-of-0000N.safetensors + index when the weights
    exceed `max_shard_bytes` (a tensor larger than that gets a shard of its own). dtype=None keeps
    the model's dtype. Tied embeddings are written once, as transformers does.
    """
    state = _state_to_save(model, config, parse_dtype(dtype))
    config = _with_dtype(config, state[EMBED].dtype)
    shards = _plan_shards(state, max_shard_bytes)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save into {out}: it is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        _write_checkpoint(out, config, state, shards)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would outlive the rename; this honours the umask
    try:
        _write_checkpoint(tmp, config, state, shards)
        os.replace(tmp, out)  # an empty target directory is replaced atomically too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def _state_to_save(
    model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop(LM_HEAD, None)  # transformers writes tied weights once
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GemmaForCausalLM(config).state_dict().items()}
    _check_names("the model to save", expected, state, config)
    for name, shape in expected.items():
        if state[name].shape != shape:
            found = list(state[name].shape)
            raise CheckpointError(
                f"cannot save: tensor {name!r} has shape {found} but the config implies "
                f"{list(shape)}; pass the config the model was built with"
            )
    dtype = dtype or state[EMBED].dtype
    out = {}
    for name in expected:
        t = state[name].detach().to("cpu", dtype if state[name].is_floating_point() else None)
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()  # save_file rejects views into shared storage
        out[name] = t
    return out


def _plan_shards(state: Mapping[str, Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """transformers' greedy split: in order, start a new shard when the next tensor overflows."""
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    limit = max_shard_bytes or math.inf
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in state.items():
        if t.nbytes > limit:
            shards.append([name])
            continue
        if current and size + t.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += t.nbytes
    if current:
        shards.append(current)
    return shards


def _write_checkpoint(
    out: Path, config: ModelConfig, state: Mapping[str, Tensor], shards: list[list[str]]
) -> None:
    """Write into `out` so that a crash at any point leaves either the old checkpoint, one that
    fails to load with a clear error (no weights), or the new one; never a mix."""
    from safetensors.torch import save_file

    n = len(shards)
    names = (
        [WEIGHTS_NAME]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    temps = []
    try:
        for name, shard in zip(names, shards, strict=True):
            tmp = out / f".{name}.{uuid.uuid4().hex}.tmp"
            temps.append(tmp)
            save_file({k: state[k] for k in shard}, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, file_mode())  # safetensors creates its files 0600
            _fsync_file(tmp)
        # Remove the old commit points first: from here until the new one exists, the
        # directory has no weights and refuses to load rather than mixing old and new files.
        for old in (INDEX_NAME, WEIGHTS_NAME):
            (out / old).unlink(missing_ok=True)
        for old in out.iterdir():
            if SHARD_RE.fullmatch(old.name) and old.name not in names:
                old.unlink()
        fsync_dir(out)
        config.save(out)
        generation = {
            k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        }
        write_text_atomic(out / GENERATION_CONFIG_NAME, json.dumps(generation, indent=2) + "\n")
        for tmp, name in zip(temps, names, strict=True):
            os.replace(tmp, out / name)  # for one file this is the commit
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    if n > 1:
        weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
        index = {
            "metadata": {
                "total_parameters": sum(t.numel() for t in state.values()),
                "total_size": sum(t.nbytes for t in state.values()),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_text_atomic(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    fsync_dir(out)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside `path` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- the local Hugging Face cache -----------------------------------------------------------------
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hf_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_model(path_or_id: str | os.PathLike) -> Path:
    """An existing directory or GGUF file as is; `ollama:NAME[:TAG]` as the GGUF blob of that
    Ollama model; else a model id from the local Hugging Face cache. Offline."""
    text = str(path_or_id)
    if text.startswith(OLLAMA_PREFIX):
        return resolve_ollama(text.removeprefix(OLLAMA_PREFIX))
    path = Path(path_or_id).expanduser()
    if path.is_dir() or is_gguf(path):
        return path
    if path.suffix == ".gguf":
        what = "lacks the GGUF magic" if path.exists() else "does not exist"
        raise CheckpointError(f"GGUF file {path.absolute()} {what}")
    if path.exists() or not _REPO_ID.fullmatch(text) or ".." in text:
        return _model_dir(path)  # raises the missing-directory error
    repo = hf_cache_dir() / ("models--" + text.replace("/", "--"))
    snapshot = _pick_snapshot(repo)
    if snapshot is not None:
        return snapshot
    raise CheckpointError(
        f"model {text!r} is neither a directory nor in the local Hugging Face cache.\n"
        f"  looked for the directory {path.absolute()}\n"
        f"  looked in the cache      {repo / 'snapshots'}\n"
        f"  (cache root from $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)\n"
        f"fix: on a machine with network run `huggingface-cli download {text}` (or `hf download "
        f"{text}`) with the same cache, or pass the model's directory"
    )


def _pick_snapshot(repo: Path) -> Path | None:
    """The snapshot named by refs/main if present, else the most recently written one."""
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        named = snapshots / ref.read_text(encoding="utf-8").strip()
        if named.is_dir():
            return named
    candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.name)) if candidates else None


# -- GGUF files and Ollama's model store -----------------------------------------------------------
OLLAMA_PREFIX = "ollama:"
OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


def ollama_models_dir() -> Path:
    """$OLLAMA_MODELS, else ~/.ollama/models (Ollama's own order)."""
    if os.environ.get("OLLAMA_MODELS"):
        return Path(os.environ["OLLAMA_MODELS"]).expanduser()
    return Path.home() / ".ollama" / "models"


def _ollama_manifest(spec: str) -> tuple[str, str, Path]:
    """(name, tag, manifest path) of Ollama model NAME[:TAG]."""
    name, _, tag = spec.partition(":")
    if not name or "/" in tag or ".." in name.split("/"):
        raise CheckpointError(f"ollama model {spec!r} is not NAME[:TAG], e.g. ollama:codegemma:2b")
    tag = tag or "latest"
    namespace = name if "/" in name else f"library/{name}"
    return name, tag, ollama_models_dir() / "manifests" / OLLAMA_REGISTRY / namespace / tag


def resolve_ollama(spec: str) -> Path:
    """The GGUF blob of Ollama model NAME[:TAG] (tag default "latest"; NAME may be NS/NAME, default
    namespace "library"): manifests/registry.ollama.ai/NS/NAME/TAG is JSON whose layer of media
    type application/vnd.ollama.image.model names the digest sha256:HEX, stored at
    blobs/sha256-HEX. Offline; errors name what is missing and where it looked."""
    name, tag, manifest = _ollama_manifest(spec)
    root = ollama_models_dir()
    where = "(models directory from $OLLAMA_MODELS, else ~/.ollama/models)"
    if not manifest.is_file():
        raise CheckpointError(
            f"ollama model {name}:{tag} is not in the local Ollama store: looked for the "
            f"manifest {manifest} {where}",
            fix=f"run `ollama pull {name}:{tag}` with the same models directory, or pass the "
            "GGUF file itself",
        )
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
        digest = next(x["digest"] for x in layers if x.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (OSError, ValueError, AttributeError, KeyError, TypeError, StopIteration) as e:
        raise CheckpointError(
            f"ollama manifest {manifest} names no model layer (a layer of mediaType "
            f"{OLLAMA_MODEL_LAYER} with a digest): {e!r}"
        ) from e
    algo, _, hexdigest = str(digest).partition(":")
    blob = root / "blobs" / f"{algo}-{hexdigest}"
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise CheckpointError(f"ollama manifest {manifest} has a malformed digest {digest!r}")
    if not blob.is_file():
        raise CheckpointError(
            f"ollama model {name}:{tag}: its manifest {manifest} names blob {digest}, which is "
            f"missing: looked for {blob}",
            fix=f"run `ollama pull {name}:{tag}` again to fetch the weights",
        )
    return blob


# -- chat models ------------------------------------------------------------------------------
# A model is a chat model when it was instruction-tuned on Gemma's turns. What records that in a
# model's files is the chat template: Hugging Face writes it into tokenizer_config.json (or
# chat_template.jinja) of an instruction-tuned model, llama.cpp copies it into a GGUF
# (`tokenizer.chat_template`), Ollama ships an instruct model with a chat template layer. Our own
# training keeps it truthful: every tokenizer `codegemma tokenizer train` writes carries the
# template (transformers needs it to build chat prompts), but a training checkpoint gets it only
# from an SFT run (train/run_checkpoint.py; a pretraining checkpoint's is removed). Google's
# pretrained CodeGemma releases are refused by the name they are published under, whatever their
# tokenizer files carry.
CHAT_MODEL = "google/codegemma-7b-it"  # the instruction-tuned CodeGemma to chat with
PRETRAINED_RELEASES = frozenset({"codegemma-2b", "codegemma-7b", "codegemma-1.1-2b"})
OLLAMA_TEMPLATE_LAYER = "application/vnd.ollama.image.template"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def chat_template(path: Path) -> str | None:
    """The chat template a resolved model carries (a Hugging Face directory or a GGUF file)."""
    if is_gguf(path):
        return GGUFFile.open(path).get("tokenizer.chat_template") or None
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8") or None
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def not_a_chat_model(path_or_id: str | os.PathLike, path: Path) -> str | None:
    """Why the model `path_or_id` (resolved to `path`) is no chat model, or None if it is one."""
    text = str(path_or_id)
    if text.startswith(OLLAMA_PREFIX):  # Ollama ships an instruct model with a chat template
        template = _ollama_template(text.removeprefix(OLLAMA_PREFIX))
        if "<start_of_turn>" not in (template or ""):
            return f"{text} has no chat template in Ollama's store: it is a code-completion model"
        return None
    name = _published_name(path)
    if name in PRETRAINED_RELEASES:
        return f"{text} is {name}, CodeGemma's pretrained code-completion model: not a chat model"
    if chat_template(path) is None:
        return f"{text} has no chat template: it is a pretrained (code-completion) model"
    return None


def _published_name(path: Path) -> str:
    """The name a model was published under: the repo of a Hugging Face cache snapshot
    (models--ORG--NAME/snapshots/REV), a GGUF's general.name, else the directory's name; lower
    case, spaces as dashes."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        name = path.parent.parent.name.rsplit("--", 1)[-1]
    elif is_gguf(path):
        name = str(GGUFFile.open(path).get("general.name") or path.stem)
    else:
        name = path.name
    return name.strip().lower().replace(" ", "-")


def _ollama_template(spec: str) -> str | None:
    """The template layer of an Ollama model, None if its manifest names none."""
    _, _, manifest = _ollama_manifest(spec)
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
        digest = next(x["digest"] for x in layers if x.get("mediaType") == OLLAMA_TEMPLATE_LAYER)
        blob = ollama_models_dir() / "blobs" / str(digest).replace(":", "-", 1)
        return blob.read_text(encoding="utf-8")
    except (OSError, ValueError, AttributeError, KeyError, TypeError, StopIteration):
        return None


def load_checkpoint(
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[GemmaForCausalLM, ModelConfig, Tokenizer]:
    """(model, config, tokenizer) of a resolved path: a GGUF file (gguf.py) or a Hugging Face
    directory (load_model + Tokenizer.load, checked to fit each other)."""
    if is_gguf(path):
        return load_gguf(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.load(path)
    model, config = load_model(path, dtype=dtype, device=device)
    check_tokenizer_fits(tokenizer, config, path)
    return model, config, tokenizer
