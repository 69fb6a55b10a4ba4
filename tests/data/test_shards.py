"""Shard writer and reader: exact round trip, dtype by vocabulary, atomicity, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegemma.data.shards import (
    FORMAT,
    VERSION,
    ShardError,
    ShardWriter,
    open_shards,
    token_dtype,
)
from codegemma.fileio import file_mode


def _write_dir(tmp_path, chunks, seq_len, vocab=512):
    w = ShardWriter(tmp_path / "shard-00000.bin", seq_len, token_dtype(vocab), buffer_rows=2)
    for c in chunks:
        w.add(c)
    info = w.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": seq_len,
        "dtype": token_dtype(vocab).name,
        "num_sequences": info.sequences,
        "num_tokens": info.sequences * seq_len,
        "tokenizer": {"fingerprint": "abc123", "vocab_size": vocab},
        "shards": [info.to_dict()],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return info


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 511), max_size=50), max_size=12), st.integers(1, 17))
def test_round_trip(tmp_path_factory, chunks, seq_len) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    info = _write_dir(tmp, chunks, seq_len)
    flat = [t for c in chunks for t in c]
    n = len(flat) // seq_len
    assert info.sequences == n and info.tokens_dropped == len(flat) - n * seq_len
    ds = open_shards(tmp, verify=True)
    assert len(ds) == n
    got = np.array([list(s) for s in ds]).reshape(-1) if n else np.zeros(0)
    assert got.tolist() == flat[: n * seq_len]
    if n:
        assert ds[-1].tolist() == flat[(n - 1) * seq_len : n * seq_len]


def test_dtype_by_vocab() -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(256000) == np.uint32


def test_out_of_range_token_is_refused_and_nothing_is_left(tmp_path) -> None:
    w = ShardWriter(tmp_path / "s.bin", 4, np.uint16)
    with pytest.raises(ShardError, match="out of range"):
        w.add([1, 2, 70000])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_reader_validates(tmp_path) -> None:
    _write_dir(tmp_path, [list(range(40))], 8)
    with pytest.raises(ShardError, match="tokenizer abc123, not ffffffff"):
        open_shards(tmp_path, expect_tokenizer="ffffffff")
    with pytest.raises(ShardError, match="seq_len 8"):
        open_shards(tmp_path, expect_seq_len=16)
    data = bytearray((tmp_path / "shard-00000.bin").read_bytes())
    data[0] ^= 1
    (tmp_path / "shard-00000.bin").write_bytes(bytes(data))
    open_shards(tmp_path)  # sizes still match
    with pytest.raises(ShardError, match="checksum"):
        open_shards(tmp_path, verify=True)
    (tmp_path / "shard-00000.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match="wrong size"):
        open_shards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ShardError, match="manifest"):
        open_shards(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")  # valid JSON, not an object
    with pytest.raises(ShardError, match="is not a codegemma-token-shards manifest"):
        open_shards(tmp_path)


def test_a_shard_gets_the_mode_of_a_plain_file(tmp_path) -> None:
    w = ShardWriter(tmp_path / "shard-00000.bin", 4, np.uint16)
    w.add(list(range(8)))
    w.close()
    assert (tmp_path / "shard-00000.bin").stat().st_mode & 0o777 == file_mode()
