"""Continue's requests, byte for byte as its providers build them (continuedev/continue,
core/llm/llms/Ollama.ts and OpenAI.ts, core/autocomplete), against a live server configured as
docs/serving.md's "Continue and Ollama clients" says, and read back the way Continue reads them.

The configuration the docs give sets `temperature: 0` and `maxTokens: 64`
(`defaultCompletionOptions`), so autocomplete is greedy and comparable with the library's own
completion; Continue's defaults (temperature 0.01, maxTokens 4096) are sent too.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

MODEL = "tiny-codegemma"  # conftest's served model name; it contains "codegemma", as Continue needs
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\n\nprint(add(1, 2))\n"
# core/autocomplete/templating/AutocompleteTemplate.ts: codegemmaFimTemplate
TEMPLATE_STOPS = [
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|file_separator|>",
    "<end_of_turn>",
    "<eos>",
]
KEEP_ALIVE = 60 * 30  # Ollama.ts: options.keepAlive ?? 60 * 30
PARAMETER_LINE = re.compile(r"^(\S+)\s+((?:\".*\")|\S+)$")  # Ollama.ts reads /api/show with it


def model_info(url: str) -> dict:
    """What Ollama.ts's ensureModelInfo takes from POST /api/show {name}: the context length,
    stop strings, and whether the template names `.Suffix` (then it sends FIM with `suffix`)."""
    response = httpx.post(url + "/api/show", content=json.dumps({"name": MODEL}), headers=JSON)
    assert response.status_code == 200
    body = response.json()
    info = {"stop": [], "fim": ".Suffix" in body["template"]}
    for line in body["parameters"].split("\n"):
        parts = PARAMETER_LINE.match(line)
        assert parts, f"Continue cannot read the /api/show parameter line {line!r}"
        key, value = parts[1], parts[2]
        if key == "num_ctx":
            info["num_ctx"] = int(value)
        elif key == "stop":
            info["stop"].append(json.loads(value))
    return info


JSON = {"Content-Type": "application/json"}


def ollama_lines(response: httpx.Response, field: str) -> str:
    """Ollama.ts's stream reading: one JSON object a line; `response` (generate) or
    `message.content` (chat) is the text, an `error` object is thrown."""
    assert response.status_code == 200, response.text
    text = ""
    lines = [json.loads(chunk) for chunk in response.text.split("\n") if chunk.strip()]
    for j in lines:
        assert "error" not in j, j
        text += j["response"] if field == "response" else j["message"]["content"]
    assert lines[-1]["done"] is True and all(not j["done"] for j in lines[:-1])
    return text


def test_continue_ollama_autocomplete(server, tiny_cg):
    info = model_info(server)
    assert info["fim"] and info["num_ctx"] == tiny_cg.engine.max_seq_len
    # Ollama.ts _streamFim -> _getGenerateOptions(options, prefix, suffix), undefined fields
    # dropped by JSON.stringify; the stops: /api/show's, then the template's (core/util/merge.ts)
    body = {
        "model": MODEL,
        "prompt": PREFIX,
        "suffix": SUFFIX,
        "options": {
            "temperature": 0,
            "num_predict": 64,
            "stop": info["stop"] + TEMPLATE_STOPS,
            "num_ctx": info["num_ctx"],
        },
        "keep_alive": KEEP_ALIVE,
    }
    reply = httpx.post(server + "/api/generate", content=json.dumps(body), headers=JSON)
    expected = tiny_cg.complete(PREFIX, SUFFIX, max_new_tokens=64, temperature=0.0)
    assert ollama_lines(reply, "response") == expected


def test_continue_ollama_autocomplete_with_continues_defaults(server):
    info = model_info(server)
    body = {
        "model": MODEL,
        "prompt": PREFIX,
        "suffix": SUFFIX,
        "options": {
            "temperature": 0.01,  # CompletionProvider.ts, when the config sets none
            "num_predict": 4096,  # DEFAULT_MAX_TOKENS: more than the server's limit, clamped
            "stop": info["stop"] + TEMPLATE_STOPS,
            "num_ctx": info["num_ctx"],
        },
        "keep_alive": KEEP_ALIVE,
    }
    reply = httpx.post(server + "/api/generate", content=json.dumps(body), headers=JSON)
    assert isinstance(ollama_lines(reply, "response"), str)


def test_continue_ollama_chat(server):
    info = model_info(server)
    messages = [{"role": "user", "content": "Write a Python add function."}]
    options = {
        "temperature": 0,
        "num_predict": 64,
        "stop": info["stop"],
        "num_ctx": info["num_ctx"],
    }
    body = {"model": MODEL, "messages": messages, "options": options, "keep_alive": KEEP_ALIVE}
    streamed = httpx.post(server + "/api/chat", content=json.dumps(body), headers=JSON)
    plain = httpx.post(server + "/api/chat", json={**body, "stream": False}).json()
    assert ollama_lines(streamed, "message") == plain["message"]["content"]


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_continue_openai_autocomplete(serve, tiny_cg, api_key):
    """OpenAI.ts: autocomplete goes through the legacy completions endpoint
    (CompletionProvider sets useLegacyCompletionsEndpoint) with the codegemma template's prompt
    (`raw`), a body of _convertArgs(options, []) plus the prompt, read by streamSse."""
    with serve(max_tokens=64, **({"api_key": api_key} if api_key else {})) as (url, _):
        headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {api_key}"} if api_key else {}),
            "api-key": api_key or "",
        }
        body = {
            "model": MODEL,
            "max_tokens": 64,
            "temperature": 0,
            "stream": True,
            "stop": TEMPLATE_STOPS,
            "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
        }
        reply = httpx.post(url + "/v1/completions", content=json.dumps(body), headers=headers)
    assert reply.status_code == 200, reply.text
    text = ""
    for line in reply.text.split("\n"):
        if line.startswith("data: [DONE]"):
            break
        if line.startswith("data:"):
            value = json.loads(line.removeprefix("data:"))
            assert "error" not in value, value
            if value["choices"] and value["choices"][0].get("text"):
                text += value["choices"][0]["text"]
    assert text == tiny_cg.complete(PREFIX, SUFFIX, max_new_tokens=64, temperature=0.0)
