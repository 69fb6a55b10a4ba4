"""End to end: fixture repositories -> shards; determinism, worker-count independence, resume
after a crash, the manifest's statistics, the reader, and the CLI."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from codegemma.data import pipeline
from codegemma.data.fim import FimConfig, restore_row
from codegemma.data.pipeline import PrepareConfig, prepare
from codegemma.data.shards import ShardError, open_shards
from codegemma.data.sources import SourceConfig
from codegemma.fileio import file_mode

SEQ_LEN = 64


def _config(tok_dir: Path, **kw) -> PrepareConfig:
    # small read chunks so one repository spreads over several read tasks
    kw.setdefault("sources", SourceConfig(chunk_bytes=1500))
    return PrepareConfig(tokenizer=str(tok_dir), seq_len=SEQ_LEN, num_shards=3, **kw)


def _sources(corpus: dict[str, Path]) -> list[str]:
    return [str(p) for p in corpus.values()]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.bin"))}


def _stable(manifest: dict) -> dict:
    m = dict(manifest)
    m.pop("provenance")
    return m


@pytest.fixture
def prepared(corpus, tiny_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEGEMMA_QUIET", "1")
    out = tmp_path / "out"
    manifest = prepare(_sources(corpus), out, _config(tiny_tokenizer_dir), workers=1)
    return out, manifest


def test_manifest_counts_every_stage(prepared, tiny_tokenizer) -> None:
    out, m = prepared
    st = m["stats"]
    assert st["sources"]["skipped.language"] == 2  # README.md, logo.png
    assert st["sources"]["skipped.binary"] == 1 and st["sources"]["skipped.undecodable"] == 1
    assert st["filters"]["dropped.minified"] == 1
    assert st["filters"]["dropped.auto_generated"] == 1
    assert st["dedup"]["dropped.exact"] == 1 and st["dedup"]["dropped.near"] == 1
    assert m["dedup_clusters"] == [["alpha/shop/inventory.py", "beta/inv/inventory.py"]]
    assert st["decontaminate"]["dropped.humaneval"] == 1
    assert st["pii"]["email"] == 1 and st["pii"]["ipv4"] == 1 and st["pii"]["secret"] >= 2
    assert set(st["language_files"]) == {
        "python",
        "javascript",
        "typescript",
        "java",
        "kotlin",
        "go",
        "rust",
        "c",
        "cpp",
        "csharp",
    }
    fim = st["fim"]  # context level (the default): FIM per row
    assert m["fim_level"] == m["config"]["fim"]["fim_level"] == "context"
    assert fim["files"] == sum(st["language_files"].values())
    assert fim["psm"] + fim["spm"] + fim["plain"] == fim["rows"] == m["num_sequences"]
    rows = st["rows"]  # counted from the bytes written: every FIM'd row holds one whole example
    assert rows["rows"] == m["num_sequences"]
    assert rows["fim"] == rows["fim_examples"] == fim["psm"] + fim["spm"] > 0
    assert "fim_broken" not in rows
    assert st["packing"]["repos"] == 3
    assert m["num_sequences"] == sum(s["sequences"] for s in m["shards"]) > 0
    assert m["num_tokens"] == m["num_sequences"] * SEQ_LEN
    assert m["tokenizer"]["fingerprint"] == tiny_tokenizer.fingerprint and m["dtype"] == "uint16"
    assert st["tokens"]["written"] + st["tokens"]["dropped_tail"] == st["tokens"]["samples"]
    assert "salt" not in m["config"]["pii"]


def test_shards_hold_the_repositories(prepared, tiny_tokenizer) -> None:
    out, m = prepared
    ds = open_shards(out, expect_tokenizer=tiny_tokenizer.fingerprint, verify=True)
    assert len(ds) == m["num_sequences"] and ds[0].shape == (SEQ_LEN,)
    stream = np.concatenate(list(ds))
    sp = tiny_tokenizer.special
    assert (stream == sp.bos).sum() <= 3 and (stream == sp.eos).sum() <= 3
    text = tiny_tokenizer.decode(stream.tolist())
    assert "maria.rossi" not in text and "Xk9#pL2vQ8mZ3wR7" not in text  # PII redacted
    assert "has_close_elements" not in text  # decontaminated
    assert "10.0.0.12" in text  # private IPs are kept
    assert "fmt.Println" in text
    assert (stream == sp.fim_middle).sum() > 0 and (stream == sp.file_separator).sum() > 0


def test_same_output_for_any_worker_count_and_rerun(
    prepared, corpus, tiny_tokenizer_dir, tmp_path
) -> None:
    out, m1 = prepared
    out2 = tmp_path / "out2"
    m2 = prepare(_sources(corpus), out2, _config(tiny_tokenizer_dir), workers=2)
    assert _shard_bytes(out) == _shard_bytes(out2)
    assert _stable(m1) == _stable(m2)
    # a finished directory is recognised, not recomputed
    before = {p: p.stat().st_mtime_ns for p in out.glob("shard-*.bin")}
    assert _stable(prepare(_sources(corpus), out, _config(tiny_tokenizer_dir))) == _stable(m1)
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("shard-*.bin")}


def test_resume_after_crash_gives_identical_output(
    prepared, corpus, tiny_tokenizer_dir, tmp_path, monkeypatch
) -> None:
    reference, _ = prepared
    out = tmp_path / "crashed"
    real = pipeline.run_shard

    def crash_on_last(job, bucket):
        if bucket == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(job, bucket)

    monkeypatch.setattr(pipeline, "run_shard", crash_on_last)
    with pytest.raises(KeyboardInterrupt):
        prepare(_sources(corpus), out, _config(tiny_tokenizer_dir), workers=1)
    assert not (out / "manifest.json").exists() and not (out / "shard-00002.bin").exists()
    assert not list(out.glob(".shard-*.tmp"))  # no half-written shard left behind
    done = {p: p.stat().st_mtime_ns for p in out.glob("shard-*.bin")}
    assert len(done) == 2
    with pytest.raises(ShardError, match="preparation did not finish"):
        open_shards(out)
    monkeypatch.setattr(pipeline, "run_shard", real)
    stale = _plant_stale_temporaries(out)
    resumed = prepare(_sources(corpus), out, _config(tiny_tokenizer_dir), workers=1)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished shards were skipped
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert not [p for p in stale if p.exists()]
    # identical, as docs/data.md says: the shards and the manifest but for its timing field
    assert _untimed(resumed) == _untimed(json.loads((reference / "manifest.json").read_text()))
    assert _untimed(json.loads((out / "manifest.json").read_text())) == _untimed(resumed)


def _plant_stale_temporaries(out: Path) -> list[Path]:
    """The 0-byte temporaries a `kill -9` leaves: shards being written, the manifest, `.work`."""
    stale = [
        out / ".shard-00002.bin.k1ll3d.tmp",
        out / ".shard-00000.bin.0ld0ne.tmp",
        out / ".manifest.json.x7f2a9.tmp",
        out / ".work" / ".dedup.json.q9w8e7.tmp",
        out / ".work" / ".read-00000.sig.npz.a1b2c3.tmp",
    ]
    for p in stale:
        p.write_bytes(b"")
    return stale


def _untimed(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    del m["provenance"]["seconds"]
    return m


def test_every_file_gets_one_mode(prepared) -> None:
    out, _ = prepared
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.relative_to(out).as_posix() for p in files} >= {
        "manifest.json",
        "shard-00000.bin",
        ".work/plan.json",
        ".work/dedup.json",
        ".work/read-00000.sig.npz",
        ".work/read-00000.done.json",
        ".work/shard-00000.done.json",
    }
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(file_mode())}, modes


def test_bad_entries_are_skipped_and_counted_not_fatal(
    corpus, tiny_tokenizer_dir, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("CODEGEMMA_QUIET", "1")
    alpha = corpus["alpha"]
    with open(os.fsencode(alpha) + b"/name\xff\xfe.py", "wb") as f:  # the probe's file
        f.write(b"print('not UTF-8 in the name')\n")
    (alpha / "again.py").symlink_to(alpha / "README.md")
    os.mkfifo(alpha / "queue.py")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(
        json.dumps({"repo": "rows", "path": "ok.py", "content": "ok = 1\n"}).encode()
        + b'\n{"repo": "rows", "path": "x\\udcff.py", "content": "x = 1\\n"}\n'
    )
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="codegemma.data.pipeline"):
        m = prepare([*_sources(corpus), str(rows)], out, _config(tiny_tokenizer_dir), workers=2)
    sources = m["stats"]["sources"]
    assert sources["skipped.bad_name"] == 2
    assert sources["skipped.symlink"] == 1 and sources["skipped.special"] == 1
    assert f"skipped {alpha}/name\\xff\\xfe.py: its name is not valid UTF-8" in caplog.text
    assert f"skipped {rows}:2: its name is not valid UTF-8 (rows/x\\xff.py)" in caplog.text
    assert f"skipped {alpha}/queue.py: not a regular file" in caplog.text
    assert open_shards(out, verify=True).manifest == m
    # the same warnings on a resumed run: they travel in the read jobs' results
    (out / "manifest.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="codegemma.data.pipeline"):
        assert (
            _untimed(prepare([*_sources(corpus), str(rows)], out, _config(tiny_tokenizer_dir)))[
                "stats"
            ]
            == _untimed(m)["stats"]
        )
    assert caplog.text.count("skipped ") == 4


KILLED_RUN = """
import os, pickle, sys, time
from pathlib import Path
from codegemma.data import pipeline

sources, config_file, out, beats = sys.argv[1].split(os.pathsep), *sys.argv[2:]


class StalledWriter(pipeline.ShardWriter):
    # a shard job that has created its temporary shard and keeps writing for a minute
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        beat = Path(beats, str(os.getpid()))
        for _ in range(1200):
            beat.write_text(str(time.time()))
            time.sleep(0.05)


pipeline.ShardWriter = StalledWriter
config = pickle.loads(Path(config_file).read_bytes())
pipeline.prepare(sources, out, config, workers=2)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped running


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_kill_9_of_prepare_kills_its_workers_and_a_rerun_repairs(
    prepared, corpus, tiny_tokenizer_dir, tmp_path
) -> None:
    reference, _ = prepared
    out, beats, config_file = tmp_path / "killed", tmp_path / "beats", tmp_path / "config.pkl"
    beats.mkdir()
    config_file.write_bytes(pickle.dumps(_config(tiny_tokenizer_dir)))
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "CODEGEMMA_QUIET": "1"}
    args = [os.pathsep.join(_sources(corpus)), str(config_file), str(out), str(beats)]
    parent = subprocess.Popen([sys.executable, str(script), *args], env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = [int(p.name) for p in beats.iterdir()]
        assert len(workers) == 2, f"the shard jobs did not start (exit {parent.poll()})"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived their killed parent"
        written = {p: p.stat().st_mtime_ns for p in [*beats.iterdir(), *out.rglob("*")]}
        time.sleep(0.5)
        assert written == {p: p.stat().st_mtime_ns for p in [*beats.iterdir(), *out.rglob("*")]}
    finally:
        for pid in workers:  # a failed run of this test must not leave them running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    stale = list(out.glob(".shard-*.tmp"))
    assert len(stale) == 2 and not (out / "manifest.json").exists()
    resumed = prepare(_sources(corpus), out, _config(tiny_tokenizer_dir), workers=1)
    assert not list(out.rglob("*.tmp"))
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert _untimed(resumed) == _untimed(json.loads((reference / "manifest.json").read_text()))


def test_document_level_fims_files(corpus, tiny_tokenizer_dir, tmp_path) -> None:
    config = _config(tiny_tokenizer_dir, fim=FimConfig(fim_level="document"))
    m = prepare(_sources(corpus), tmp_path / "doc", config, workers=1)
    st = m["stats"]
    assert m["fim_level"] == "document" and "document-level" in m["layout"]
    fim = st["fim"]
    assert fim["psm"] + fim["spm"] + fim["plain"] == fim["files"]
    assert fim["files"] == sum(st["language_files"].values()) and "rows" not in fim
    # FIM'd files longer than a row leave rows with sentinels but no whole example
    assert st["rows"]["rows"] == m["num_sequences"]
    assert st["rows"]["fim_examples"] < fim["psm"] + fim["spm"]


def test_context_rows_restore_to_the_plain_stream(
    prepared, corpus, tiny_tokenizer, tiny_tokenizer_dir, tmp_path
) -> None:
    """End to end: the context-FIM'd rows of each shard, their middles moved back, are the text
    of the same shard without FIM (nothing lost or repeated, only the tail differs)."""
    out, _ = prepared
    plain = _config(tiny_tokenizer_dir, fim=FimConfig(fim_level="document", rate=0.0))
    prepare(_sources(corpus), tmp_path / "plain", plain, workers=1)
    tok, compared, longest = tiny_tokenizer, 0, 0
    for name in _shard_bytes(out):
        fimmed = np.fromfile(out / name, dtype=np.uint16).reshape(-1, SEQ_LEN)
        restored = tok.decode([t for row in fimmed for t in restore_row(tok, row.tolist())])
        reference = tok.decode(np.fromfile(tmp_path / "plain" / name, dtype=np.uint16).tolist())
        if not (restored or reference):
            continue  # no repository hashed onto this shard
        common = min(len(restored), len(reference)) - 4  # a character cut at the very end
        assert restored[:common] == reference[:common]
        compared, longest = compared + common, longest + max(len(restored), len(reference))
    assert compared > 0.9 * longest  # the tails, shorter than a row each, differ


def test_other_config_in_same_out_is_refused(prepared, corpus, tiny_tokenizer_dir) -> None:
    out, _ = prepared
    with pytest.raises(ShardError, match="use a new --out"):
        prepare(_sources(corpus), out, _config(tiny_tokenizer_dir, seed=1))


def test_seed_changes_fim_but_not_content(prepared, corpus, tiny_tokenizer_dir, tmp_path) -> None:
    out, m1 = prepared
    m2 = prepare(_sources(corpus), tmp_path / "s1", _config(tiny_tokenizer_dir, seed=1))
    assert _shard_bytes(out) != _shard_bytes(tmp_path / "s1")
    for stage in ("sources", "filters", "dedup", "pii", "decontaminate", "language_files"):
        assert m1["stats"][stage] == m2["stats"][stage]


def test_cli_prepare_and_inspect(corpus, tiny_tokenizer_dir, tmp_path, capsys) -> None:
    from codegemma.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "data",
            "prepare",
            *_sources(corpus),
            "--out",
            str(out),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--seq-len",
            "48",
            "--shards",
            "2",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 48
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--n", "2", "--color", "never"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("--- sequence") == 2 and "[[bos]]" in shown
    for heading in (
        "files by language",
        "filters: dropped by reason",
        "PII redacted",
        "FIM layout",
        "near-duplicate clusters: 1",
        "keep alpha/shop/inventory.py",
    ):
        assert heading in shown
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
