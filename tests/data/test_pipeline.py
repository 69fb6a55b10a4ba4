"""End to end: fixture repositories -> shards; determinism, worker-count independence, resume
after a crash, the manifest's statistics, the reader, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from codegemma.data import pipeline
from codegemma.data.pipeline import PrepareConfig, prepare
from codegemma.data.shards import ShardError, open_shards
from codegemma.data.sources import SourceConfig

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
    fim = st["fim"]
    assert (
        fim["psm"] + fim["spm"] + fim["plain"] == fim["files"] == sum(st["language_files"].values())
    )
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
    prepare(_sources(corpus), out, _config(tiny_tokenizer_dir), workers=1)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished shards were skipped
    assert _shard_bytes(out) == _shard_bytes(reference)


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
