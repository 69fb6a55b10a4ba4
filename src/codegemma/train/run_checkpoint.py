"""Training checkpoints: atomic, self-describing, and directly loadable as models.

Layout:

    RUN_DIR/checkpoints/step-000100/
        model/              HF model dir (save_model: config.json, safetensors in fp32) plus the
                            tokenizer files, so codegemma.load and transformers load it as is
        trainer_state.pt    optimizer state (keyed by parameter name), step, samples consumed,
                            RNG states, the TrainConfig
        COMPLETE            JSON: step and the size of every file above; written last

Key choice: a checkpoint is written into `checkpoints/.step-000100.<random>.tmp` and renamed into
place only after COMPLETE is written and everything is fsynced, so a process killed at any moment,
also in the middle of a save, leaves either no new checkpoint or a complete one. `latest_checkpoint`
scans for complete ones (COMPLETE present, file sizes as recorded); temp dirs of interrupted saves
are swept by `clean_incomplete`. Old checkpoints are renamed away before they are deleted, so a
half-deleted one never looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codegemma.checkpoint import fsync_dir, load_model, save_model
from codegemma.config import ModelConfig
from codegemma.errors import TrainCheckpointError
from codegemma.fileio import write_text_atomic
from codegemma.model import GemmaForCausalLM

CHECKPOINTS = "checkpoints"
MODEL = "model"
STATE = "trainer_state.pt"
COMPLETE = "COMPLETE"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
STEP_RE = re.compile(r"step-(\d{6,})")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def is_complete(ckpt: Path) -> bool:
    marker = ckpt / COMPLETE
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for rel, size in files.items():
        path = ckpt / rel
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_RE.fullmatch(d.name)
        if m and d.is_dir() and is_complete(d):
            found.append((int(m.group(1)), d))
    return sorted(found)


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


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


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
) -> Path:
    """Write checkpoint `step` atomically (rank 0 only); keep the newest `keep` complete ones."""
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
            _copy_tokenizer(Path(tokenizer_dir), tmp / MODEL)
        _save_state(trainer_state, tmp / STATE)
        write_text_atomic(
            tmp / COMPLETE,
            json.dumps({"step": step, "files": _file_sizes(tmp)}, indent=1, sort_keys=True) + "\n",
        )
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


def _copy_tokenizer(src: Path, model_dir: Path) -> None:
    """The tokenizer files of a directory (or of the directory of a given tokenizer file)."""
    names = set(TOKENIZER_FILES) | ({src.name} if src.is_file() else set())
    folder = src if src.is_dir() else src.parent
    for name in sorted(names):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, model_dir / name)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    for _, d in complete_checkpoints(run_dir)[:-keep]:
        trash = d.parent / f".{d.name}.{uuid.uuid4().hex}.tmp"
        os.replace(d, trash)  # from here the old checkpoint is gone, not half-gone
        shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(ckpt: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(fp32 model state dict, trainer state) of a complete checkpoint."""
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise TrainCheckpointError(
            f"{ckpt} is not a complete checkpoint (no valid {COMPLETE} marker, or files differ "
            f"from it); resume from another one, e.g. latest_checkpoint(run_dir)"
        )
    model, _ = load_model(ckpt / MODEL, dtype=torch.float32)
    state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    return model.state_dict(), state
