"""The Ray Data engine produces byte-identical shards to the local engine (local Ray, 2 CPUs).

About 15 s, most of it starting Ray; skipped when Ray (the dist extra) is not installed."""

from __future__ import annotations

import pytest

from codegemma.data.pipeline import PrepareConfig, prepare
from codegemma.data.sources import SourceConfig

ray = pytest.importorskip("ray")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside Ray Data
def test_ray_engine_matches_local_engine(corpus, tiny_tokenizer_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CODEGEMMA_QUIET", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = PrepareConfig(
        tokenizer=str(tiny_tokenizer_dir),
        seq_len=64,
        num_shards=3,
        sources=SourceConfig(chunk_bytes=1500),
    )
    sources = [str(p) for p in corpus.values()]
    local = prepare(sources, tmp_path / "local", config, engine="local", workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        distributed = prepare(sources, tmp_path / "ray", config, engine="ray", workers=2)
    finally:
        ray.shutdown()
    assert distributed["provenance"]["engine"] == "ray"
    for m in (local, distributed):
        m.pop("provenance")
    assert distributed == local
    assert local["num_sequences"] > 0
    for shard in local["shards"]:
        name = shard["file"]
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
