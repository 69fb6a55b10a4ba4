"""Session fixtures of the trainer tests (helpers live in train_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import SEQ_LEN, TEXTS, reference_config, write_chats, write_shards

from codegemma.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    texts = [t for _ in range(8) for t in TEXTS]  # ~110 rows of 33 tokens, in 3 shards
    return write_shards(
        tmp_path_factory.mktemp("shards"), tiny_tokenizer, texts, seq_len=SEQ_LEN, per_shard=40
    )


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chats(tmp_path_factory.mktemp("sft") / "chat.jsonl")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, shard_dir: Path, tiny_tokenizer_dir: Path):
    """(run_dir, TrainResult) of an uninterrupted single-process reference run."""
    from codegemma.train.trainer import train

    run = tmp_path_factory.mktemp("ref") / "run"
    return run, train(reference_config(run, shard_dir, tiny_tokenizer_dir))
