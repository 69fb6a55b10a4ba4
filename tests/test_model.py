"""Numerical parity with transformers' GemmaForCausalLM, and KV-cache consistency.

Random small configs in MQA, GQA and MHA shapes; the same weights are copied across by name (the
names are identical by design), so any difference is a difference in the math.
"""

import pytest
import torch
import transformers

from codegemma.config import ModelConfig
from codegemma.model import GemmaForCausalLM

SHAPES = {  # (heads, kv heads)
    "MQA": (4, 1),
    "GQA": (4, 2),
    "MHA": (4, 4),
}


def small_config(kind: str, *, tie: bool = True, **kw) -> ModelConfig:
    heads, kv = SHAPES[kind]
    fields = dict(hidden_size=96, head_dim=24, intermediate_size=160, num_hidden_layers=3)
    return ModelConfig.preset("tiny").replace(
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tie,
        **{**fields, **kw},
    )


def pair(cfg: ModelConfig, dtype=torch.float32, seed=0):
    """Our model and transformers' with identical random weights."""
    ours = GemmaForCausalLM(cfg).init_weights(std=0.05, seed=seed)
    with torch.no_grad():  # random norm weights too, so (1 + w) is exercised
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    hf_cfg = transformers.GemmaConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    theirs = transformers.GemmaForCausalLM(hf_cfg)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected
    assert all(m == "lm_head.weight" for m in missing)  # tied: transformers ties after load
    theirs.tie_weights()
    return ours.to(dtype).eval(), theirs.to(dtype).eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("tie", [True, False])
def test_fp32_logits_match_transformers(kind, tie):
    ours, theirs = pair(small_config(kind, tie=tie))
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        got = ours(ids).float()
    want = hf_logits(theirs, ids)
    assert got.shape == (2, 37, ours.config.vocab_size)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_transformers_own_error(dtype):
    cfg = small_config("MQA", hidden_size=128, head_dim=32)
    ours32, theirs32 = pair(cfg)
    ours, theirs = pair(cfg, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(4))
    reference = hf_logits(theirs32, ids)
    their_error = (hf_logits(theirs, ids) - reference).abs().max().item()
    with torch.no_grad():
        our_error = (ours(ids).float() - reference).abs().max().item()
        assert ours(ids).dtype == dtype
        # half vs half: SDPA and eager round differently, but not by more than either's error
        assert (ours(ids).float() - hf_logits(theirs, ids)).abs().max().item() <= 2 * their_error
    assert our_error <= 1.5 * their_error + 1e-6, (our_error, their_error)


def test_bf16_embedding_scale_is_rounded_like_transformers():
    cfg = small_config("MHA", hidden_size=3072 // 32 * 32, head_dim=24)
    model = GemmaForCausalLM(cfg).to(torch.bfloat16)
    row = model.model.embed_tokens.weight[5:6].detach()
    got = model.embed(torch.tensor([5])).detach()
    assert torch.equal(got, row * torch.tensor(55.5, dtype=torch.bfloat16))
    assert not torch.equal(got, (row.float() * 3072**0.5).bfloat16())  # not the fp32 product


@pytest.mark.parametrize("kind", SHAPES)
def test_kv_cache_incremental_equals_full_forward(kind):
    ours, _ = pair(small_config(kind))
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(batch_size=2, max_seq_len=32)
        pos = torch.arange(12).expand(2, 12)
        parts = [ours(ids[:, :12], pos, cache)]
        for t in range(12, 20):
            parts.append(ours(ids[:, t : t + 1], torch.full((2, 1), t), cache))
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", SHAPES)
def test_segments_of_a_packed_row_equal_their_own_forwards(kind):
    """Training on packed rows: with segment ids and positions restarting per segment, each
    segment's logits are those of the segment alone (the model sees nothing across)."""
    ours, _ = pair(small_config(kind))
    gen = torch.Generator().manual_seed(7)
    lengths = [(7, 13, 4), (24,)]  # row 0 holds three segments, row 1 one
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=gen)
    seg = torch.tensor([[i for i, n in enumerate(ls) for _ in range(n)] for ls in lengths])
    pos = torch.cat([torch.arange(n) for n in lengths[0]]).expand(2, 24).clone()
    pos[1] = torch.arange(24)
    with torch.no_grad():
        packed = ours(ids, pos, segment_ids=seg)
        starts = [0, 7, 20, 24]
        for a, b in zip(starts, starts[1:], strict=False):
            alone = ours(ids[:1, a:b])
            assert (packed[:1, a:b] - alone).abs().max().item() < 1e-4
        assert (packed[1] - ours(ids[1:])[0]).abs().max().item() < 1e-4


def test_a_tree_mask_gives_each_branch_its_own_sequences_logits():
    """attention_mask (token trees, eval/lm_harness.py): a shared prefix, then two branches laid
    side by side, each at the positions after the prefix and attending to the prefix and to its
    own earlier tokens: each branch's logits are those of prefix + branch alone."""
    ours, _ = pair(small_config("MQA"))
    ids = torch.randint(
        0, ours.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(8)
    )
    prefix, left, right = 6, range(6, 10), range(10, 14)  # the row: prefix | left | right
    pos = torch.cat([torch.arange(10), torch.arange(6, 10)])[None]
    mask = torch.zeros(14, 14, dtype=torch.bool)
    for branch in (left, right):
        for i in [*range(prefix), *branch]:
            mask[i, [j for j in [*range(prefix), *branch] if j <= i]] = True
    with torch.no_grad():
        tree = ours(ids, pos, attention_mask=mask[None, None])
        for branch in (left, right):
            alone = ours(torch.cat([ids[:, :prefix], ids[:, branch.start : branch.stop]], 1))
            assert (tree[0, [*range(prefix), *branch]] - alone[0]).abs().max().item() < 1e-4
        with pytest.raises(ValueError, match="not both"):
            ours(ids, pos, segment_ids=torch.zeros_like(ids), attention_mask=mask[None, None])


def test_rows_of_different_lengths_decode_independently():
    """Right-padded rows with their own positions give each row its unbatched logits."""
    ours, _ = pair(small_config("GQA"))
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, 512, (1, 7), generator=g), torch.randint(0, 512, (1, 15), generator=g)
    with torch.no_grad():
        want_a, want_b = ours(a)[0, -1], ours(b)[0, -1]
        cache = ours.new_cache(batch_size=2, max_seq_len=32)
        batch = torch.zeros(2, 15, dtype=torch.long)
        batch[0, :7], batch[1] = a[0], b[0]
        last = ours(
            batch, torch.arange(15).expand(2, 15), cache, logits_index=torch.tensor([6, 14])
        )
        assert (last[0, 0] - want_a).abs().max() < 1e-4
        assert (last[1, 0] - want_b).abs().max() < 1e-4
        # next step: row 0 at position 7 (overwriting its padding), row 1 at 15
        nxt = torch.tensor([[11], [12]])
        step = ours(nxt, torch.tensor([[7], [15]]), cache)
        want0 = ours(torch.cat([a, nxt[:1]], 1))[0, -1]
        want1 = ours(torch.cat([b, nxt[1:]], 1))[0, -1]
    assert (step[0, 0] - want0).abs().max() < 1e-4
    assert (step[1, 0] - want1).abs().max() < 1e-4


def test_cache_rows_select_slots():
    ours, _ = pair(small_config("MQA"))
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = ours.new_cache(batch_size=4, max_seq_len=16)
        got = ours(ids, torch.arange(9)[None], cache, rows=torch.tensor([3]))
        assert cache.layers[0].k[:3].abs().sum() == 0  # other slots untouched
        assert (got - ours(ids)).abs().max() < 1e-4


def test_cache_longer_than_model_positions_is_refused():
    ours = GemmaForCausalLM(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.new_cache(1, 10_000)


def test_parameter_count_matches_config():
    for kind in SHAPES:
        for tie in (True, False):
            cfg = small_config(kind, tie=tie)
            n = sum(p.numel() for p in GemmaForCausalLM(cfg).parameters())
            assert n == cfg.num_parameters


def test_presets_have_published_sizes():
    assert round(ModelConfig.preset("2b").num_parameters / 1e9, 2) == 2.51
    assert round(ModelConfig.preset("7b").num_parameters / 1e9, 2) == 8.54
