"""File I/O that never leaves a half-written file: write to a temporary file beside the target,
fsync, then rename over it (atomic on POSIX within one filesystem).

    write_text_atomic(out / "manifest.json", json.dumps(manifest))
    with atomic_path(out / "loss.png") as tmp:      # for writers that want a path
        fig.savefig(tmp, format="png")

Files get the mode a plainly created file would get under the current umask (`file_mode`), not
the 0600 of `tempfile.mkstemp`, so every file a stage writes has one mode.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def file_mode() -> int:
    """The mode a plainly created file gets under the current umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """`data` at `path`, or (on any failure) `path` as it was before."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) at `path`, or (on any failure) `path` as it was before."""
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a file name; renamed onto `path`
    when the block ends without an error, removed otherwise."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
