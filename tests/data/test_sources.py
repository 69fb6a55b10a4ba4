"""Sources and language detection: every source kind reads the same documents; skips counted."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codegemma.data.document import LANGUAGES, Document, language_of
from codegemma.data.sources import SourceConfig, SourceError, plan_sources, read_task


def _read_all(specs, config=None) -> tuple[dict[str, Document], Counter]:
    stats: Counter = Counter()
    docs = {}
    for task in plan_sources(specs, config):
        for d in read_task(task, stats, config):
            docs[d.id] = d
    return docs, stats


@pytest.mark.parametrize(
    "path,text,lang",
    [
        ("a/b.py", None, "python"),
        ("x.tsx", None, "typescript"),
        ("M.kt", None, "kotlin"),
        ("m.go", None, "go"),
        ("lib.rs", None, "rust"),
        ("v.h", None, "c"),
        ("v.hpp", None, "cpp"),
        ("P.cs", None, "csharp"),
        ("A.java", None, "java"),
        ("i.mjs", None, "javascript"),
        ("tool", "#!/usr/bin/env python3.11\nprint(1)\n", "python"),
        ("run", "#!/usr/bin/node\n", "javascript"),
        ("sh", "#!/bin/sh\necho\n", None),
        ("notes.md", None, None),
        ("Makefile", "all:\n", None),
    ],
)
def test_language_of(path: str, text: str | None, lang: str | None) -> None:
    assert language_of(path, text) == lang


@given(st.text(max_size=30), st.text(max_size=200))
def test_language_of_is_total(path: str, text: str) -> None:
    assert language_of(path, text) in (*LANGUAGES, None)
    assert Document(text, "r", path).id == f"r/{path}"


def test_directory_skips_and_counts(corpus) -> None:
    docs, stats = _read_all([str(corpus["alpha"]), str(corpus["beta"])])
    assert "beta/bin/tool" in docs and docs["beta/bin/tool"].language == "python"
    assert "alpha/README.md" not in docs and "beta/latin1.py" not in docs
    assert stats["skipped.binary"] == 1 and stats["skipped.undecodable"] == 1
    assert stats["skipped.language"] == 2
    assert stats["read"] == len(docs) and stats["files"] == len(docs) + 4


def test_chunking_spreads_a_repo_over_tasks_without_changing_the_documents(corpus) -> None:
    small = SourceConfig(chunk_bytes=500)
    tasks = plan_sources([str(corpus["alpha"])], small)
    assert len(tasks) > 2 and [t.index for t in tasks] == list(range(len(tasks)))
    assert (
        _read_all([str(corpus["alpha"])], small)[0].keys()
        == _read_all([str(corpus["alpha"])])[0].keys()
    )


def test_archives_git_and_records_read_like_the_directory(corpus, tmp_path) -> None:
    src = corpus["beta"]
    want = {d.path: d.text for d in _read_all([str(src)])[0].values()}
    with tarfile.open(tmp_path / "beta.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="beta-main")  # GitHub-style top folder, stripped
    shutil.make_archive(str(tmp_path / "zipped"), "zip", src)
    rows = [{"repo": "beta", "path": p, "content": t} for p, t in sorted(want.items())]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for spec in (
        tmp_path / "beta.tar.gz",
        tmp_path / "zipped.zip",
        tmp_path / "rows.jsonl",
        tmp_path / "rows.parquet",
    ):
        docs = _read_all([str(spec)])[0]
        assert {d.path: d.text for d in docs.values()} == want, spec
    if shutil.which("git"):
        repo = tmp_path / "gitrepo"
        shutil.copytree(src, repo)
        (repo / "untracked.py").write_text("x = 1\n")
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        tracked = [p for p in want] + ["latin1.py"]
        subprocess.run(["git", "-C", str(repo), "add", *tracked], check=True)
        docs = _read_all([f"renamed={repo}"])[0]
        assert {d.path: d.text for d in docs.values()} == want
        assert all(d.repo == "renamed" for d in docs.values())


def test_bad_sources_raise_clear_errors(corpus, tmp_path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        plan_sources([str(tmp_path / "nope")])
    with pytest.raises(SourceError, match="NAME=PATH"):
        plan_sources([str(corpus["alpha"]), f"{tmp_path}/corpus/../corpus/alpha"])
    (tmp_path / "bad.jsonl").write_text('{"repo": "r", "path": "a.py"}\n')
    with pytest.raises(SourceError, match="content"):
        _read_all([str(tmp_path / "bad.jsonl")])
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("a.py", "x = 1\n")
    assert list(_read_all([str(tmp_path / "z.zip")])[0]) == ["z/a.py"]
    with pytest.raises(SourceError, match="unknown language"):
        SourceConfig(languages=("cobol",))


# -- entries that cannot be read: skipped, named in a warning, counted; never an abort ----------
NOBODY = 65534


def _read_unprivileged(specs) -> tuple[list[str], dict, list[str]]:
    """`_read_all(specs)` with warnings, as a user without root's read-anything privilege:
    root reads a chmod 000 file, so as root a forked child drops to uid/gid `nobody` first.
    Returns (document ids, stats, warnings)."""

    def run() -> tuple[list[str], dict, list[str]]:
        stats: Counter = Counter()
        warnings: list[str] = []
        ids = [d.id for t in plan_sources(specs) for d in read_task(t, stats, warn=warnings.append)]
        return ids, dict(stats), warnings

    if os.geteuid() != 0:
        return run()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, read, report as JSON, exit without cleanup
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                payload = {"result": run()}
            except BaseException as e:
                payload = {"error": f"{type(e).__name__}: {e}"}
            with os.fdopen(wfd, "w") as f:
                json.dump(payload, f)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        text = f.read()
    os.waitpid(pid, 0)
    payload = json.loads(text)
    assert "error" not in payload, payload["error"]
    ids, stats, warnings = payload["result"]
    return ids, stats, warnings


@pytest.fixture
def shared_dir():
    """A directory uid `nobody` can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="codegemma-src-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)  # so the tree can be removed
    shutil.rmtree(path)


def test_bad_entries_are_skipped_named_and_counted(shared_dir) -> None:
    repo = shared_dir / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "good.py").write_text("x = 1\n")
    (repo / "pkg" / "mod.py").write_text("y = 2\n")
    with open(os.fsencode(repo) + b"/name\xff\xfe.py", "wb") as f:  # not UTF-8: a bad name
        f.write(b"z = 3\n")
    locked = repo / "locked.py"
    locked.write_text("secret = 1\n")
    locked.chmod(0o000)
    (repo / "closed" / "inner").mkdir(parents=True)
    (repo / "closed" / "inner" / "hidden.py").write_text("h = 1\n")
    (repo / "closed").chmod(0o000)
    (repo / "link.py").symlink_to(repo / "good.py")
    (repo / "linkdir").symlink_to(repo / "pkg")
    (repo / "README.md").symlink_to(repo / "good.py")  # not code anyway: no warning
    os.mkfifo(repo / "pipe.py")  # opening a FIFO for reading would block the run
    for p in (repo, repo / "pkg"):
        p.chmod(0o755)

    ids, stats, warnings = _read_unprivileged([str(repo)])

    assert sorted(ids) == ["repo/good.py", "repo/pkg/mod.py"]
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped.")}
    assert skipped == {
        "skipped.bad_name": 1,
        "skipped.unreadable": 1,
        "skipped.unreadable_dir": 1,
        "skipped.symlink": 2,
        "skipped.special": 1,
        "skipped.language": 1,
    }
    assert stats["files"] == stats["read"] + sum(skipped.values())
    text = "\n".join(warnings)
    assert len(warnings) == 6, text
    assert f"skipped {repo}/name\\xff\\xfe.py: its name is not valid UTF-8" in text
    assert f"skipped {repo}/locked.py: cannot be read (Permission denied)" in text
    assert f"skipped {repo}/closed: the directory cannot be listed (Permission denied)" in text
    assert f"skipped {repo}/link.py: a symbolic link, not followed" in text
    assert f"skipped {repo}/linkdir: a symbolic link" in text
    assert f"skipped {repo}/pipe.py: not a regular file" in text


def test_warnings_are_logged_by_default(tmp_path, caplog) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    with open(os.fsencode(repo) + b"/bad\xff.py", "wb") as f:
        f.write(b"x = 1\n")
    with caplog.at_level("WARNING", logger="codegemma.data.sources"):
        docs, stats = _read_all([str(repo)])
    assert not docs and stats["skipped.bad_name"] == 1
    assert f"skipped {repo}/bad\\xff.py" in caplog.text


def test_bad_records_and_archive_members_are_skipped(tmp_path) -> None:
    lines = [
        json.dumps({"repo": "r", "path": "ok.py", "content": "a = 1\n"}).encode(),
        b'{"repo": "r", "path": "bad\\ud800.py", "content": "b = 2\\n"}',  # lone surrogate
        b'{"repo": "r", "path": "c.py", "content": "c = \'\\ud800\'\\n"}',
        b'{"repo": "r", "path": "d.py", "content": "d = \xff\\n"}',  # not UTF-8 bytes
        json.dumps({"repo": "r", "path": "e.py", "content": "e = 5\n"}).encode(),
    ]
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("a.py", "a = 1\n" * 20)
        zf.writestr("b.py", "b = 2\n" * 20)
        link = zipfile.ZipInfo("l.py")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "a.py")
    data = bytearray((tmp_path / "z.zip").read_bytes())
    data[data.index(b"b = 2")] ^= 1  # b.py's bytes no longer match its CRC
    (tmp_path / "z.zip").write_bytes(bytes(data))
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        for name, payload in (("t/ok.py", b"t = 1\n"), ("t/bad\udcff.py", b"u = 1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("t/l.py")
        link.type, link.linkname = tarfile.SYMTYPE, "ok.py"
        tf.addfile(link)
    warnings: list[str] = []
    stats: Counter = Counter()
    ids = []
    for spec in ("rows.jsonl", "z.zip", "t.tar"):
        for task in plan_sources([str(tmp_path / spec)]):
            ids += [d.id for d in read_task(task, stats, warn=warnings.append)]
    assert ids == ["r/ok.py", "r/e.py", "z/a.py", "t/ok.py"]
    assert stats["skipped.bad_name"] == 2 and stats["skipped.undecodable"] == 2
    assert stats["skipped.unreadable"] == 1 and stats["skipped.symlink"] == 2
    assert stats["files"] == stats["read"] + sum(
        v for k, v in stats.items() if k.startswith("skipped.")
    )
    text = "\n".join(warnings)
    assert f"{tmp_path}/rows.jsonl:2: its name is not valid UTF-8 (r/bad\\ud800.py)" in text
    assert f"{tmp_path}/rows.jsonl:4: the record is not valid UTF-8" in text
    assert f"{tmp_path}/z.zip:b.py: cannot be read (Bad CRC-32" in text
    assert f"{tmp_path}/t.tar:t/bad\\xff.py: its name is not valid UTF-8" in text


def test_damaged_archives_and_unnamable_sources_raise_source_errors(tmp_path) -> None:
    (tmp_path / "cut.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 20)
    with pytest.raises(SourceError, match="cut.tar.gz is not a readable tar archive"):
        _read_all([str(tmp_path / "cut.tar.gz")])
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="junk.zip is not a readable zip archive"):
        plan_sources([str(tmp_path / "junk.zip")])
    bad = os.fsencode(tmp_path) + b"/repo\xff"
    os.mkdir(bad)
    with pytest.raises(SourceError, match="not valid UTF-8") as e:
        plan_sources([os.fsdecode(bad)])
    assert "NAME=PATH" in e.value.fix
    assert plan_sources([f"named={os.fsdecode(bad)}"])[0].repo == "named"
