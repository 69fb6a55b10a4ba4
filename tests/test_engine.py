"""The generation engine: parity with transformers' greedy generate, batching, sampling, stops."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from codegemma.config import ModelConfig
from codegemma.engine import Engine, SamplingParams
from codegemma.engine.stops import StopText
from codegemma.model import GemmaForCausalLM


def tiny_model(kind_kv: int = 1, seed: int = 0) -> GemmaForCausalLM:
    cfg = ModelConfig.preset("tiny").replace(num_key_value_heads=kind_kv)
    return GemmaForCausalLM(cfg).init_weights(std=0.3, seed=seed).eval()


def prompts_of(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(108, 512, (n - 1,), generator=g).tolist() for n in lengths]


def no_cache_greedy(model, prompt, n) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def hf_twin(model: GemmaForCausalLM):
    hf = transformers.GemmaForCausalLM(transformers.GemmaConfig(**model.config.to_hf_dict()))
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    return hf.eval()


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_greedy_32_tokens_identical_to_transformers_with_and_without_cache(kv_heads):
    model = tiny_model(kv_heads)
    prompt = prompts_of([17])[0]
    ours = Engine(model).generate([prompt], SamplingParams(max_new_tokens=32))[0]
    with torch.no_grad():
        out = hf_twin(model).generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert ours.token_ids == out[0, len(prompt) :].tolist()
    assert ours.token_ids == no_cache_greedy(model, prompt, 32)
    assert ours.finish_reason == "length" and ours.prompt_tokens == 17


def test_repetition_penalty_matches_transformers():
    model = tiny_model(1, seed=3)
    prompt = prompts_of([9])[0]
    ours = Engine(model).generate(
        [prompt], SamplingParams(max_new_tokens=24, repetition_penalty=1.7)
    )
    with torch.no_grad():
        out = hf_twin(model).generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            repetition_penalty=1.7,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert ours[0].token_ids == out[0, len(prompt) :].tolist()


def penalized_greedy_reference(model, prompt, n, presence, frequency) -> list[int]:
    """OpenAI's penalties by their definition: full forward each step, counts of generated ids."""
    ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].float()
            token = int((logits - presence * (counts > 0) - frequency * counts).argmax())
            counts[token] += 1
            ids.append(token)
    return ids[len(prompt) :]


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 0.7), (0.8, 0.4), (-2.0, 0.0)])
def test_presence_and_frequency_penalties_follow_openai(presence, frequency):
    model = tiny_model(seed=5)
    prompt = prompts_of([6])[0]
    params = SamplingParams(
        max_new_tokens=32, presence_penalty=presence, frequency_penalty=frequency
    )
    ours = Engine(model, max_batch_size=2).generate([prompt, prompt[:3]], params)
    assert ours[0].token_ids == penalized_greedy_reference(model, prompt, 32, presence, frequency)
    assert ours[1].token_ids == penalized_greedy_reference(
        model, prompt[:3], 32, presence, frequency
    )
    plain = Engine(model).generate([prompt], SamplingParams(max_new_tokens=32))[0].token_ids
    distinct = len(set(ours[0].token_ids))
    if presence > 0 or frequency > 0:  # the random model repeats itself; penalties spread it out
        assert distinct > len(set(plain))
    else:
        assert distinct <= len(set(plain))


def test_penalties_must_be_finite():
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            SamplingParams(**{name: float("nan")})
    assert not SamplingParams(presence_penalty=0.1).plain
    assert SamplingParams().plain


def test_batched_prompts_of_different_lengths_equal_one_by_one():
    model = tiny_model()
    prompts = prompts_of([3, 20, 7, 12, 1, 30, 5])
    params = SamplingParams(max_new_tokens=12)
    alone = [Engine(model).generate([p], params)[0].token_ids for p in prompts]
    # fewer slots than prompts: requests join as others finish (continuous batching)
    together = Engine(model, max_batch_size=3).generate(prompts, params)
    assert [r.token_ids for r in together] == alone


def test_mixed_max_new_tokens_free_slots_early():
    model = tiny_model()
    prompts = prompts_of([5, 6, 7, 8])
    params = [SamplingParams(max_new_tokens=n) for n in (1, 9, 2, 4)]
    results = Engine(model, max_batch_size=2).generate(prompts, params)
    assert [len(r.token_ids) for r in results] == [1, 9, 2, 4]
    for p, r, sp in zip(prompts, results, params, strict=True):
        assert r.token_ids == no_cache_greedy(model, p, sp.max_new_tokens)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    model = tiny_model()
    p = prompts_of([8])[0]
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1234)
    a = Engine(model).generate([p], params)[0].token_ids
    b = (
        Engine(model, max_batch_size=4)
        .generate(
            prompts_of([3, 11, 5]) + [p],
            [SamplingParams(max_new_tokens=20, temperature=1.0)] * 3 + [params],
        )[3]
        .token_ids
    )
    c = Engine(model).generate([p], params.__class__(max_new_tokens=20, temperature=1.0, seed=99))
    assert a == b
    assert a != c[0].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny_model()
    p = prompts_of([10])[0]
    greedy = Engine(model).generate([p], SamplingParams(max_new_tokens=10))[0].token_ids
    for params in (
        SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1, seed=0),
        SamplingParams(max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=0),
    ):
        assert Engine(model).generate([p], params)[0].token_ids == greedy


def test_top_k_restricts_choices():
    model = tiny_model()
    p = prompts_of([4])[0]
    with torch.no_grad():
        top5 = set(model(torch.tensor([p]))[0, -1].topk(5).indices.tolist())
    firsts = {
        Engine(model)
        .generate([p], SamplingParams(max_new_tokens=1, temperature=5.0, top_k=5, seed=s))[0]
        .token_ids[0]
        for s in range(40)
    }
    assert firsts <= top5 and len(firsts) > 1


def test_stop_token_ends_generation(tiny_tokenizer):
    model = tiny_model()
    p = prompts_of([6])[0]
    full = Engine(model).generate([p], SamplingParams(max_new_tokens=16))[0].token_ids
    stop_at = full[5]
    k = full.index(stop_at)
    res = Engine(model, tiny_tokenizer).generate(
        [p], SamplingParams(max_new_tokens=16, stop_token_ids=frozenset({stop_at}))
    )[0]
    assert res.token_ids == full[: k + 1]
    assert res.finish_reason == "stop" and res.stop == stop_at
    assert res.text == tiny_tokenizer.decode(full[:k], skip_special=True)


def test_stop_string_spanning_token_boundary(tiny_tokenizer):
    for seed in range(20):  # find a generation with a clean boundary between two tokens' text
        model, p = tiny_model(seed=seed), prompts_of([6], seed=seed)[0]
        engine = Engine(model, tiny_tokenizer)
        full = engine.generate([p], SamplingParams(max_new_tokens=24))[0]
        texts = [tiny_tokenizer.decode(full.token_ids[:i], skip_special=True) for i in range(25)]
        # the last 2 characters of one token's text and the first 2 of the next
        candidates = [
            texts[i][-2:] + texts[i + 1][len(texts[i]) : len(texts[i]) + 2]
            for i in range(2, 23)
            if texts[i + 1].startswith(texts[i])
            and len(texts[i + 1]) - len(texts[i]) >= 2
            and len(texts[i]) >= 2
            and "\ufffd" not in texts[i + 1]
        ]
        stop = next((c for c in candidates if full.text.index(c) > 0), None)
        if stop is not None:
            break
    assert stop is not None
    res = engine.generate([p], SamplingParams(max_new_tokens=24, stop_strings=(stop,)))[0]
    assert res.finish_reason == "stop" and res.stop == stop
    assert res.text == full.text[: full.text.index(stop)]


def test_stream_deltas_concatenate_to_the_result(tiny_tokenizer):
    model = tiny_model(seed=2)
    p = prompts_of([5])[0]
    engine = Engine(model, tiny_tokenizer)
    events = list(engine.stream(p, SamplingParams(max_new_tokens=20)))
    assert events[-1].finished and sum(e.finished for e in events) == 1
    assert "".join(e.delta for e in events) == events[-1].result.text
    assert engine.num_active == 0


def test_abandoned_stream_and_cancel_free_the_slot(tiny_tokenizer):
    model = tiny_model()
    engine = Engine(model, tiny_tokenizer, max_batch_size=1)
    stream = engine.stream(prompts_of([5])[0], SamplingParams(max_new_tokens=50))
    next(stream)
    stream.close()
    assert engine.num_active == 0 and not engine.has_work()
    rid = engine.submit(prompts_of([4])[0], SamplingParams(max_new_tokens=50))
    engine.step()
    engine.cancel(rid)
    (event,) = engine.step()
    assert event.result.finish_reason == "cancelled" and engine.num_active == 0


def test_bad_requests_are_refused():
    engine = Engine(tiny_model(), max_batch_size=1)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="context holds"):
        engine.submit([2] * 600, SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([2, 9999], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit([2], SamplingParams(stop_strings=("x",)))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_generation_is_clamped_to_the_context():
    engine = Engine(tiny_model(), max_batch_size=1)
    res = engine.generate([[2] * 500], SamplingParams(max_new_tokens=100))[0]
    assert len(res.token_ids) == 12 and res.finish_reason == "length"


class PieceTokenizer:
    """Token i decodes to pieces[i]: drives StopText with arbitrary token boundaries."""

    def __init__(self, pieces):
        self.pieces = pieces

    def stream_decoder(self, skip_special=False):
        pieces = self.pieces

        class Decoder:
            def push(self, i):
                return pieces[i]

            def flush(self):
                return ""

        return Decoder()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text("ab\n", min_size=1, max_size=3), min_size=1, max_size=12),
    st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_text_releases_exactly_the_text_before_the_earliest_stop(pieces, stops):
    stop_text = StopText(PieceTokenizer(pieces), stops)
    released, matched = [], None
    for i in range(len(pieces)):
        delta, matched = stop_text.push(i)
        released.append(delta)
        if matched:
            break
    if not matched:
        released.append(stop_text.finish())
    # generation stops at the first token after which some stop string is complete, and is cut
    # at the earliest of the stop strings complete by then
    text, expected = "", "".join(pieces)
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            expected = text[: min(hits)]
            break
    assert "".join(released) == expected
    # nothing released ever ran past the final text
    assert all(expected.startswith("".join(released[: k + 1])) for k in range(len(released)))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=4, temperature=1e-30, seed=0),
        SamplingParams(max_new_tokens=4, temperature=1e-46, seed=0),  # 0 in float32
        SamplingParams(max_new_tokens=4, temperature=5e-324, seed=0),  # the least double
        SamplingParams(max_new_tokens=4, temperature=1e30, seed=0),
        SamplingParams(max_new_tokens=4, temperature=1.0, repetition_penalty=1e-30, seed=0),
        SamplingParams(max_new_tokens=4, temperature=1.0, repetition_penalty=5e-324, seed=0),
        SamplingParams(max_new_tokens=4, repetition_penalty=5e-324),  # greedy, penalised
        SamplingParams(max_new_tokens=4, temperature=1.0, repetition_penalty=1e30, seed=0),
        SamplingParams(max_new_tokens=4, temperature=0.5, top_p=1e-9, top_k=1, seed=0),
        SamplingParams(max_new_tokens=4, temperature=1e-300, presence_penalty=-2, seed=0),
    ],
)
def test_extreme_but_valid_sampling_parameters_do_not_break_sampling(params):
    model = tiny_model()
    prompt = prompts_of([6])[0]
    (result,) = Engine(model).generate([prompt], params)
    assert len(result.token_ids) == 4
    if 0 < params.temperature < 1e-20 and params.presence_penalty == 0:
        assert result.token_ids == no_cache_greedy(model, prompt, 4)  # vanishing temperature


# -- prefix caching ---------------------------------------------------------------------------
def fresh_tokens(model, prompt, params) -> list[int]:
    return Engine(model, prefix_cache=False).generate([prompt], params)[0].token_ids


def test_prefix_cache_reuses_a_shared_prompt_and_keeps_the_answer():
    model = tiny_model()
    stem = prompts_of([40])[0]
    params = SamplingParams(max_new_tokens=6)
    engine = Engine(model, max_batch_size=2)
    first = engine.generate([stem + [300, 301]], params)[0]
    assert first.cached_tokens == 0
    again = engine.generate([stem + [300, 301]], params)[0]  # the same prompt: all but the last
    assert again.cached_tokens == len(stem) + 1 and again.token_ids == first.token_ids
    edited = engine.generate([stem + [302, 303, 304]], params)[0]  # typed on: the stem is reused
    assert edited.cached_tokens == len(stem)
    assert edited.token_ids == fresh_tokens(model, stem + [302, 303, 304], params)
    assert engine.prompt_tokens_cached == 2 * len(stem) + 1
    assert engine.prompt_tokens_computed == (len(stem) + 2) + 1 + 3
    short = Engine(model, max_batch_size=2)  # below min_cached_prefix (32): a plain prefill
    short.generate([stem[:20] + [300]], params)
    assert short.generate([stem[:20] + [301]], params)[0].cached_tokens == 0


def test_free_rows_keep_their_cache_while_other_slots_decode():
    """A decode step computes only active rows: a free row between them is not overwritten."""
    model = tiny_model()
    a, b, c = prompts_of([7, 9, 12], seed=4)
    params = SamplingParams(max_new_tokens=5)
    engine = Engine(model, max_batch_size=3, min_cached_prefix=1)
    engine.generate([a, b, c], params)  # rows 0, 1, 2 hold a, b, c (shortest first)
    long = SamplingParams(max_new_tokens=20)
    engine.generate([a + [400], c + [401]], long)  # rows 0 and 2 decode around b's row
    result = engine.generate([b], params)[0]
    assert result.cached_tokens == len(b) - 1
    assert result.token_ids == fresh_tokens(model, b, params)


@settings(max_examples=20, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(0, 3), st.lists(st.integers(108, 140), max_size=6), st.integers(1, 8)
        ),
        min_size=1,
        max_size=6,
    ),
    batch=st.integers(1, 3),
)
def test_prefix_cached_generation_equals_fresh_generation(requests, batch):
    """Rounds of requests that share stems (as an editor's keystrokes do), through one engine with
    few slots, give every request the tokens a fresh engine gives it."""
    model = tiny_model()
    stems = prompts_of([5, 17, 30, 3], seed=7)
    engine = Engine(model, max_batch_size=batch, min_cached_prefix=1)
    for start in range(0, len(requests), 2):  # two requests per round
        round_ = requests[start : start + 2]
        prompts = [stems[i] + tail for i, tail, _ in round_]
        params = [SamplingParams(max_new_tokens=n) for _, _, n in round_]
        results = engine.generate(prompts, params)
        for prompt, p, r in zip(prompts, params, results, strict=True):
            assert r.token_ids == fresh_tokens(model, prompt, p)


def test_a_failed_step_forgets_what_the_rows_held(monkeypatch):
    model = tiny_model()
    (prompt,) = prompts_of([10], seed=9)
    params = SamplingParams(max_new_tokens=8)
    engine = Engine(model, max_batch_size=2, min_cached_prefix=1)
    engine.generate([prompt], params)
    engine.submit(prompt, params, request_id="x")
    engine.step()  # prefill (from the cache)
    with monkeypatch.context() as m:  # the decode step's forward (kernel or modules) fails
        m.setattr(engine, "_forward", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            engine.step()  # the decode fails half-way, as far as the engine can tell
    engine.cancel("x")
    engine.step()
    again = engine.generate([prompt], params)[0]
    assert again.cached_tokens == 0  # nothing reused from a row a failed step touched
    assert again.token_ids == fresh_tokens(model, prompt, params)


@given(
    a=st.lists(st.integers(0, 2), max_size=700),
    tail=st.lists(st.integers(0, 2), max_size=600),
    cut=st.integers(0, 700),
)
def test_common_prefix_length(a, tail, cut):
    from codegemma.engine.engine import _common_prefix

    b = a[:cut] + tail
    n = min(len(a), len(b))
    expected = next((i for i in range(n) if a[i] != b[i]), n)
    assert _common_prefix(a, b) == expected == _common_prefix(b, a)
