"""Token shards: fixed-length sequences in raw numpy files, a JSON manifest, and the reader.

Layout of a prepared directory:

    manifest.json          format, seq_len, dtype, tokenizer fingerprint, counts, config, stats
    shard-00000.bin        [sequences, seq_len] tokens, C order, no header (np.memmap-able)
    .work/                 plan, completion markers and intermediates (resume state)

dtype is uint16 when the vocabulary fits (<= 65536 ids), else uint32. A shard is written to a
temporary file (`.shard-00000.bin.*.tmp`) and renamed into place when complete, and only then is
its completion marker written, so a crash never leaves a shard that looks done (a rerun removes
the temporaries a killed run leaves); the manifest is written last, so a directory with a
manifest is complete. Every file gets the one mode of `codegemma.fileio.file_mode()`. `open_shards(dir)` validates the manifest against the
files (sizes, optionally checksums and the tokenizer) and yields `[seq_len]` arrays.

    ds = open_shards("data/out", expect_tokenizer=tok.fingerprint)
    for seq in ds: ...            # np.ndarray [seq_len]
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codegemma.errors import ShardError
from codegemma.fileio import file_mode, write_text_atomic

FORMAT = "codegemma-token-shards"
VERSION = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    file: str
    sequences: int
    tokens_in: int  # tokens given to the writer
    tokens_dropped: int  # the tail shorter than seq_len
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dict(
            file=self.file,
            sequences=self.sequences,
            tokens_in=self.tokens_in,
            tokens_dropped=self.tokens_dropped,
            sha256=self.sha256,
        )


class ShardWriter:
    """Cuts a token stream into [seq_len] rows and writes them; bounded memory.

    Rows are appended to a temporary file in the target directory; `close()` renames it into
    place. The tail that does not fill a row is dropped and counted.
    """

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, buffer_rows: int = 1024) -> None:
        if seq_len <= 0:
            raise ShardError(f"seq_len must be positive, got {seq_len}")
        self.path, self.seq_len, self.dtype = Path(path), seq_len, np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        self._f = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self._buf = np.empty(seq_len * buffer_rows, self.dtype)
        self._fill = 0
        self.sequences = self.tokens_in = 0
        self._limit = np.iinfo(self.dtype).max

    def add(self, tokens: list[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > self._limit):
            raise ShardError(
                f"token id out of range for {self.dtype} shards: [{arr.min()}, {arr.max()}]"
            )
        self.tokens_in += arr.size
        while arr.size:
            take = min(arr.size, self._buf.size - self._fill)
            self._buf[self._fill : self._fill + take] = arr[:take]
            self._fill += take
            arr = arr[take:]
            if self._fill == self._buf.size:
                self._flush(self._fill)

    def _flush(self, n: int) -> None:
        rows = n // self.seq_len
        data = self._buf[: rows * self.seq_len].tobytes()
        self._f.write(data)
        self._sha.update(data)
        self.sequences += rows
        rest = n - rows * self.seq_len
        self._buf[:rest] = self._buf[rows * self.seq_len : n]
        self._fill = rest

    def close(self) -> ShardInfo:
        try:
            self._flush(self._fill)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.chmod(self._tmp, file_mode())  # mkstemp makes 0600
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return ShardInfo(
            file=self.path.name,
            sequences=self.sequences,
            tokens_in=self.tokens_in,
            tokens_dropped=self._fill,
            sha256=self._sha.hexdigest(),
        )

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        Path(self._tmp).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_manifest(
    tok: Any,
    seq_len: int,
    shards: list[dict[str, Any]],
    tokenizer_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The manifest fields every prepared directory has, and the reader checks."""
    num_sequences = sum(s["sequences"] for s in shards)
    return {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": seq_len,
        "dtype": token_dtype(tok.vocab_size).name,
        "num_sequences": num_sequences,
        "num_tokens": num_sequences * seq_len,
        "tokenizer": {
            "path": str(tokenizer_path or tok.path),
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "bos": tok.bos_id,
            "eos": tok.eos_id,
            "pad": tok.pad_id,
        },
        "shards": shards,
    }


def write_token_dataset(
    out: str | os.PathLike,
    tokens: list[int] | np.ndarray,
    tok: Any,
    *,
    seq_len: int,
    rows_per_shard: int | None = None,
) -> Path:
    """A prepared directory from one token stream made outside `codegemma data prepare` (tests,
    benchmarks, custom pipelines): cut into [seq_len] rows, the tail dropped, `rows_per_shard`
    rows a shard (default: one shard), the manifest written last."""
    out = Path(out)
    stream = np.asarray(tokens)
    rows = len(stream) // seq_len
    per_shard = rows_per_shard or max(rows, 1)
    dtype = token_dtype(tok.vocab_size)
    shards = []
    for i, start in enumerate(range(0, max(rows, 1), per_shard)):
        writer = ShardWriter(out / shard_name(i), seq_len, dtype)
        writer.add(stream[start * seq_len : min(rows, start + per_shard) * seq_len])
        shards.append(writer.close().to_dict())
    write_text_atomic(out / MANIFEST, json.dumps(base_manifest(tok, seq_len, shards), indent=1))
    return out


class ShardDataset:
    """Sequences of a prepared directory, in shard order; `ds[i]` is a [seq_len] memmap view."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        expect_tokenizer: str | None = None,
        expect_seq_len: int | None = None,
        verify: bool = False,
    ) -> None:
        self.dir = Path(directory)
        self.manifest = load_manifest(self.dir)
        m = self.manifest
        self.seq_len: int = m["seq_len"]
        self.dtype = np.dtype(m["dtype"])
        if expect_tokenizer and m["tokenizer"]["fingerprint"] != expect_tokenizer:
            raise ShardError(
                f"{self.dir} was tokenized with tokenizer {m['tokenizer']['fingerprint'][:12]}, "
                f"not {expect_tokenizer[:12]}; prepare the data again with this tokenizer"
            )
        if expect_seq_len is not None and self.seq_len != expect_seq_len:
            raise ShardError(
                f"{self.dir} has seq_len {self.seq_len}, expected {expect_seq_len}; "
                f"prepare it again with --seq-len {expect_seq_len}"
            )
        self._arrays: list[np.ndarray] = []
        for info in m["shards"]:
            self._arrays.append(self._open(info, verify))
        self._offsets = np.cumsum([0] + [len(a) for a in self._arrays])

    def _open(self, info: dict[str, Any], verify: bool) -> np.ndarray:
        path = self.dir / info["file"]
        expected = info["sequences"] * self.seq_len * self.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise ShardError(
                f"{path} is missing or has the wrong size (expected {expected} bytes); "
                f"rerun `codegemma data prepare` with the same --out to repair it"
            )
        if verify and file_sha256(path) != info["sha256"]:
            raise ShardError(f"{path} does not match its checksum in {MANIFEST}; it was modified")
        if info["sequences"] == 0:
            return np.zeros((0, self.seq_len), self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(info["sequences"], self.seq_len))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range ({len(self)} sequences)")
        i %= len(self)
        s = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return self._arrays[s][i - self._offsets[s]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for arr in self._arrays:
            yield from arr


def open_shards(directory: str | os.PathLike, **kwargs: Any) -> ShardDataset:
    """Open a prepared directory for reading (see ShardDataset for the checks)."""
    return ShardDataset(directory, **kwargs)


def load_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(
            f"{path} not found: {directory} is not a prepared dataset, or its "
            f"preparation did not finish (rerun it with the same --out to resume)"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(m, dict):
        raise ShardError(f"{path} is not a {FORMAT} manifest (a JSON {type(m).__name__})")
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ShardError(
            f"{path} is not a {FORMAT} v{VERSION} manifest "
            f"(format={m.get('format')!r}, version={m.get('version')!r})"
        )
    for key in ("seq_len", "dtype", "tokenizer", "shards", "num_sequences"):
        if key not in m:
            raise ShardError(f"{path} lacks {key!r}; the file is damaged, prepare the data again")
    return m
