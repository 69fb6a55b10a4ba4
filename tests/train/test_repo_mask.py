"""Repository masking of packed rows: a `<bos>` starts a new repository sample, which attends
to itself only and counts its positions from 0.

The defining property: the loss (and gradient) of a row holding several repository samples is
the sum of the losses of the samples run on their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_helpers import TEXTS, curve, tiny_config, write_shards

from codegemma.config import ModelConfig
from codegemma.model import GemmaForCausalLM, segment_mask
from codegemma.train.data import IGNORE, collate
from codegemma.train.trainer import forward, loss_sum, train

BOS, EOS = 2, 1


def dense_reference_mask(inputs: list[int]) -> torch.Tensor:
    """allowed[i, j]: key j is at or before query i and no <bos> lies in (j, i]."""
    T = len(inputs)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            allowed[i, j] = BOS not in inputs[j + 1 : i + 1]
    return allowed


def reference_positions(inputs: list[int]) -> list[int]:
    out, p = [], 0
    for t in inputs:
        p = 0 if t == BOS else p
        out.append(p)
        p += 1
    return out


rows_with_bos = st.lists(
    st.lists(st.integers(3, 40) | st.just(BOS), min_size=3, max_size=40), min_size=1, max_size=4
).map(lambda rows: [r + [5] * (max(map(len, rows)) - len(r)) for r in rows])


@settings(max_examples=60, deadline=None)
@given(rows=rows_with_bos)
def test_mask_blocks_exactly_the_cross_repository_pairs(rows):
    batch = collate([(np.array(r), None) for r in rows], bos_id=BOS)
    inputs = batch.inputs.tolist()
    if all(BOS not in r[1:] for r in inputs):  # one segment per row: the plain causal path
        assert batch.segment_ids is None and batch.positions is None
        return
    mask = segment_mask(batch.segment_ids)
    for b, row in enumerate(inputs):
        assert torch.equal(mask[b, 0], dense_reference_mask(row))
        assert batch.positions[b].tolist() == reference_positions(row)


@settings(max_examples=60, deadline=None)
@given(rows=rows_with_bos)
def test_bos_targets_are_ignored_and_the_rest_kept(rows):
    plain = collate([(np.array(r), None) for r in rows])
    masked = collate([(np.array(r), None) for r in rows], bos_id=BOS)
    assert torch.equal(plain.inputs, masked.inputs)
    is_bos = plain.targets == BOS
    assert torch.equal(masked.targets, plain.targets.masked_fill(is_bos, IGNORE))
    assert masked.loss_tokens == plain.loss_tokens - int(is_bos.sum())


def tiny_model(kind_kv: int = 1, seed: int = 0) -> GemmaForCausalLM:
    config = ModelConfig.preset("tiny", num_key_value_heads=kind_kv, num_hidden_layers=2)
    return GemmaForCausalLM(config).init_weights(std=0.1, seed=seed)


def batch_loss(model: GemmaForCausalLM, rows: list[list[int]]) -> torch.Tensor:
    batch = collate([(np.array(r), None) for r in rows], bos_id=BOS)
    return loss_sum(forward(model, batch, torch.device("cpu")), batch.targets)


def segments_of(row: list[int]) -> list[list[int]]:
    """A row cut before each <bos> (the part before the first one continues a repository)."""
    cuts = [i for i, t in enumerate(row) if t == BOS and i > 0]
    return [row[a:b] for a, b in zip([0, *cuts], [*cuts, len(row)], strict=True)]


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # MQA, GQA, MHA
def test_two_repositories_in_a_row_cost_what_they_cost_apart(kv_heads):
    a = [BOS, 10, 11, 12, 13, 14, EOS]
    b = [BOS, 20, 21, 22, 10, 11, 12, 23, EOS]
    model = tiny_model(kv_heads)
    joint = batch_loss(model, [a + b])
    joint.backward()
    joint_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apart = batch_loss(model, [a]) + batch_loss(model, [b])
    apart.backward()
    assert float(joint.detach()) == pytest.approx(float(apart.detach()), rel=1e-5)
    for name, p in model.named_parameters():  # gradients flow, and only within a repository
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(joint_grads[name], p.grad, rtol=1e-4, atol=1e-6)
    # plain causal attention over the row (the same targets) lets b see a: another loss
    plain = collate([(np.array(a + b), None)])
    targets = plain.targets.masked_fill(plain.targets == BOS, IGNORE)
    assert (
        abs(float(loss_sum(model(plain.inputs), targets).detach()) - float(apart.detach())) > 1e-3
    )


@settings(max_examples=15, deadline=None)
@given(
    row=st.lists(st.integers(3, 60) | st.just(BOS), min_size=4, max_size=48),
    seed=st.integers(0, 3),
)
def test_any_packed_row_costs_the_sum_of_its_segments(row, seed):
    model = tiny_model(1, seed)
    with torch.no_grad():
        joint = batch_loss(model, [row])
        apart = sum(batch_loss(model, [s]) for s in segments_of(row) if len(s) > 1)
    assert float(joint) == pytest.approx(float(apart), rel=1e-5, abs=1e-4)


def test_a_single_repository_batch_is_bit_identical_to_the_plain_path():
    rows = [[BOS, *range(10, 40)], [*range(40, 70), 71]]  # a start, and a continued repository
    model = tiny_model(2)
    masked = collate([(np.array(r), None) for r in rows], bos_id=BOS)
    plain = collate([(np.array(r), None) for r in rows])
    assert masked.segment_ids is None
    a = loss_sum(forward(model, masked, torch.device("cpu")), masked.targets)
    b = loss_sum(model(plain.inputs), plain.targets)
    assert torch.equal(a, b)


def test_segment_ids_with_a_kv_cache_are_refused():
    model = tiny_model()
    ids = torch.tensor([[BOS, 5, 6]])
    with pytest.raises(ValueError, match="without a KV cache"):
        model(ids, cache=model.new_cache(1, 8), segment_ids=torch.zeros_like(ids))


def test_single_repository_training_is_bit_identical_with_and_without(
    tmp_path, tiny_tokenizer, tiny_tokenizer_dir
):
    """One repository sample over all rows (one <bos>): repo_mask changes no number."""
    one_repo = ["".join(TEXTS) * 6]
    data = write_shards(tmp_path / "data", tiny_tokenizer, one_repo, seq_len=33, per_shard=40)
    on = tiny_config(tmp_path / "on", data, tiny_tokenizer_dir, max_steps=4, ckpt_every=4)
    off = on.replace(run_dir=str(tmp_path / "off"), repo_mask=False)
    train(on), train(off)
    assert curve(tmp_path / "on") == curve(tmp_path / "off")


def test_packed_repositories_train_differently_with_the_mask(
    tmp_path, shard_dir, tiny_tokenizer_dir
):
    """The session's shards pack several short repositories per row: the flag matters there."""
    on = tiny_config(tmp_path / "on", shard_dir, tiny_tokenizer_dir, max_steps=2, ckpt_every=2)
    off = on.replace(run_dir=str(tmp_path / "off"), repo_mask=False)
    train(on), train(off)
    assert [r[1] for r in curve(tmp_path / "on")] != [r[1] for r in curve(tmp_path / "off")]
