"""Data for training: deterministic order, rank slices, shifted targets, SFT loss masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from train_helpers import CHATS, SEQ_LEN

from codegemma.prompts import chat_example, fold_system
from codegemma.train.data import (
    IGNORE,
    ArraySource,
    Loader,
    ShardSource,
    collate,
    eval_batches,
    split_holdout,
)
from codegemma.train.sft import SFTDataError, load_chat_jsonl, sft_rows


def numbered(n: int, seq_len: int = 4) -> ArraySource:
    """Row i is [i, i, i, ...]: a row's id is readable from its tokens."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    return ArraySource(ids, np.ones_like(ids, dtype=bool))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    batch=st.integers(1, 4),
    accum=st.integers(1, 3),
    world=st.integers(1, 4),
    steps=st.integers(1, 6),
    seed=st.integers(0, 3),
)
def test_ranks_and_micro_steps_tile_the_global_batch(n, batch, accum, world, steps, seed):
    """All ranks x micro-steps of a step read exactly the samples one process with
    grad_accum * world micro-steps reads, and every epoch visits every row once."""
    src = numbered(n)
    single = Loader(src, seed=seed, micro_batch_size=batch)
    ranks = [
        Loader(src, seed=seed, micro_batch_size=batch, world_size=world, rank=r)
        for r in range(world)
    ]
    seen: list[int] = []
    for step in range(steps):
        base = step * ranks[0].global_batch(accum)
        dist = [
            ranks[r].micro_batch(base, m).inputs[:, 0].tolist()
            for m in range(accum)
            for r in range(world)
        ]
        one = [single.micro_batch(base, m).inputs[:, 0].tolist() for m in range(accum * world)]
        assert dist == one
        seen += [x for rows in one for x in rows]
    for e in range(len(seen) // n):
        assert sorted(seen[e * n : (e + 1) * n]) == list(range(n))


def test_order_depends_on_seed_and_epoch_only():
    src = numbered(50)
    a = [Loader(src, seed=1, micro_batch_size=5).sample_index(k) for k in range(100)]
    b = [Loader(src, seed=1, micro_batch_size=5).sample_index(k) for k in range(100)]
    c = [Loader(src, seed=2, micro_batch_size=5).sample_index(k) for k in range(100)]
    assert a == b and a != c
    assert a[:50] != a[50:]  # a new permutation each epoch
    # jumping straight to a position (a resumed run) reads the same samples
    fresh = Loader(src, seed=1, micro_batch_size=5)
    assert [fresh.sample_index(k) for k in range(75, 100)] == a[75:]


def test_collate_shifts_targets_and_masks():
    ids = np.array([[2, 10, 11, 12], [2, 20, 21, 0]], dtype=np.int32)
    mask = np.array([[False, True, True, True], [False, False, True, False]])
    b = collate([(ids[0], None), (ids[1], mask[1])])
    assert b.inputs.tolist() == [[2, 10, 11], [2, 20, 21]]
    assert b.targets.tolist() == [[10, 11, 12], [IGNORE, 21, IGNORE]]
    assert b.loss_tokens == 4


def test_eval_batches_are_fixed_and_pad_with_masked_rows():
    src = numbered(5)
    per_rank = [
        eval_batches(src, micro_batch_size=2, max_batches=10, world_size=2, rank=r)
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # same count on every rank
    rows = [
        (row[0], int((t != IGNORE).sum()))
        for batches in per_rank
        for b in batches
        for row, t in zip(b.inputs.tolist(), b.targets, strict=True)
    ]
    real = sorted(r for r, n in rows if n)
    assert real == [0, 1, 2, 3, 4]
    assert sum(1 for _, n in rows if n == 0) == 3  # padding rows carry no loss


def test_holdout_is_disjoint_from_training():
    train, held = split_holdout(numbered(10), 3)
    assert [train.row(i)[0][0] for i in range(len(train))] == list(range(7))
    assert [held.row(i)[0][0] for i in range(len(held))] == [7, 8, 9]
    with pytest.raises(ValueError, match="eval_holdout=10 leaves no training data"):
        split_holdout(numbered(10), 10)


def test_shard_source_checks_the_tokenizer(shard_dir, tiny_tokenizer):
    src = ShardSource(shard_dir, expect_tokenizer=tiny_tokenizer.fingerprint)
    assert src.seq_len == SEQ_LEN and len(src) > 60
    ids, mask = src.row(len(src) - 1)
    assert ids.shape == (SEQ_LEN,) and mask is None
    with pytest.raises(ValueError, match="prepare the data again with this tokenizer"):
        ShardSource(shard_dir, expect_tokenizer="0" * 64)


# -- SFT ------------------------------------------------------------------------------------
def test_sft_rows_learn_only_model_replies(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = sft_rows(tok, CHATS, seq_len=128)
    assert rows.stats.rows == len(CHATS) and rows.stats.truncated == rows.stats.dropped == 0
    for messages, ids, learn in zip(CHATS, rows.ids, rows.loss_mask, strict=True):
        want_ids, want_mask = chat_example(tok, fold_system(messages))
        n = len(want_ids)
        assert ids[:n].tolist() == want_ids and learn[:n].tolist() == want_mask
        assert (ids[n:] == tok.special.pad).all() and not learn[n:].any()  # padding never learned
        learned = tok.decode(ids[learn].tolist())
        replies = [m["content"] for m in messages if m["role"] in ("model", "assistant")]
        assert learned == "".join(r + "<end_of_turn>" for r in replies)


def test_sft_truncates_and_drops(tiny_tokenizer):
    long_reply = [{"role": "user", "content": "x"}, {"role": "model", "content": "y " * 200}]
    long_prompt = [{"role": "user", "content": "x " * 200}, {"role": "model", "content": "y"}]
    rows = sft_rows(tiny_tokenizer, [long_reply, long_prompt], seq_len=32)
    assert (rows.stats.rows, rows.stats.truncated, rows.stats.dropped) == (1, 1, 1)
    assert rows.ids.shape == (1, 32) and rows.loss_mask[0, -1]
    with pytest.raises(SFTDataError, match="raise seq_len"):
        sft_rows(tiny_tokenizer, [long_prompt], seq_len=32)


def test_chat_jsonl_errors_name_the_line(tmp_path, tiny_tokenizer):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": CHATS[0]}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(SFTDataError, match=r"c.jsonl:2: not valid JSON"):
        load_chat_jsonl(p)
    p.write_text(json.dumps({"text": "hi"}) + "\n", encoding="utf-8")
    with pytest.raises(SFTDataError, match=r":1: .*\"messages\" list"):
        load_chat_jsonl(p)
    bad_roles = [{"role": "model", "content": "hi"}]
    with pytest.raises(SFTDataError, match="conversation 0: .*alternate"):
        sft_rows(tiny_tokenizer, [bad_roles], seq_len=32)
