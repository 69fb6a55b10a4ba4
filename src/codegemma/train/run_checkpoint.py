"""Training checkpoints: atomic, self-describing, checked whole before a resume, loadable as models.

Layout:

    RUN_DIR/checkpoints/step-000100/
        model/              HF model dir (save_model: config.json, safetensors in fp32) plus the
                            tokenizer files, so codegemma.load and transformers load it as is
        trainer_state.pt    optimizer state (keyed by parameter name), step, samples consumed,
                            RNG states, the TrainConfig
        COMPLETE            JSON: step, the size and the sha256 of every file above; written last

Key choice: a checkpoint is written into `checkpoints/.step-000100.<random>.tmp` and renamed into
place only after COMPLETE is written and everything is fsynced, so a process killed at any moment,
also in the middle of a save, leaves either no new checkpoint or a complete one. `latest_checkpoint`
scans for complete ones (COMPLETE present, file sizes as recorded); temp dirs of interrupted saves
are swept by `clean_incomplete`. Old checkpoints are renamed away before they are deleted, so a
half-deleted one never looks complete.

A checkpoint can still break after its save (a disk error, a copy cut short, a hand edit), so a
resume trusts nothing it has not checked: `resume_checkpoint` loads the newest checkpoint whole
(every file's size and checksum, the trainer state as a weights-only torch file with the keys it
needs, the weights against config.json, the tokenizer files) and falls back to the next older one
if anything fails, with a warning naming the checkpoint and the problem. The broken one is renamed
aside to `step-000200.broken`, never deleted: it no longer counts for `keep_checkpoints`, and a
new save of that step cannot replace it. Checkpoints written before checksums were recorded are
checked the same way, less the checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codegemma.checkpoint import fsync_dir, load_model, save_model
from codegemma.config import ModelConfig
from codegemma.errors import CodegemmaError, TrainCheckpointError
from codegemma.fileio import write_text_atomic
from codegemma.model import GemmaForCausalLM
from codegemma.tokenizer import Tokenizer
from codegemma.train.tokenizer_trainer import GEMMA_CHAT_TEMPLATE

log = logging.getLogger("codegemma.train")

CHECKPOINTS = "checkpoints"
MODEL = "model"
STATE = "trainer_state.pt"
COMPLETE = "COMPLETE"
BROKEN = ".broken"  # suffix of a checkpoint set aside by a resume
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
STEP_RE = re.compile(r"step-(\d{6,})")
STATE_VERSION = 1  # of the trainer_state.pt layout below
STATE_KEYS = ("version", "step", "samples_seen", "optimizer", "rng", "data", "config")


class BrokenCheckpointError(TrainCheckpointError):
    """A checkpoint that fails a check; `checkpoint` is its directory, `reason` what is wrong."""

    def __init__(self, checkpoint: Path, reason: str) -> None:
        super().__init__(
            f"checkpoint {checkpoint} cannot be resumed from: {reason}",
            fix="resume from an older checkpoint (train falls back to one by itself), or move "
            "this one out of the checkpoints directory",
        )
        self.checkpoint, self.reason = checkpoint, reason


@dataclass(frozen=True, kw_only=True)
class Resumable:
    """A checkpoint that passed every check, with what it holds."""

    path: Path
    weights: dict[str, Tensor]  # fp32 model state dict
    state: dict[str, Any]  # the trainer state (STATE_KEYS)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


# -- finding checkpoints ----------------------------------------------------------------------
def is_complete(ckpt: Path) -> bool:
    """COMPLETE is there and every file it lists has its recorded size (no content check)."""
    try:
        _check_sizes(ckpt, _read_marker(ckpt))
    except BrokenCheckpointError:
        return False
    return True


def step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every `step-N` directory, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_RE.fullmatch(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    return [(step, d) for step, d in step_dirs(run_dir) if is_complete(d)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def clean_incomplete(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temp dirs left by saves or deletions that were interrupted; returns them."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [d for d in root.iterdir() if d.name.startswith(".") and d.name.endswith(".tmp")]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


# -- saving -----------------------------------------------------------------------------------
def _files(root: Path) -> list[Path]:
    """Every file of a checkpoint but COMPLETE itself."""
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p != root / COMPLETE]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _marker(root: Path, step: int) -> str:
    files = _files(root)
    rel = [str(p.relative_to(root)) for p in files]
    info = {
        "step": step,
        "files": {r: p.stat().st_size for r, p in zip(rel, files, strict=True)},
        "sha256": {r: _sha256(p) for r, p in zip(rel, files, strict=True)},
    }
    return json.dumps(info, indent=1, sort_keys=True) + "\n"


def _save_state(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, Tensor],
    model_config: ModelConfig,
    trainer_state: dict[str, Any],
    tokenizer_dir: str | os.PathLike | None,
    keep: int,
    chat: bool = False,
) -> Path:
    """Write checkpoint `step` atomically (rank 0 only); keep the newest `keep` complete ones.
    `chat`: the run fine-tunes for chat (SFT), so the model's tokenizer_config.json carries Gemma's
    chat template, which marks a chat model (checkpoint.chat_template); otherwise it carries none."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        with torch.device("meta"):
            holder = GemmaForCausalLM(model_config)
        holder.load_state_dict(model_state, strict=True, assign=True)
        save_model(holder, model_config, tmp / MODEL)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp / MODEL, chat=chat)
        _save_state(trainer_state, tmp / STATE)
        write_text_atomic(tmp / COMPLETE, _marker(tmp, step))
        fsync_dir(tmp)
        if final.exists():  # an older save of this step: move it aside, then replace it
            os.replace(final, final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp")
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    clean_incomplete(run_dir)
    return final


def _copy_tokenizer(src: Path, model_dir: Path, *, chat: bool) -> None:
    """The tokenizer files of a directory (or of the directory of a given tokenizer file), with
    the chat template in tokenizer_config.json only for a chat model."""
    names = set(TOKENIZER_FILES) | ({src.name} if src.is_file() else set())
    folder = src if src.is_dir() else src.parent
    for name in sorted(names):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, model_dir / name)
    config_file = model_dir / "tokenizer_config.json"  # in the checkpoint's temporary directory
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config.pop("chat_template", None)
        if chat:
            config["chat_template"] = GEMMA_CHAT_TEMPLATE
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (set-aside broken ones are not
    `step-N` directories any more: they neither count nor get deleted)."""
    for _, d in complete_checkpoints(run_dir)[:-keep]:
        trash = d.parent / f".{d.name}.{uuid.uuid4().hex}.tmp"
        os.replace(d, trash)  # from here the old checkpoint is gone, not half-gone
        shutil.rmtree(trash, ignore_errors=True)


# -- checking and loading -----------------------------------------------------------------------
def _read_marker(ckpt: Path) -> dict[str, Any]:
    marker = ckpt / COMPLETE
    if not marker.is_file():
        raise BrokenCheckpointError(
            ckpt, f"no {COMPLETE} marker (its save never finished, or it was not written by train)"
        )
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        sizes, digests = info["files"], info.get("sha256", {})
        if not (isinstance(sizes, dict) and isinstance(digests, dict)):
            raise TypeError("files and sha256 must be objects")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise BrokenCheckpointError(ckpt, f"{COMPLETE} is not a readable marker ({e})") from e
    return info


def _check_sizes(ckpt: Path, info: dict[str, Any]) -> None:
    for rel, size in info["files"].items():
        path = ckpt / rel
        if not path.is_file():
            raise BrokenCheckpointError(ckpt, f"{rel} is missing ({COMPLETE} lists it)")
        if path.stat().st_size != size:
            raise BrokenCheckpointError(
                ckpt,
                f"{rel} is {path.stat().st_size} bytes but {COMPLETE} records {size}: the file "
                f"was truncated or changed after the save",
            )


def _check_digests(ckpt: Path, info: dict[str, Any]) -> None:
    """Every file against the sha256 its save recorded (checkpoints from before checksums were
    recorded have none: their content is checked by loading it)."""
    bad = [
        rel
        for rel, digest in info.get("sha256", {}).items()
        if not (ckpt / rel).is_file() or _sha256(ckpt / rel) != digest
    ]
    if bad:
        raise BrokenCheckpointError(
            ckpt,
            f"{', '.join(bad)} differ{'s' if len(bad) == 1 else ''} from the sha256 recorded in "
            f"{COMPLETE}: the content is corrupt or was changed after the save",
        )


def _load_state(ckpt: Path, step: int | None) -> dict[str, Any]:
    try:
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, OSError, UnpicklingError, EOFError...
        raise BrokenCheckpointError(
            ckpt,
            f"{STATE} is not a readable torch.save file ({type(e).__name__}): it is corrupt or "
            f"truncated",
        ) from e
    if not isinstance(state, dict) or not isinstance(state.get("version"), int):
        raise BrokenCheckpointError(ckpt, f"{STATE} has no integer version: not a trainer state")
    if state["version"] != STATE_VERSION:
        return state  # intact but of another layout: the trainer refuses it, saying so
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise BrokenCheckpointError(
            ckpt, f"{STATE} lacks {', '.join(missing)}: it is not a complete trainer state"
        )
    if step is not None and state["step"] != step:
        raise BrokenCheckpointError(ckpt, f"{STATE} is of step {state['step']}, not {step}")
    return state


def _load_weights(ckpt: Path) -> tuple[dict[str, Tensor], ModelConfig]:
    try:
        model, config = load_model(ckpt / MODEL, dtype=torch.float32)
    except (CodegemmaError, OSError) as e:
        raise BrokenCheckpointError(ckpt, f"{MODEL}/ does not load as a model: {e}") from e
    return model.state_dict(), config


def _check_json(ckpt: Path) -> None:
    """Every JSON file of model/ (config, generation config, tokenizer files) parses."""
    for path in sorted((ckpt / MODEL).glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BrokenCheckpointError(ckpt, f"{MODEL}/{path.name} is not valid JSON ({e})") from e


def _check_tokenizers(ckpt: Path, config: ModelConfig) -> None:
    """Each tokenizer file of model/ loads and has no more tokens than the embedding has rows."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if not (ckpt / MODEL / name).is_file():
            continue
        try:
            tok = Tokenizer.load(ckpt / MODEL / name)
        except (CodegemmaError, OSError) as e:
            raise BrokenCheckpointError(ckpt, f"{MODEL}/{name} does not load: {e}") from e
        if tok.vocab_size > config.vocab_size:
            raise BrokenCheckpointError(
                ckpt,
                f"{MODEL}/{name} has {tok.vocab_size} tokens but the model {config.vocab_size} "
                f"embeddings",
            )


def load_checkpoint(
    ckpt: str | os.PathLike, *, checksums: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(fp32 model state dict, trainer state) of a checkpoint that passes every check, else a
    BrokenCheckpointError naming the file and the problem. `checksums=False` skips hashing the
    files (for ranks told by rank 0 that it already checked them)."""
    ckpt = Path(ckpt)
    info = _read_marker(ckpt)
    _check_sizes(ckpt, info)
    if checksums:
        _check_digests(ckpt, info)
    named = STEP_RE.fullmatch(ckpt.name)
    state = _load_state(ckpt, int(named.group(1)) if named else info.get("step"))
    _check_json(ckpt)
    weights, config = _load_weights(ckpt)
    _check_tokenizers(ckpt, config)
    return weights, state


def resume_checkpoint(run_dir: str | os.PathLike, *, set_aside: bool = True) -> Resumable | None:
    """The newest checkpoint of `run_dir` that loads whole, or None when there is none at all.

    Each broken newer one gets a warning naming it and what is wrong; with `set_aside` (rank 0
    of a resuming run) it is renamed to `step-N.broken`, else left in place. When every
    checkpoint is broken none is touched and a TrainCheckpointError lists them all."""
    broken: list[BrokenCheckpointError] = []
    for _, d in reversed(step_dirs(run_dir)):
        try:
            weights, state = load_checkpoint(d)
        except BrokenCheckpointError as e:
            broken.append(e)
            continue
        for e in broken:
            kept = (
                f"renamed it to {_set_aside(e.checkpoint).name}, nothing deleted"
                if set_aside
                else "left it in place"
            )
            log.warning("%s; %s; using %s, the newest checkpoint that loads", e, kept, d.name)
        return Resumable(path=d, weights=weights, state=state)
    if broken:
        listing = "".join(f"\n  {e.checkpoint.name}: {e.reason}" for e in broken)
        raise TrainCheckpointError(
            f"no checkpoint in {Path(run_dir) / CHECKPOINTS} can be resumed from:{listing}",
            fix="move the broken checkpoints out of that directory to train from step 0 again, "
            "or use a new run_dir",
        )
    return None


def _set_aside(ckpt: Path) -> Path:
    """Rename a broken checkpoint to `step-N.broken` (`.broken-2`, ... if taken)."""
    target, n = ckpt.with_name(ckpt.name + BROKEN), 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}{BROKEN}-{n}")
    os.replace(ckpt, target)
    fsync_dir(ckpt.parent)
    return target
