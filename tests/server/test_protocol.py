"""Request models, FIM-layout parsing, streamed FIM post-processing, metrics text, CLI flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from codegemma import middle
from codegemma.errors import UsageError
from codegemma.middle import FimRequest
from codegemma.prompts import parse_fim_text
from codegemma.server import protocol
from codegemma.server.cli import register, settings_from_args
from codegemma.server.prometheus import Registry
from codegemma.server.serving import FimTracker
from codegemma.server.settings import API_KEY_ENV, ServerSettings


def test_openai_models_are_strict_and_llamacpp_lenient():
    with pytest.raises(ValidationError, match="Extra inputs"):
        protocol.CompletionRequest.model_validate({"prompt": "x", "cache_prompt": True})
    with pytest.raises(ValidationError):
        protocol.CompletionRequest.model_validate({"prompt": "x", "n": "2"})
    infill = protocol.InfillRequest.model_validate(
        {"input_prefix": "a", "cache_prompt": True, "samplers": ["top_k"], "n_predict": "5"}
    )
    assert infill.n_predict == 5 and infill.temperature == 0.0


def test_sampling_params_from_a_request():
    req = protocol.CompletionRequest(prompt="x", temperature=0.5, top_p=0.9, seed=2**64 // 2 - 1)
    p = req.to_sampling_params(max_new_tokens=7, stop_token_ids=frozenset({1}), seed_offset=3)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.stop_token_ids) == (7, 0.5, 0.9, {1})
    assert p.seed == (2**63 - 1 + 3) % 2**64  # wraps into torch's accepted seed range
    assert (
        protocol.CompletionRequest(prompt="x")
        .to_sampling_params(max_new_tokens=1, stop_token_ids=frozenset())
        .temperature
        == 1.0
    )  # OpenAI's default


def test_presence_and_frequency_penalties_reach_the_engine():
    for req in (
        protocol.CompletionRequest(prompt="x", presence_penalty=1.5, frequency_penalty=-0.5),
        protocol.ChatCompletionRequest(
            messages=[{"role": "user", "content": "x"}],
            presence_penalty=1.5,
            frequency_penalty=-0.5,
        ),
    ):
        p = req.to_sampling_params(max_new_tokens=1, stop_token_ids=frozenset())
        assert (p.presence_penalty, p.frequency_penalty) == (1.5, -0.5)
    infill = protocol.InfillRequest(presence_penalty=1.5, frequency_penalty=-0.5)
    p = infill.to_sampling_params(max_new_tokens=1, stop_token_ids=frozenset(), stop_strings=())
    assert (p.presence_penalty, p.frequency_penalty) == (1.5, -0.5)
    with pytest.raises(ValidationError):
        protocol.CompletionRequest(prompt="x", presence_penalty=2.5)  # OpenAI's range is [-2, 2]


def test_prompt_forms():
    assert protocol.CompletionRequest(prompt="a").prompts() == ["a"]
    assert protocol.CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert protocol.CompletionRequest(prompt=[2, 5]).prompts() == [[2, 5]]
    assert protocol.CompletionRequest(prompt=[[2], [2, 7]]).prompts() == [[2], [2, 7]]
    with pytest.raises(ValidationError):
        protocol.CompletionRequest(prompt=[-1])


def test_fim_layout_parsing():
    assert parse_fim_text("<|fim_prefix|>a\n<|fim_suffix|>b<|fim_middle|>") == ("a\n", "b")
    assert parse_fim_text("<bos><|fim_prefix|><|fim_suffix|><|fim_middle|>") == ("", "")
    assert parse_fim_text("plain text") is None
    assert parse_fim_text("<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>c") is None
    assert parse_fim_text("<|fim_prefix|>a<|fim_middle|><|fim_suffix|>b<|fim_middle|>") is None


def test_server_settings_validate():
    with pytest.raises(ValueError, match="served_model_name"):
        ServerSettings(served_model_name=" ")
    with pytest.raises(ValueError, match="max_n"):
        ServerSettings(max_n=0)


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("max_n", 0, "--max-n"),
        ("max_queue", -1, "--max-queue"),
        ("body_timeout_s", 0.0, "--body-timeout-s"),
        ("header_timeout_s", -1.0, "--header-timeout-s"),
        ("fim_mode", "pms", "--fim-mode"),
        ("api_key", "", "--api-key"),
    ],
)
def test_bad_settings_are_usage_errors_naming_the_field_and_the_fix(field, value, flag):
    with pytest.raises(UsageError, match=field) as e:
        ServerSettings(**{field: value})
    assert e.value.fix and flag in e.value.fix


def test_serve_flags_are_generated_from_the_settings_fields():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert settings_from_args(args, "m") == ServerSettings(
        served_model_name="m"
    )  # no restated default
    args = parser.parse_args(
        ["serve", "--body-timeout-s", "2.5", "--max-prompt-tokens", "none", "--max-n", "3"]
    )
    s = settings_from_args(args, "m")
    assert (s.body_timeout_s, s.max_prompt_tokens, s.max_n) == (2.5, None, 3)
    flags = parser._subparsers._group_actions[0].choices["serve"]._option_string_actions
    for field in dataclasses.fields(ServerSettings):
        assert ("--" + field.name.replace("_", "-")) in flags, field.name
    for flag in ("--model", "--dtype", "--device", "--host", "--port", "--max-batch-size"):
        assert flag in flags


lines = st.lists(
    st.tuples(
        st.sampled_from(["", " ", "    ", "\t"]),
        st.sampled_from(["x", "y = 1", "", "pass", "return x", ")"]),
    ),
    max_size=6,
).map(lambda ls: "\n".join(i + t for i, t in ls))


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(["def f():\n    ", "x = ", "if a:\n", "", "    y"]),
    suffix=st.sampled_from(["", "\n", "\nreturn x\n", "y = 1\n", ")\n"]),
    raw=lines,
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
# whitespace first, then code: the whitespace-only rule must not be taken for a final cut
@example(prefix="x = ", suffix="", raw="\n\nx", cuts=[2])
def test_streamed_fim_text_is_the_postprocessed_text(prefix, suffix, raw, cuts):
    """Released pieces, joined, equal postprocess(full raw text): the stream matches the
    non-streamed answer, also when the tracker stops the generation early."""
    request = FimRequest(prefix=prefix, suffix=suffix, mode="block")
    bounds = sorted({min(c, len(raw)) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *bounds], [*bounds, len(raw)], strict=True)]
    tracker, released = FimTracker(request), ""
    for piece in pieces[:-1]:
        released += tracker.push(piece)
        if tracker.cut:
            break
    consumed = tracker.raw
    released += tracker.finish("" if tracker.cut else pieces[-1])
    expected = middle.clean(consumed if tracker.cut else raw, request)
    assert released == expected
    if tracker.cut:  # stopping early never changes the answer
        assert expected == middle.clean(raw, request)


def test_metrics_text_format():
    r = Registry()
    c = r.counter("x_total", "things", ("kind",))
    c.inc(kind='a"b')
    h = r.histogram("lat_seconds", "latency", buckets=(0.1, 1.0))
    h.observe(0.05)
    h.observe(0.5)
    r.gauge("depth", "queue", lambda: 3)
    text = r.render()
    assert '# TYPE x_total counter\nx_total{kind="a\\"b"} 1\n' in text
    assert 'lat_seconds_bucket{le="0.1"} 1\nlat_seconds_bucket{le="1"} 2\n' in text
    assert 'lat_seconds_bucket{le="+Inf"} 2\nlat_seconds_sum 0.55\nlat_seconds_count 2\n' in text
    assert "# TYPE depth gauge\ndepth 3\n" in text
    with pytest.raises(ValueError, match="labels"):
        c.inc(other="x")


def test_serve_command_defaults_to_loopback_and_reads_the_key_from_env(monkeypatch):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "m", "--max-batch-size", "16"])
    assert (args.host, args.port, args.max_batch_size) == ("127.0.0.1", 8000, 16)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    s = settings_from_args(args, "m")
    assert s.api_key == "from-env" and s.served_model_name == "m"
    args = parser.parse_args(["serve", "--api-key", "flag", "--served-model-name", "cg"])
    assert settings_from_args(args, "m").api_key == "flag"
    assert settings_from_args(args, "m").fim_mode == "psm"  # CodeGemma's documented layout
    args = parser.parse_args(["serve", "--fim-mode", "spm"])
    assert settings_from_args(args, "m").fim_mode == "spm"
    with pytest.raises(ValueError, match="fim_mode must be psm or spm"):
        ServerSettings(fim_mode="pms")
