"""Sources: directories, git checkouts, tar/zip archives and JSONL/Parquet records -> Documents.

A source is planned into `ReadTask`s before anything is read: a directory, git checkout or zip
is listed (paths and sizes, sorted) and cut into chunks of about `chunk_bytes`, so one big
repository still spreads over all workers; a tar archive or a record file is one task. Tasks
are plain data, so the local and Ray executors run the same `read_task` and see the same files
in the same order.

Files are kept when their language is known (extension, else shebang, see document.py);
binary (a NUL byte in the first 8 KiB), undecodable (not UTF-8), too large and unknown-language
files are skipped and counted under `sources`. An entry that cannot be read at all never stops
a run: it is skipped, named in a warning (undecodable bytes of a name shown escaped, `\\xff`)
and counted by reason (`SKIP_REASONS`). Each entry is counted once, under `files`, and then
under `read` or the first `skipped.<reason>` that applies.

    tasks = plan_sources(["myrepo=path/to/checkout", "corpus.jsonl"], chunk_bytes=8 << 20)
    stats = Counter(); docs = list(read_task(tasks[0], stats))
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import lzma
import os
import stat
import subprocess
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from codegemma.data.document import LANGUAGES, Document, language_of
from codegemma.errors import SourceError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", ".tox"})
SNIFF_BYTES = 8192

# Entries skipped with a warning (`skipped.<reason>` in the stats), and what the warning says.
SKIP_REASONS = {
    "bad_name": "its name is not valid UTF-8",
    "symlink": "a symbolic link, not followed",
    "special": "not a regular file",
    "unreadable": "cannot be read",
    "unreadable_dir": "the directory cannot be listed",
    "undecodable": "the record is not valid UTF-8 text",
}
# Errors of a damaged archive or member (zlib and lzma raise their own kinds, bz2 OSError).
ARCHIVE_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zipfile.BadZipFile,
    tarfile.TarError,
    NotImplementedError,  # a zip compression method Python lacks
    RuntimeError,  # an encrypted zip member
)

Warn = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class ReadTask:
    """One unit of reading work: a source kind, its path, its repo name and (for listed
    sources) the members to read. `index` orders tasks globally. `skipped` holds the
    (reason, path, detail) of entries found unreadable while listing (the first task of a
    source carries them), so they are counted and warned about with the documents."""

    index: int
    kind: str  # "dir" | "git" | "zip" | "tar" | "jsonl" | "parquet"
    path: str
    repo: str
    members: tuple[str, ...] = ()
    nbytes: int = 0
    skipped: tuple[tuple[str, str, str], ...] = ()


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


def shown(name: str) -> str:
    """`name` printable: bytes that are not UTF-8 (surrogate escapes from the file system) as
    `\\xff`, lone surrogates (from JSON `\\ud800` escapes) as `\\ud800`."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def valid_text(text: str) -> bool:
    """True when `text` is valid Unicode (no lone surrogates), i.e. it can be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
            f"source {shown(str(path))} does not exist; pass a directory, archive or JSONL/Parquet"
        )
    for suffix in RECORD_SUFFIXES:
        if name.endswith(suffix):
            return suffix.strip(".").replace(".gz", "")
    if name.endswith(".zip"):
        return "zip"
    if any(name.endswith(s) for s in ARCHIVE_SUFFIXES):
        return "tar"
    raise SourceError(
        f"source {shown(str(path))}: unknown kind; expected a directory, "
        f"{', '.join(ARCHIVE_SUFFIXES)} or {', '.join(RECORD_SUFFIXES)}"
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
        if not valid_text(repo):
            raise SourceError(
                f"source {shown(spec)}: the repository name {shown(repo)!r} is not valid UTF-8",
                fix="name the repository explicitly as NAME=PATH",
            )
        if kind not in ("jsonl", "parquet"):
            if repo in seen:
                raise SourceError(
                    f"sources {seen[repo]} and {shown(spec)} are both named {repo!r}; "
                    f"name them explicitly as NAME=PATH"
                )
            seen[repo] = shown(spec)
        if kind in ("dir", "git", "zip"):
            listing, skipped = _list_members(kind, path)
            tasks.extend(_chunk(kind, path, repo, listing, skipped, config, start=len(tasks)))
        else:
            size = path.stat().st_size
            tasks.append(
                ReadTask(index=len(tasks), kind=kind, path=str(path), repo=repo, nbytes=size)
            )
    return tasks


Listing = tuple[list[tuple[str, int]], list[tuple[str, str, str]]]


def _list_members(kind: str, path: Path) -> Listing:
    """(sorted (name, size) of the entries to read, (reason, name, detail) of entries that
    cannot be listed). Symlinks, bad names and special files are listed: `read_task` skips
    them, after the language check, so a link to a README is no more noise than the README."""
    if kind == "git":
        return _list_git(path), []
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except ARCHIVE_ERRORS as e:
            raise _bad_archive(path, "zip", e) from e
        return sorted((i.filename, i.file_size) for i in infos if not i.is_dir()), []
    return _list_dir(path)


def _list_dir(path: Path) -> Listing:
    out: list[tuple[str, int]] = []
    skipped: list[tuple[str, str, str]] = []

    def unlistable(e: OSError) -> None:
        where = os.path.relpath(e.filename, path) if e.filename else "."
        skipped.append(("unreadable_dir", Path(where).as_posix(), e.strerror or str(e)))

    for root, dirs, files in os.walk(path, onerror=unlistable):
        rel = Path(root).relative_to(path)
        kept = []
        for d in sorted(dirs):
            if d in SKIP_DIRS:
                continue
            if Path(root, d).is_symlink():  # os.walk lists links to directories, never enters
                skipped.append(("symlink", (rel / d).as_posix(), ""))
            else:
                kept.append(d)
        dirs[:] = kept
        for f in files:
            out.append(((rel / f).as_posix(), _size(Path(root, f))))
    return sorted(out), sorted(skipped)


def _size(path: Path) -> int:
    """The entry's own size for planning (a link's, not its target's); 0 when it has none."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _list_git(path: Path) -> list[tuple[str, int]]:
    try:
        res = subprocess.run(
            ["git", "-C", str(path), "ls-files", "-z", "--cached"],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise SourceError(f"git ls-files failed in {path}: {e}; is git installed?") from e
    names = res.stdout.decode("utf-8", "surrogateescape").split("\0")
    return sorted((name, _size(path / name)) for name in names if name)


def _chunk(
    kind: str,
    path: Path,
    repo: str,
    listing: list[tuple[str, int]],
    skipped: list[tuple[str, str, str]],
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
        ReadTask(
            index=start + i,
            kind=kind,
            path=str(path),
            repo=repo,
            members=tuple(m),
            nbytes=n,
            skipped=tuple(skipped) if i == 0 else (),
        )
        for i, (m, n) in enumerate(groups)
    ]


def _bad_archive(path: Path | str, kind: str, e: BaseException) -> SourceError:
    return SourceError(
        f"{shown(str(path))} is not a readable {kind} archive: {e}",
        fix="replace the damaged archive, or leave it out of the sources",
    )


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


def skip(stats: Counter[str], warn: Warn, reason: str, where: str, detail: str = "") -> None:
    """Count an entry that cannot be read under `skipped.<reason>` and warn, naming it."""
    stats[f"skipped.{reason}"] += 1
    why = SKIP_REASONS[reason] + (f" ({detail})" if detail else "")
    warn(f"skipped {shown(where)}: {why}")


def _language(path: str, config: SourceConfig, stats: Counter[str]) -> str | None:
    """Count an entry under `files`; its language when it should be read ("" = decide by
    shebang), else None (counted as skipped.language)."""
    stats["files"] += 1
    lang = language_of(path)
    if (lang is None and PurePosixPath(path).suffix) or (
        lang is not None and lang not in config.languages
    ):
        stats["skipped.language"] += 1
        return None
    return lang or ""


def _wanted(path: str, size: int, config: SourceConfig, stats: Counter[str]) -> str | None:
    """The language when the file should be read ("" = decide by shebang), else None."""
    lang = _language(path, config, stats)
    if lang is not None and size > config.max_file_bytes:
        stats["skipped.too_large"] += 1
        return None
    return lang


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
    task: ReadTask,
    stats: Counter[str],
    config: SourceConfig | None = None,
    warn: Warn | None = None,
) -> Iterator[Document]:
    """The documents of one task, in member order; skips are counted into `stats`, and each
    entry that cannot be read is named through `warn` (default: a logged warning)."""
    config = config or SourceConfig()
    warn = warn or log.warning
    readers = {
        "dir": _read_files,
        "git": _read_files,
        "zip": _read_zip,
        "tar": _read_tar,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
    }
    for reason, name, detail in task.skipped:
        stats["files"] += 1
        skip(stats, warn, reason, f"{task.path}/{name}", detail)
    yield from readers[task.kind](task, stats, config, warn)


class _NotRegular(Exception):
    """The entry is a symlink or not a regular file (FIFO, socket, device, directory)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read_regular(path: Path, max_bytes: int) -> bytes | None:
    """The bytes of the regular file `path`, or None when it is larger than `max_bytes`.
    Opened without following links and without blocking, so a FIFO cannot hang the run."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _NotRegular("symlink") from e
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular("special")
        if st.st_size > max_bytes:
            return None
        return f.read()


def _read_files(
    task: ReadTask, stats: Counter[str], config: SourceConfig, warn: Warn
) -> Iterator[Document]:
    root = Path(task.path)
    for name in task.members:
        where = f"{task.path}/{name}"
        lang = _language(name, config, stats)
        if lang is None:
            continue
        if not valid_text(name):
            skip(stats, warn, "bad_name", where)
            continue
        try:
            data = _read_regular(root / name, config.max_file_bytes)
        except _NotRegular as e:
            skip(stats, warn, e.reason, where)
            continue
        except OSError as e:
            skip(stats, warn, "unreadable", where, e.strerror or str(e))
            continue
        if data is None:
            stats["skipped.too_large"] += 1
            continue
        doc = _make_doc(task.repo, name, data, lang, config, stats)
        if doc is not None:
            yield doc


def _read_zip(
    task: ReadTask, stats: Counter[str], config: SourceConfig, warn: Warn
) -> Iterator[Document]:
    try:
        zf = zipfile.ZipFile(task.path)
    except ARCHIVE_ERRORS as e:
        raise _bad_archive(task.path, "zip", e) from e
    with zf:
        members = [zf.getinfo(m) for m in task.members]
        prefix = _common_root([i.filename for i in zf.infolist() if not i.is_dir()])
        for info in members:
            name = info.filename.removeprefix(prefix)
            where = f"{task.path}:{info.filename}"
            lang = _wanted(name, info.file_size, config, stats)
            if lang is None:
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                skip(stats, warn, "symlink", where)
                continue
            try:
                data = zf.read(info)
            except ARCHIVE_ERRORS as e:
                skip(stats, warn, "unreadable", where, str(e))
                continue
            doc = _make_doc(task.repo, name, data, lang, config, stats)
            if doc is not None:
                yield doc


def _read_tar(
    task: ReadTask, stats: Counter[str], config: SourceConfig, warn: Warn
) -> Iterator[Document]:
    try:  # reading every header first: a truncated or damaged archive fails here
        with tarfile.open(task.path) as tf:
            infos = sorted((i for i in tf.getmembers() if not i.isdir()), key=lambda i: i.name)
            # a damaged member is skipped inside; nothing else raises ARCHIVE_ERRORS there
            yield from _read_tar_members(task, tf, infos, stats, config, warn)
    except ARCHIVE_ERRORS as e:
        raise _bad_archive(task.path, "tar", e) from e


def _read_tar_members(
    task: ReadTask,
    tf: tarfile.TarFile,
    infos: list[tarfile.TarInfo],
    stats: Counter[str],
    config: SourceConfig,
    warn: Warn,
) -> Iterator[Document]:
    prefix = _common_root([i.name for i in infos if i.isfile()])
    for info in infos:
        name = info.name.removeprefix(prefix)
        where = f"{task.path}:{info.name}"
        lang = _wanted(name, info.size, config, stats)
        if lang is None:
            continue
        if not valid_text(name):
            skip(stats, warn, "bad_name", where)
        elif info.issym() or info.islnk():
            skip(stats, warn, "symlink", where, f"to {shown(info.linkname)}")
        elif not info.isfile():
            skip(stats, warn, "special", where)
        else:
            try:
                data = tf.extractfile(info).read()  # a regular member always has a file
            except ARCHIVE_ERRORS as e:
                skip(stats, warn, "unreadable", where, str(e))
                continue
            doc = _make_doc(task.repo, name, data, lang, config, stats)
            if doc is not None:
                yield doc


def _common_root(names: list[str]) -> str:
    """GitHub-style archives wrap everything in one `repo-main/` folder: strip it from paths."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return tops.pop() + "/"
    return ""


def _record_doc(
    rec: dict, where: str, config: SourceConfig, stats: Counter[str], warn: Warn
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
    if not (valid_text(rec["path"]) and valid_text(rec["repo"])):
        skip(stats, warn, "bad_name", where, f"{shown(rec['repo'])}/{shown(rec['path'])}")
        return None
    if not valid_text(content):
        skip(stats, warn, "undecodable", where, "a lone surrogate in content")
        return None
    if "\0" in content[:SNIFF_BYTES]:
        stats["skipped.binary"] += 1
        return None
    language = lang or language_of(rec["path"], content)
    if language is None or language not in config.languages:
        stats["skipped.language"] += 1
        return None
    stats["read"] += 1
    stats["bytes"] += len(content.encode("utf-8"))
    return Document(text=content, repo=rec["repo"], path=rec["path"], language=language)


def _read_jsonl(
    task: ReadTask, stats: Counter[str], config: SourceConfig, warn: Warn
) -> Iterator[Document]:
    opener = gzip.open if task.path.endswith(".gz") else open
    with opener(task.path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{task.path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                stats["files"] += 1
                skip(stats, warn, "undecodable", where, str(e))
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{shown(where)}: invalid JSON ({e})") from e
            doc = _record_doc(rec, where, config, stats, warn)
            if doc is not None:
                yield doc


def _read_parquet(
    task: ReadTask, stats: Counter[str], config: SourceConfig, warn: Warn
) -> Iterator[Document]:
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
            doc = _record_doc(rec, f"{task.path} row {row}", config, stats, warn)
            if doc is not None:
                yield doc
