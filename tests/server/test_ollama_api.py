"""The official `ollama` client against a live server: FIM with `suffix` (an empty one too),
streaming generate and chat, tags, show, version, ps, and errors as Ollama answers them."""

from __future__ import annotations

import httpx
import ollama
import pytest

import codegemma
from codegemma import prompts

MODEL_ID = "tiny-codegemma"  # conftest's served model name
GREEDY = {"temperature": 0, "num_predict": 12}
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, timeout=60)


def test_generate_with_suffix_is_the_library_fim_completion(client, tiny_cg):
    reply = client.generate(model=MODEL_ID, prompt=PREFIX, suffix=SUFFIX, options=GREEDY)
    expected = tiny_cg.complete(PREFIX, SUFFIX, max_new_tokens=12, temperature=0.0)
    assert reply.response == expected
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.model == MODEL_ID
    assert reply.prompt_eval_count > len(tiny_cg.tokenizer.encode(PREFIX))
    assert 0 < reply.eval_count <= 12
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration > 0
    fim = prompts.fim_prompt(tiny_cg.tokenizer, PREFIX, SUFFIX)
    assert reply.context[: len(fim)] == fim  # the prompt's ids, then the middle's


def test_an_empty_suffix_is_still_fim(client, tiny_cg):
    """Ollama reads `suffix: ""` as no suffix; here it is FIM with the cursor at the end."""
    reply = client.generate(model=MODEL_ID, prompt=PREFIX, suffix="", options=GREEDY)
    assert reply.response == tiny_cg.complete(PREFIX, "", max_new_tokens=12, temperature=0.0)
    fim = prompts.fim_prompt(tiny_cg.tokenizer, PREFIX, "")
    assert reply.context[: len(fim)] == fim


def test_a_raw_prompt_in_the_fim_layout_is_fim(client):
    as_suffix = client.generate(model=MODEL_ID, prompt=PREFIX, suffix=SUFFIX, options=GREEDY)
    raw = f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"
    as_layout = client.generate(model=MODEL_ID, prompt=raw, raw=True, options=GREEDY)
    assert as_layout.response == as_suffix.response
    assert as_layout.context is None  # raw mode returns no context, as Ollama's


def test_streamed_generate_equals_the_plain_one(client):
    kwargs = dict(model=MODEL_ID, prompt=PREFIX, suffix=SUFFIX, options=GREEDY)
    plain = client.generate(**kwargs)
    parts = list(client.generate(stream=True, **kwargs))
    assert "".join(p.response for p in parts) == plain.response
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason == plain.done_reason
    assert parts[-1].eval_count == plain.eval_count


def test_generate_without_suffix_uses_the_chat_template_of_a_chat_model(client, tiny_cg):
    """The test model's tokenizer carries Gemma's chat template, so (as Ollama applies a model's
    template) a prompt becomes a user turn; `context` carries the conversation on."""
    first = client.generate(model=MODEL_ID, prompt="Hello", options=GREEDY)
    turn = prompts.chat_prompt(tiny_cg.tokenizer, [{"role": "user", "content": "Hello"}])
    assert first.context[: len(turn)] == turn
    assert first.prompt_eval_count <= len(turn)  # what the prefix cache held is not evaluated
    second = client.generate(model=MODEL_ID, prompt="More", context=first.context, options=GREEDY)
    assert second.context[: len(first.context)] == first.context
    assert len(second.context) > len(first.context) + 3


def test_streaming_chat_equals_the_plain_reply(client):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Write a Python add function."},
    ]
    plain = client.chat(model=MODEL_ID, messages=messages, options=GREEDY)
    parts = list(client.chat(model=MODEL_ID, messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == plain.message.content
    assert all(p.message.role == "assistant" for p in parts)
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason == plain.done_reason and parts[-1].eval_count == plain.eval_count
    assert plain.message.role == "assistant" and plain.prompt_eval_count > 0


def test_tags_list_the_served_model(client, tiny_cg):
    (entry,) = client.list().models
    assert entry.model == f"{MODEL_ID}:latest"
    assert entry.details.family == "gemma" and entry.details.format == "safetensors"
    assert entry.details.quantization_level == "F32"
    assert entry.size == sum(p.numel() * p.element_size() for p in tiny_cg.model.parameters())
    assert entry.modified_at is not None and len(entry.digest) == 64


def test_show_describes_the_model_for_fim_clients(client, tiny_cg):
    shown = client.show(MODEL_ID)
    assert ".Suffix" in shown.template  # how Continue decides a model takes `suffix`
    assert "<start_of_turn>" in shown.template  # a chat model: generate applies the turns
    assert "insert" in shown.capabilities and "completion" in shown.capabilities
    info = shown.modelinfo
    assert info["general.architecture"] == "gemma"
    assert info["gemma.block_count"] == tiny_cg.config.num_hidden_layers
    assert info["general.parameter_count"] == tiny_cg.config.num_parameters
    assert f"num_ctx                        {tiny_cg.engine.max_seq_len}" in shown.parameters
    assert client.show(f"{MODEL_ID}:latest").template == shown.template


def test_version_and_running_models(client):
    version = client._client.get("/api/version")  # the package's own HTTP client
    assert version.json() == {"version": codegemma.__version__}
    (running,) = client.ps().models
    assert running.model == f"{MODEL_ID}:latest" and running.context_length > 0


def test_load_and_unload_requests_generate_nothing(client):
    loaded = client.generate(model=MODEL_ID)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    unloaded = client.generate(model=MODEL_ID, keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.chat(model=MODEL_ID, messages=[]).done_reason == "load"


def test_num_predict_beyond_the_server_limit_is_clamped(client):
    reply = client.generate(
        model=MODEL_ID, prompt="x = ", raw=True, options={"temperature": 0, "num_predict": 10**6}
    )
    assert reply.done and reply.eval_count <= 64  # conftest's server generates 64 at most


def test_errors_are_ollama_errors(client, server):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="llama3", prompt="x")
    assert e.value.status_code == 404 and e.value.error == "model 'llama3' not found"
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL_ID, prompt="x", options={"temperature": 5})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL_ID, prompt="x", raw=True, system="be brief")
    assert e.value.error == "raw mode does not support template, system, or context"
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL_ID, messages=[{"role": "user", "content": "x"}], format="json")
    assert e.value.status_code == 400 and "format" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL_ID, messages=[{"role": "assistant", "content": "x"}])
    assert e.value.status_code == 400 and "alternate" in e.value.error
    empty = httpx.post(server + "/api/generate", content=b"")
    assert (empty.status_code, empty.json()) == (400, {"error": "missing request body"})


def test_a_template_of_the_request_is_rendered(client):
    template = "{{ if .System }}{{ .System }}\n{{ end }}# {{ .Prompt }}\n"
    reply = client.generate(
        model=MODEL_ID, prompt="add", system="python", template=template, options=GREEDY
    )
    assert reply.done
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL_ID, prompt="x", template="{{ range .Messages }}{{ end }}")
    assert e.value.status_code == 400 and "range" in e.value.error
