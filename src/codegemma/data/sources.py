"""Sources: directories, git checkouts, tar/zip archives and JSONL/Parquet records -> Documents.

A source is planned into `ReadTask`s before anything is read: a directory, git checkout or zip
is listed (paths and sizes, sorted) and cut into chunks of about `chunk_bytes`, so one big
repository still spreads over all workers; a tar archive or a record file is one task. Tasks
are plain data, so the local and Ray executors run the same `read_task` and see the same files
in the same order.

Files are kept when their language is known (extension, else shebang, see document.py);
binary (a NUL byte in the first 8 KiB), undecodable (not UTF-8), too large and unknown-language
files are skipped and counted under `sources`.

    tasks = plan_sources(["myrepo=path/to/checkout", "corpus.jsonl"], chunk_bytes=8 << 20)
    stats = Counter(); docs = list(read_task(tasks[0], stats))
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from codegemma.data.document import LANGUAGES, Document, language_of
from codegemma.errors import SourceError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", ".tox"})
SNIFF_BYTES = 8192


@dataclass(frozen=True, kw_only=True)
class ReadTask:
    """One unit of reading work: a source kind, its path, its repo name and (for listed
    sources) the members to read. `index` orders tasks globally."""

    index: int
    kind: str  # "dir" | "git" | "zip" | "tar" | "jsonl" | "parquet"
    path: str
    repo: str
    members: tuple[str, ...] = ()
    nbytes: int = 0


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    languages: tuple[str, ...] = LANGUAGES
    max_file_bytes: int = 1_000_000  # larger files are never read (counted as skipped.too_large)
    chunk_bytes: int = 4 << 20  # about this many bytes of files per read task

    def __post_init__(self) -> None:
        unknown = sorted(set(self.languages) - set(LANGUAGES))
        if unknown:
            raise SourceError(f"unknown language(s) {unknown}; supported: {list(LANGUAGES)}")
        if self.max_file_bytes <= 0 or self.chunk_bytes <= 0:
            raise SourceError("max_file_bytes and chunk_bytes must be positive")


def parse_source(spec: str) -> tuple[str | None, Path]:
    """`NAME=PATH` names the repo explicitly; a bare `PATH` is named after its file/dir name."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, Path(path)
    return None, Path(spec)


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "git" if (path / ".git").exists() else "dir"
    if not path.is_file():
        raise SourceError(
            f"source {path} does not exist; pass a directory, archive or JSONL/Parquet"
        )
    for suffix in RECORD_SUFFIXES:
        if name.endswith(suffix):
            return suffix.strip(".").replace(".gz", "")
    if name.endswith(".zip"):
        return "zip"
    if any(name.endswith(s) for s in ARCHIVE_SUFFIXES):
        return "tar"
    raise SourceError(
        f"source {path}: unknown kind; expected a directory, {', '.join(ARCHIVE_SUFFIXES)} "
        f"or {', '.join(RECORD_SUFFIXES)}"
    )


def _repo_name(path: Path) -> str:
    name = path.resolve().name
    for suffix in sorted(ARCHIVE_SUFFIXES + RECORD_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def plan_sources(specs: Sequence[str], config: SourceConfig | None = None) -> list[ReadTask]:
    """List every source and cut it into read tasks (deterministic: sorted members)."""
    config = config or SourceConfig()
    if not specs:
        raise SourceError("no sources given; pass at least one directory, archive or JSONL/Parquet")
    tasks: list[ReadTask] = []
    seen: dict[str, str] = {}
    for spec in specs:
        name, path = parse_source(spec)
        kind = _kind_of(path)
        repo = name or _repo_name(path)
        if kind not in ("jsonl", "parquet"):
            if repo in seen:
                raise SourceError(
                    f"sources {seen[repo]} and {spec} are both named {repo!r}; "
                    f"name them explicitly as NAME=PATH"
                )
            seen[repo] = spec
        if kind in ("dir", "git", "zip"):
            listing = _list_members(kind, path)
            tasks.extend(_chunk(kind, path, repo, listing, config, start=len(tasks)))
        else:
            size = path.stat().st_size
            tasks.append(
                ReadTask(index=len(tasks), kind=kind, path=str(path), repo=repo, nbytes=size)
            )
    return tasks


def _list_members(kind: str, path: Path) -> list[tuple[str, int]]:
    if kind == "git":
        return _list_git(path)
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            return sorted((i.filename, i.file_size) for i in zf.infolist() if not i.is_dir())
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in files:
            full = Path(root, f)
            if full.is_symlink() or not full.is_file():
                continue
            out.append((full.relative_to(path).as_posix(), full.stat().st_size))
    return sorted(out)


def _list_git(path: Path) -> list[tuple[str, int]]:
    try:
        res = subprocess.run(
            ["git", "-C", str(path), "ls-files", "-z", "--cached"],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise SourceError(f"git ls-files failed in {path}: {e}; is git installed?") from e
    out = []
    for name in res.stdout.decode("utf-8", "surrogateescape").split("\0"):
        full = path / name
        if name and full.is_file() and not full.is_symlink():
            out.append((name, full.stat().st_size))
    return sorted(out)


def _chunk(
    kind: str,
    path: Path,
    repo: str,
    listing: list[tuple[str, int]],
    config: SourceConfig,
    start: int,
) -> list[ReadTask]:
    """Cut a sorted listing into tasks of about `chunk_bytes` (at least one task per source)."""
    groups: list[tuple[list[str], int]] = [([], 0)]
    for name, nbytes in listing:
        if groups[-1][1] >= config.chunk_bytes:
            groups.append(([], 0))
        members, size = groups[-1]
        members.append(name)
        groups[-1] = (members, size + nbytes)
    return [
        ReadTask(index=start + i, kind=kind, path=str(path), repo=repo, members=tuple(m), nbytes=n)
        for i, (m, n) in enumerate(groups)
    ]


# -- reading -----------------------------------------------------------------------------------
def decode(data: bytes, path: str, stats: Counter[str]) -> str | None:
    """UTF-8 text, or None (counted) for binary or undecodable bytes."""
    if b"\0" in data[:SNIFF_BYTES]:
        stats["skipped.binary"] += 1
        return None
    try:
        return data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError:
        stats["skipped.undecodable"] += 1
        return None


def _wanted(path: str, size: int, config: SourceConfig, stats: Counter[str]) -> str | None:
    """The language when the file should be read ("" = decide by shebang), else None."""
    stats["files"] += 1
    lang = language_of(path)
    if lang is None and PurePosixPath(path).suffix:
        stats["skipped.language"] += 1
        return None
    if lang is not None and lang not in config.languages:
        stats["skipped.language"] += 1
        return None
    if size > config.max_file_bytes:
        stats["skipped.too_large"] += 1
        return None
    return lang or ""


def _make_doc(
    repo: str, path: str, data: bytes, lang: str, config: SourceConfig, stats: Counter[str]
) -> Document | None:
    text = decode(data, path, stats)
    if text is None:
        return None
    language = lang or language_of(path, text)
    if language is None or language not in config.languages:
        stats["skipped.language"] += 1
        return None
    stats["read"] += 1
    stats["bytes"] += len(data)
    return Document(text=text, repo=repo, path=path, language=language)


def read_task(
    task: ReadTask, stats: Counter[str], config: SourceConfig | None = None
) -> Iterator[Document]:
    """The documents of one task, in member order; skips are counted into `stats`."""
    config = config or SourceConfig()
    readers = {
        "dir": _read_files,
        "git": _read_files,
        "zip": _read_zip,
        "tar": _read_tar,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
    }
    yield from readers[task.kind](task, stats, config)


def _read_files(task: ReadTask, stats: Counter[str], config: SourceConfig) -> Iterator[Document]:
    root = Path(task.path)
    for name in task.members:
        full = root / name
        lang = _wanted(name, full.stat().st_size, config, stats)
        if lang is not None:
            doc = _make_doc(task.repo, name, full.read_bytes(), lang, config, stats)
            if doc is not None:
                yield doc


def _read_zip(task: ReadTask, stats: Counter[str], config: SourceConfig) -> Iterator[Document]:
    with zipfile.ZipFile(task.path) as zf:
        members = [zf.getinfo(m) for m in task.members]
        prefix = _common_root([i.filename for i in zf.infolist() if not i.is_dir()])
        for info in members:
            name = info.filename[len(prefix) :]
            lang = _wanted(name, info.file_size, config, stats)
            if lang is not None:
                doc = _make_doc(task.repo, name, zf.read(info), lang, config, stats)
                if doc is not None:
                    yield doc


def _read_tar(task: ReadTask, stats: Counter[str], config: SourceConfig) -> Iterator[Document]:
    try:
        with tarfile.open(task.path) as tf:
            yield from _read_tar_members(task, tf, stats, config)
    except tarfile.TarError as e:
        raise SourceError(f"{task.path} is not a readable tar archive: {e}") from e


def _read_tar_members(
    task: ReadTask, tf: tarfile.TarFile, stats: Counter[str], config: SourceConfig
) -> Iterator[Document]:
    infos = sorted((i for i in tf.getmembers() if i.isfile()), key=lambda i: i.name)
    prefix = _common_root([i.name for i in infos])
    for info in infos:
        name = info.name[len(prefix) :]
        lang = _wanted(name, info.size, config, stats)
        if lang is not None:
            f = tf.extractfile(info)
            if f is not None:
                doc = _make_doc(task.repo, name, f.read(), lang, config, stats)
                if doc is not None:
                    yield doc


def _common_root(names: list[str]) -> str:
    """GitHub-style archives wrap everything in one `repo-main/` folder: strip it from paths."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return tops.pop() + "/"
    return ""


def _record_doc(
    rec: dict, where: str, config: SourceConfig, stats: Counter[str]
) -> Document | None:
    missing = [k for k in ("repo", "path", "content") if not isinstance(rec.get(k), str)]
    if missing:
        raise SourceError(
            f"{where}: record lacks string field(s) {missing}; "
            f"each record needs repo, path and content"
        )
    content: str = rec["content"]
    lang = _wanted(rec["path"], len(content), config, stats)
    if lang is None:
        return None
    if "\0" in content[:SNIFF_BYTES]:
        stats["skipped.binary"] += 1
        return None
    language = lang or language_of(rec["path"], content)
    if language is None or language not in config.languages:
        stats["skipped.language"] += 1
        return None
    stats["read"] += 1
    stats["bytes"] += len(content.encode("utf-8", "surrogatepass"))
    return Document(text=content, repo=rec["repo"], path=rec["path"], language=language)


def _read_jsonl(task: ReadTask, stats: Counter[str], config: SourceConfig) -> Iterator[Document]:
    opener = gzip.open if task.path.endswith(".gz") else open
    with opener(task.path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{task.path}:{lineno}: invalid JSON ({e})") from e
            doc = _record_doc(rec, f"{task.path}:{lineno}", config, stats)
            if doc is not None:
                yield doc


def _read_parquet(task: ReadTask, stats: Counter[str], config: SourceConfig) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(task.path)
    missing = {"repo", "path", "content"} - set(pf.schema_arrow.names)
    if missing:
        raise SourceError(
            f"{task.path}: Parquet lacks column(s) {sorted(missing)}; "
            f"it needs repo, path and content"
        )
    row = 0
    for batch in pf.iter_batches(columns=["repo", "path", "content"]):
        for rec in batch.to_pylist():
            row += 1
            doc = _record_doc(rec, f"{task.path} row {row}", config, stats)
            if doc is not None:
                yield doc
