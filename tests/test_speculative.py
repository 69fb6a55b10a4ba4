"""Speculative decoding by prompt lookup: drafts, exact verification, the KV cache beyond a row.

Two kinds of model. A *scripted* model whose next token is an exact integer function of the
history it reads back from the KV cache (the positions model.cache_mask lets each query see): its
logits do not depend on the forward's shape, so speculative and plain decoding must agree exactly,
greedy, seeded-sampled and penalised alike, and any stale key a query could see would change the
answer. And the random-weight tiny Gemma in fp32, where the verify forward (several positions,
explicit mask) and the one-token step (kernels.DecodeStep) round differently: there greedy tokens
agree except where the two best logits are within float error of each other, which is checked.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from codegemma import kernels
from codegemma.config import ModelConfig
from codegemma.engine import Engine, SamplingParams
from codegemma.engine.sampling import draw, target_probs
from codegemma.engine.speculative import DraftLength, PromptLookup, StepRates
from codegemma.kernels.step import DecodeStep
from codegemma.model import GemmaForCausalLM, KVCache, cache_mask

VOCAB = 48


class HistoryModel(nn.Module):
    """Next-token logits from the visible history, read back from the cache.

    Each fed token id is written into the KV cache as a key at its (row, position); a query sees
    the keys cache_mask gives it (or, without a mask, those at positions <= its own, as the
    model's causal and one-token paths do). The next token mostly repeats the token three back,
    so prompt lookup finds drafts, and breaks the pattern whenever the sum of the whole visible
    history is a multiple of 7, so drafts are also rejected and a stale key changes the result.
    Two runner-up tokens get logits close enough for sampling to pick them often."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig.preset("tiny").replace(
            vocab_size=VOCAB,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=2,
            max_position_embeddings=256,
        )
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, 2)
        self.widths: list[int] = []  # T of every forward pass

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_seq_len, torch.float32)

    def forward(self, input_ids, input_pos=None, cache=None, rows=None, logits_index=None):
        B, T = input_ids.shape
        self.widths.append(T)
        if input_pos is None:
            input_pos = torch.arange(T).expand(B, T)
        mask, at = cache_mask(input_pos, slice(0, B) if rows is None else rows)
        kv = input_ids.float()[:, None, :, None].expand(B, 1, T, 2).contiguous()
        keys, _ = cache.layers[0].update(at, kv, kv)
        history = keys[:, 0, :, 0].long()  # [B, kv_len]
        if mask is None:
            visible = torch.arange(history.shape[1])[None, None] <= input_pos[:, :, None]
        else:
            visible = mask[:, 0]
        steps = range(T) if logits_index is None else None
        out = []
        for b in range(B):
            at_steps = steps if steps is not None else [int(logits_index[b])]
            out.append([self.scores(history[b][visible[b, t]].tolist()) for t in at_steps])
        return torch.tensor(out)

    @staticmethod
    def scores(history: list[int]) -> list[float]:
        best = history[-3] if len(history) >= 3 else (history[-1] + 1) % VOCAB
        if sum(history) % 7 == 0:
            best = (history[-1] * 5 + len(history)) % VOCAB
        logits = [0.0] * VOCAB
        logits[(best * 3 + 1) % VOCAB] = 6.0
        logits[(best + 1) % VOCAB] = 6.5
        logits[best] = 8.0
        return logits


class PieceTokenizer:
    """Token i decodes to a short piece of "ab\\n" text, so stop strings span tokens often."""

    pieces = [("a", "b", "\n", "ab", "ba", "b\n")[i % 6] for i in range(VOCAB)]

    def stream_decoder(self, skip_special=False):
        pieces = self.pieces

        class Decoder:
            def push(self, i):
                return pieces[i]

            def flush(self):
                return ""

        return Decoder()


def run_events(engine: Engine, prompts, params) -> list[tuple[list[tuple], object]]:
    """Every request's (delta, token id) events in order, and its result."""
    ids = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    events: dict = {i: [] for i in ids}
    results: dict = {}
    while engine.has_work():
        for e in engine.step():
            events[e.request_id].append((e.delta, e.token_id))
            if e.finished:
                results[e.request_id] = e.result
    return [(events[i], results[i]) for i in ids]


def outcome(result) -> tuple:
    """What a caller sees. (Not cached_tokens: with fewer steps per request, requests finish in
    another order, so slots are reused differently.)"""
    return result.token_ids, result.text, result.finish_reason, result.stop


STEMS = [[2, 5, 9, 14, 5, 9], [2, 30, 31, 32, 33, 30, 31, 32, 33, 40, 41, 17], [2, 7]]
SAMPLING = [
    {},
    {"temperature": 1.0, "seed": 11},
    {"temperature": 0.7, "top_k": 2, "seed": 5},
    {"repetition_penalty": 1.3},
    {"temperature": 1.0, "presence_penalty": 0.8, "frequency_penalty": 0.4, "seed": 3},
]
request = st.tuples(
    st.integers(0, len(STEMS) - 1),
    st.lists(st.integers(3, VOCAB - 1), max_size=8),
    st.integers(0, 30),
    st.lists(st.text("ab\n", min_size=2, max_size=3), max_size=2),
    st.frozensets(st.integers(0, VOCAB - 1), max_size=2),
    st.integers(0, len(SAMPLING) - 1),
)


@settings(max_examples=60, deadline=None)
@given(rounds=st.lists(st.lists(request, min_size=1, max_size=4), min_size=1, max_size=3))
def test_speculative_decoding_equals_plain_decoding_on_a_scripted_model(rounds):
    """Rounds of requests through two engines with few slots (prefix-cache hits, reused slots,
    continuous batching): drafting at every step changes nothing, not a token, a streamed delta,
    a stop or a finish reason, for greedy, seeded-sampled and penalised requests alike."""
    model = HistoryModel()
    fast = Engine(model, PieceTokenizer(), max_batch_size=3, min_cached_prefix=1, speculative=True)
    slow = Engine(model, PieceTokenizer(), max_batch_size=3, min_cached_prefix=1, speculative=False)
    for round_ in rounds:
        prompts = [STEMS[stem] + tail for stem, tail, *_ in round_]
        params = [
            SamplingParams(
                max_new_tokens=n, stop_strings=tuple(stops), stop_token_ids=ids, **SAMPLING[kind]
            )
            for _, _, n, stops, ids, kind in round_
        ]
        for (fast_events, fast_result), (slow_events, slow_result) in zip(
            run_events(fast, prompts, params), run_events(slow, prompts, params), strict=True
        ):
            assert fast_events == slow_events
            assert outcome(fast_result) == outcome(slow_result)
            assert fast_result.decode_steps <= slow_result.decode_steps
    assert slow.decode_stats.draft_tokens == 0


def test_the_scripted_model_drafts_accepts_and_rejects():
    """The property above is not vacuous: drafts are made, kept and refused; a verify step is
    one forward pass of width 1 + longest draft, and steps without drafts stay one token wide."""
    model = HistoryModel()
    engine = Engine(model, max_batch_size=2, speculative=True)
    prompts = [STEMS[0] + [20, 21], STEMS[1]]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=40))
    stats = engine.decode_stats
    assert 0 < stats.accepted_draft_tokens < stats.draft_tokens
    assert stats.tokens_per_step > 1.5
    assert stats.decode_tokens == sum(len(r.token_ids) - 1 for r in results)
    assert stats.accepted_draft_tokens == sum(r.accepted_draft_tokens for r in results)
    assert sum(r.draft_tokens for r in results) == stats.draft_tokens
    decode_widths = model.widths[1:]  # after the one prefill
    assert len(decode_widths) == stats.decode_steps
    assert sum(w > 1 for w in decode_widths) == stats.verify_steps
    assert all(1 < w <= 1 + engine.max_draft_tokens for w in decode_widths if w > 1)


def test_a_request_can_turn_speculation_off():
    engine = Engine(HistoryModel(), max_batch_size=2, speculative=True)
    on, off = engine.generate(
        [STEMS[1], STEMS[1]],
        [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30, speculative=False)],
    )
    assert on.token_ids == off.token_ids
    assert off.draft_tokens == 0 and off.decode_steps == len(off.token_ids) - 1
    assert on.accepted_draft_tokens > 0 and on.decode_steps < off.decode_steps


def test_drafts_never_run_past_max_new_tokens():
    for n in range(1, 12):
        engine = Engine(HistoryModel(), speculative=True)
        (result,) = engine.generate([STEMS[1]], SamplingParams(max_new_tokens=n))
        assert len(result.token_ids) == n and result.finish_reason == "length"


# -- the KV cache beyond a row's accepted length ---------------------------------------------------
@given(st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(1, 5))
def test_cache_mask_shows_each_query_exactly_its_rows_positions_up_to_its_own(starts, width):
    pos = torch.tensor(starts)[:, None] + torch.arange(width)
    mask, at = cache_mask(pos, slice(0, len(starts)))
    assert at.kv_len == int(pos.max()) + 1
    expected = torch.arange(at.kv_len)[None, None, :] <= pos[:, :, None]
    if mask is None:  # one-token step at one position, or a prefill from 0: everything causal
        assert width == 1 or (pos == torch.arange(width)).all()
        assert (expected | (torch.arange(at.kv_len) <= pos.max())).all()
    else:
        assert torch.equal(mask[:, 0], expected)


def tiny_model(seed: int = 0) -> GemmaForCausalLM:
    return GemmaForCausalLM(ModelConfig.preset("tiny")).init_weights(std=0.3, seed=seed).eval()


@pytest.mark.parametrize("width", [1, 4])
@torch.inference_mode()
def test_keys_written_for_rejected_drafts_are_never_attended(width):
    """A verify step writes keys for draft tokens that are then rejected, and padding beyond;
    the next step (one token: kernels.DecodeStep; several: the module path with a mask) starts
    at the accepted length, and its logits equal, bit for bit, those of a cache holding only the
    accepted entries (zeros beyond)."""
    model = tiny_model()
    prompt = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    dirty = model.new_cache(2, 64)
    model(prompt, None, dirty)
    # a verify step of 6 draft tokens per row: row 0 keeps 2 (positions 12..14 hold its last
    # token and the 2 kept ones), row 1 none (position 12 only)
    model(torch.randint(3, 500, (2, 7)), 12 + torch.arange(7).expand(2, 7), dirty)
    for layer in dirty.layers:  # and every entry further on holds large finite junk
        layer.k[:, :, 19:] = 1e4
        layer.v[:, :, 19:] = -1e4
    accepted = [15, 13]
    clean = model.new_cache(2, 64)
    for clean_layer, dirty_layer in zip(clean.layers, dirty.layers, strict=True):
        for row, n in enumerate(accepted):
            clean_layer.k[row, :, :n] = dirty_layer.k[row, :, :n]
            clean_layer.v[row, :, :n] = dirty_layer.v[row, :, :n]
    step = torch.randint(3, 500, (2, width))
    pos = torch.tensor(accepted)[:, None] + torch.arange(width)
    assert torch.equal(model(step, pos, dirty), model(step, pos, clean))


# -- the real tiny model: fp32 rounding -------------------------------------------------------------
def prompts_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(108, 512, (n - 1,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def logit_gap(model, prefix: list[int], a: int, b: int) -> float:
    logits = model(torch.tensor([prefix]))[0, -1].float()
    return abs(float(logits[a] - logits[b]))


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 40), min_size=1, max_size=4),
    seed=st.integers(0, 10**6),
    batch=st.integers(1, 3),
    new=st.integers(1, 48),
)
def test_greedy_speculation_on_the_tiny_model_equals_plain_up_to_float_ties(
    lengths, seed, batch, new
):
    """What is guaranteed on a real model: the same tokens as plain decoding until the two forward
    shapes' float roundings pick different argmaxes, which can only happen where the two best
    logits are within rounding error. The random tiny model repeats itself, so drafts are kept."""
    model = tiny_model(seed % 3)
    prompts = prompts_of(lengths, seed)
    params = SamplingParams(max_new_tokens=new)
    fast = Engine(model, max_batch_size=batch, speculative=True).generate(prompts, params)
    slow = Engine(model, max_batch_size=batch, speculative=False).generate(prompts, params)
    for prompt, f, s in zip(prompts, fast, slow, strict=True):
        if f.token_ids != s.token_ids:
            i = next(
                i for i, (a, b) in enumerate(zip(f.token_ids, s.token_ids, strict=False)) if a != b
            )
            gap = logit_gap(model, prompt + s.token_ids[:i], f.token_ids[i], s.token_ids[i])
            assert gap < 1e-4, f"differ at token {i} where the logits are {gap} apart"


def test_the_tiny_model_keeps_drafts_and_verifies_through_both_paths(monkeypatch):
    """Drafts are kept on the real model, and a step without drafts still takes the one-token
    kernel path (kernels.DecodeStep) where the kernels are available."""
    model = tiny_model()
    prompts, params = prompts_of([5, 17, 30], 1), SamplingParams(max_new_tokens=40)
    slow = Engine(model, max_batch_size=3, speculative=False).generate(prompts, params)
    calls = []  # tokens per row of each decode-step kernel call
    run_step = DecodeStep.__call__
    monkeypatch.setattr(
        DecodeStep, "__call__", lambda *a: calls.append(a[1].shape[1]) or run_step(*a)
    )
    engine = Engine(model, max_batch_size=3, speculative=True)
    fast = engine.generate(prompts, params)
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow]
    stats = engine.decode_stats
    assert stats.accepted_draft_tokens > 0 and stats.tokens_per_step > 1.2
    if kernels.library() is not None:
        assert calls.count(1) == stats.decode_steps - stats.verify_steps > 0


# -- sampling: exactly the target distribution -------------------------------------------------------
def test_draw_follows_the_distribution_and_never_picks_an_impossible_token():
    probs = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.25, 0.05], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(4000)]), minlength=6)
    assert counts[0] == counts[3] == 0
    assert stats.chisquare(counts[probs > 0], 4000 * probs[probs > 0]).pvalue > 1e-3


@torch.inference_mode()
def test_sampled_speculation_follows_the_target_distribution_chi_square():
    """The joint distribution of the first three sampled tokens (top-k 3: 27 outcomes), with a
    prompt whose end repeats so that the second and third tokens are drafted, kept and refused,
    against the exact target distribution computed from full forward passes."""
    model = tiny_model(seed=4)
    base = prompts_of([8], 3)[0]
    loop = Engine(model, speculative=False).generate([base], SamplingParams(max_new_tokens=40))
    prompt = base + loop[0].token_ids  # the random model's greedy text repeats itself
    assert PromptLookup(prompt).draft(2)
    params = dict(max_new_tokens=3, temperature=5.0, top_k=3)

    def probs_after(tokens):
        return target_probs(model(torch.tensor([tokens]))[0, -1], SamplingParams(**params))

    expected = {}
    p1 = probs_after(prompt)
    for a in p1.nonzero().flatten().tolist():
        p2 = probs_after(prompt + [a])
        for b in p2.nonzero().flatten().tolist():
            p3 = probs_after(prompt + [a, b])
            for c in p3.nonzero().flatten().tolist():
                expected[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    n = 1200
    engine = Engine(model, max_batch_size=50, speculative=True)
    results = engine.generate(
        [prompt] * n, [SamplingParams(**params, seed=seed) for seed in range(n)]
    )
    observed = {k: 0 for k in expected}
    for r in results:
        observed[tuple(r.token_ids)] += 1
    assert sum(observed.values()) == n
    s = engine.decode_stats
    assert 0.1 * s.draft_tokens < s.accepted_draft_tokens < 0.9 * s.draft_tokens
    keys = sorted(expected, key=expected.get, reverse=True)
    big = [k for k in keys if expected[k] * n >= 5]  # the rare outcomes pooled into one bin
    rare = [k for k in keys if k not in big]
    f_obs = [observed[k] for k in big] + ([sum(observed[k] for k in rare)] if rare else [])
    f_exp = [expected[k] * n for k in big] + ([sum(expected[k] * n for k in rare)] if rare else [])
    assert stats.chisquare(f_obs, f_exp).pvalue > 1e-3


# -- the pieces -----------------------------------------------------------------------------------
def test_prompt_lookup_follows_the_longest_earlier_ngram_in_the_most_similar_context():
    lookup = PromptLookup([5, 1, 2, 3, 9, 7, 1, 2, 3, 8, 5, 1, 2, 3])
    assert lookup.draft(3) == [9, 7, 1]  # 1 2 3 after 5, as at the start, not after 7
    assert lookup.draft(0) == []
    assert PromptLookup([4, 1, 2, 3, 6, 6, 2, 3]).draft(2) == [6, 6]  # the 2-gram "2 3"
    assert PromptLookup([4, 1, 4]).draft(5) == [1, 4, 1, 4, 1]  # a repeat continues on
    assert PromptLookup([3, 3, 3]).draft(3) == [3, 3, 3]
    assert PromptLookup([1, 2, 3]).draft(4) == []  # nothing occurred before
    lookup = PromptLookup([7, 8])
    lookup.extend([9, 7, 8])
    assert lookup.draft(2) == [9, 7] and len(lookup) == 5


def test_draft_length_grows_on_full_acceptance_and_shrinks_on_rejection():
    length = DraftLength(8)
    assert length.current == 8
    length.update(8, 3)
    assert length.current == 7
    length.update(7, 7)
    assert length.current == 8  # capped
    for _ in range(10):
        length.update(3, 0)
    assert length.current == 1


def test_auto_mode_measures_both_kinds_of_step_and_keeps_the_faster():
    rates = StepRates(probe_every=4)
    assert not rates.speculate()  # one-token steps are measured first
    rates.record(False, tokens=10, seconds=1.0)
    assert rates.speculate()  # then verify steps
    rates.record(True, tokens=30, seconds=1.0)
    decisions = [rates.speculate() for _ in range(8)]
    assert decisions == [True, True, True, False] * 2  # the slower kind is probed now and then
    for _ in range(8):
        rates.record(True, tokens=1, seconds=1.0)
    assert rates.verify < rates.plain
    assert [rates.speculate() for _ in range(4)] == [False, False, False, True]


def test_engine_settings_are_checked():
    with pytest.raises(ValueError, match="speculative"):
        Engine(HistoryModel(), speculative="yes")
    with pytest.raises(ValueError, match="max_draft_tokens"):
        Engine(HistoryModel(), max_draft_tokens=0)
