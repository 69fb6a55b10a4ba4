"""The official `openai` client against a live server: FIM, streaming chat, errors as exceptions."""

from __future__ import annotations

import openai
import pytest

MODEL_ID = "tiny-codegemma"  # conftest's served model name


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\n\nprint(add(1, 2))\n"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_completion_with_suffix_is_the_library_fim_completion(client, tiny_cg):
    reply = client.completions.create(
        model=MODEL_ID, prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0
    )
    expected = tiny_cg.complete(PREFIX, SUFFIX, max_new_tokens=12, temperature=0.0)
    assert reply.choices[0].text == expected
    assert reply.object == "text_completion" and reply.model == MODEL_ID
    assert reply.usage.prompt_tokens > len(tiny_cg.tokenizer.encode(PREFIX))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_textual_fim_layout_prompt_is_completed_as_fim(client):
    """Continue sends `<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>` as a plain prompt."""
    as_suffix = client.completions.create(
        model=MODEL_ID, prompt=PREFIX, suffix=SUFFIX, max_tokens=10, temperature=0
    )
    as_layout = client.completions.create(
        model=MODEL_ID,
        prompt=f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
        max_tokens=10,
        temperature=0,
    )
    assert as_layout.choices[0].text == as_suffix.choices[0].text
    assert as_layout.usage.prompt_tokens == as_suffix.usage.prompt_tokens


def test_streamed_completion_equals_the_plain_one(client):
    kwargs = dict(model=MODEL_ID, prompt="import os\n", max_tokens=16, temperature=0)
    plain = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_choices_with_a_seed_are_reproducible(client):
    kwargs = dict(model=MODEL_ID, prompt="def ", max_tokens=8, temperature=1.0, n=3, seed=7)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    second = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == second and len(first) == 3
    assert len(set(first)) > 1  # each choice samples with its own seed


def test_echo_without_suffix_prepends_the_prompt(client):
    reply = client.completions.create(
        model=MODEL_ID, prompt="x = ", max_tokens=4, temperature=0, echo=True
    )
    assert reply.choices[0].text.startswith("x = ")


def test_streaming_chat_equals_the_plain_reply(client):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Write a Python add function."},
    ]
    kwargs = dict(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert plain.choices[0].message.role == "assistant"


def test_wrong_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    assert e.value.code == "model_not_found"


def test_bad_requests_raise_bad_request_error_naming_the_parameter(client):
    cases = [
        (dict(prompt="x", max_tokens=10_000), "max_tokens"),
        (dict(prompt="x", suffix="y", echo=True), "echo"),
        (dict(prompt="x", extra_body={"frobnicate": 1}), "frobnicate"),
        (dict(prompt="x", temperature=5.0), "temperature"),
        (dict(prompt="x", n=50), "n"),
        (dict(prompt="x", logprobs=21), "logprobs"),
        (dict(prompt="x" * 2000), "prompt"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL_ID, **kwargs)
        assert e.value.param == param, (kwargs, e.value.body)


def test_chat_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "assistant", "content": "hi"}], max_tokens=2
        )
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])


def test_api_key_is_required_when_configured(serve):
    with serve(api_key="s3cret", max_tokens=8) as (url, _):
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL_ID, prompt="a", max_tokens=2).choices
