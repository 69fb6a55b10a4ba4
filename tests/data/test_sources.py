"""Sources and language detection: every source kind reads the same documents; skips counted."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import zipfile
from collections import Counter

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
