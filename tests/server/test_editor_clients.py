"""The requests editor plugins send, exactly as their sources build them, and their answers read
the way those plugins read them (docs/serving.md has the configurations):

- llama.vim (ggml-org/llama.vim, autoload/llama.vim at a1c8e6e): `s:ring_update` (cache warm-up
  with the context chunks), `llama#fim` (the completion request, `s:fim_ctx_local` for the text
  around the cursor), `s:fim_on_response` (what it accepts as an answer).
- llama.vscode (ggml-org/llama.vscode, src/llama-server.ts at v0.0.63):
  `createRequestPayload` (FIM_PREP warm-up and the FIM request), src/completion.ts
  `getComplFromContent` (an object or an array of them).
- Tabby (TabbyML/tabby, crates/http-api-bindings/src/completion/llama.rs and openai.rs at
  21b29048d): the `llama.cpp/completion` kind (a template-rendered prompt to /completion,
  streamed, each event read as `{content, stop}`) and the `openai/completion` kind (`prompt` and
  `suffix` to /v1/completions, streamed, stopping at the first `finish_reason`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

MODEL_ID = "tiny-codegemma"
SOURCE = (Path(json.__file__).parent / "encoder.py").read_text().splitlines()
CURSOR = (120, 8)  # (line, column): inside a function body of json/encoder.py


@pytest.fixture(scope="module")
def http(serve):
    """A server with the defaults a user starts (`max_tokens` 1024: the clients ask for 128)."""
    with serve() as (url, app), httpx.Client(base_url=url, timeout=120) as client:
        yield client, app


# -- llama.vim ------------------------------------------------------------------------------------
def llama_vim_context(lines: list[str], y: int, x: int, n_prefix=256, n_suffix=64) -> dict:
    """`s:fim_ctx_local` for a cursor at column x of line y (0-based), no previous completion."""
    line = lines[y]
    line_prefix, line_suffix = line[:x], line[x:]
    indent = len(line) - len(line.lstrip(" \t"))
    if not line.strip():
        indent, line_prefix, line_suffix = 0, "", ""
    return {
        "prefix": "\n".join(lines[max(0, y - n_prefix) : y]) + "\n",
        "middle": line_prefix,
        "suffix": line_suffix + "\n" + "\n".join(lines[y + 1 : y + 1 + n_suffix]) + "\n",
        "indent": indent,
    }


def llama_vim_chunks() -> list[dict]:
    """`s:ring_get_extra`: chunks of other buffers' lines (`ring_chunk_size/2` lines: 4 here, for
    the test model's 512-token context; 32 by default); `time` is Vim's reltime()."""
    return [
        {"text": "\n".join(SOURCE[i : i + 4]) + "\n", "time": [1755000000, 123456 + i],
         "filename": "json/encoder.py"}
        for i in (300, 360)
    ]  # fmt: skip


def llama_vim_warm_up(extra: list[dict]) -> dict:
    return {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": extra,
        "prompt": "",
        "n_predict": 0,
        "temperature": 0.0,
        "samplers": [],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 1,
        "t_max_predict_ms": 1,
        "response_fields": [""],
    }


def llama_vim_fim(ctx: dict, extra: list[dict], *, first: bool) -> dict:
    return {
        "id_slot": 0,
        "input_prefix": ctx["prefix"],
        "input_suffix": ctx["suffix"],
        "input_extra": extra,
        "prompt": ctx["middle"],
        "n_predict": 128,
        "stop": [],
        "n_indent": ctx["indent"],
        "top_k": 40,
        "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 250 if first else 1000,
        "response_fields": [
            "content",
            "timings/prompt_n",
            "timings/prompt_ms",
            "timings/prompt_per_token_ms",
            "timings/prompt_per_second",
            "timings/predicted_n",
            "timings/predicted_ms",
            "timings/predicted_per_token_ms",
            "timings/predicted_per_second",
            "truncated",
            "tokens_cached",
        ],
    }


def llama_vim_accepts(raw: str) -> dict | None:
    """`s:fim_on_response`: an object whose raw text has `"content":"` (no space after the
    colon), else the answer is ignored."""
    if not re.match(r"^\s*\{", raw) or not re.search(r'"content"\s*:"', raw):
        return None
    return json.loads(raw)


def test_llama_vim_session(http):
    client, _ = http
    extra = llama_vim_chunks()
    warm = client.post("/infill", json=llama_vim_warm_up(extra))
    assert warm.status_code == 200 and warm.json() == {}
    y, x = CURSOR
    answers = []
    for typed in ("", "s", "se"):  # the cursor line as the user types
        lines = list(SOURCE)
        lines[y] = lines[y][:x] + typed + lines[y][x:]
        ctx = llama_vim_context(lines, y, x + len(typed))
        reply = client.post("/infill", json=llama_vim_fim(ctx, extra, first=not answers))
        assert reply.status_code == 200, reply.text
        response = llama_vim_accepts(reply.text)
        assert response is not None, reply.text[:200]
        answers.append(response)
    for response in answers:
        # `s:fim_render` shows the info line only when all of these are present
        for key in ("timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_second"):
            assert key in response
        for key in ("timings/predicted_n", "timings/predicted_ms", "timings/predicted_per_second"):
            assert key in response
        assert isinstance(response["content"], str) and isinstance(response["truncated"], bool)
    # the warm-up and the earlier keystrokes left their keys and values in the cache
    assert all(r["tokens_cached"] > 0 for r in answers)
    assert answers[-1]["timings/prompt_n"] < answers[-1]["tokens_cached"]


# -- llama.vscode ---------------------------------------------------------------------------------
def llama_vscode_context(lines: list[str], y: int, x: int, n_prefix=256, n_suffix=64) -> dict:
    """src/completion.ts: Utils.getPrefixLines / getSuffixLines and the cursor line."""
    line = lines[y]
    line_prefix, line_suffix = line[:x], line[x:]
    prompt = "" if re.fullmatch(r"[ \t]*", line_prefix) else line_prefix
    end = min(len(lines) - 1, y + n_suffix)
    return {
        "input_prefix": "\n".join(lines[max(0, y - n_prefix) : y]) + "\n",
        "input_suffix": line_suffix + "\n" + "\n".join(lines[y + 1 : end + 1]) + "\n",
        "prompt": prompt,
        "nindent": len(line) - len(line.lstrip()),
    }


def llama_vscode_chunks() -> list[dict]:
    """`pickChunk`: {text, time: Date.now(), filename} (4 lines here for the test model's
    512-token context; `ring_chunk_size/2` = 32 by default)."""
    return [
        {"text": "\n".join(SOURCE[i : i + 4]), "time": 1755000000000 + i,
         "filename": "/home/user/project/json/encoder.py"}
        for i in (10, 200)
    ]  # fmt: skip


def llama_vscode_payload(no_predict: bool, ctx: dict, chunks: list[dict]) -> dict:
    """createRequestPayload with the default settings (n_predict 128, t_max_prompt_ms 500,
    t_max_predict_ms 2500, max_parallel_completions 3, no LoRA, no model name)."""
    if no_predict:
        return {
            "id_slot": 0,
            "input_prefix": ctx["input_prefix"],
            "input_suffix": ctx["input_suffix"],
            "input_extra": chunks,
            "prompt": ctx["prompt"],
            "n_predict": 0,
            "samplers": [],
            "cache_prompt": True,
            "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1,
        }
    payload = {
        "id_slot": 0,
        "input_prefix": ctx["input_prefix"],
        "input_suffix": ctx["input_suffix"],
        "input_extra": chunks,
        "prompt": ctx["prompt"],
        "n_predict": 128,
        "n_cmpl": 3,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
    }
    if ctx["nindent"]:
        payload["n_indent"] = ctx["nindent"]
    return {**payload, "t_max_prompt_ms": 500, "t_max_predict_ms": 2500}


def completions_from_content(data) -> list[str]:
    """getComplFromContent: one object's content, or the distinct contents of an array."""
    if isinstance(data, dict) and "content" in data:
        return [data["content"] or ""]
    return list(dict.fromkeys(c.get("content") or "" for c in data))


def test_llama_vscode_session(http):
    client, _ = http
    chunks = llama_vscode_chunks()
    empty = {"input_prefix": "", "input_suffix": "", "prompt": "", "nindent": 0}
    prep = client.post("/infill", json=llama_vscode_payload(True, empty, chunks))
    assert prep.status_code == 200 and prep.json()["tokens_predicted"] == 0
    ctx = llama_vscode_context(SOURCE, *CURSOR)
    reply = client.post("/infill", json=llama_vscode_payload(False, ctx, chunks))
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert isinstance(data, list) and [d["index"] for d in data] == [0, 1, 2]
    completions = completions_from_content(data)
    assert len(completions) == 1  # greedy: three equal completions, generated once
    assert all(d["tokens_cached"] > 0 for d in data)  # the warm-up's chunks were reused
    assert data[0]["generation_settings"]["n_indent"] == ctx["nindent"]


# -- Tabby ----------------------------------------------------------------------------------------
TABBY_TEMPLATE = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"


def tabby_segments() -> tuple[str, str]:
    y, x = CURSOR
    prefix = "\n".join(SOURCE[y - 6 : y]) + "\n" + SOURCE[y][:x]
    suffix = SOURCE[y][x:] + "\n" + "\n".join(SOURCE[y + 1 : y + 4]) + "\n"
    return prefix, suffix


def tabby_events(response: httpx.Response, *, openai_kind: bool) -> tuple[str, bool]:
    """Tabby's loops: read events until `stop` (llama.cpp kind) or a `finish_reason` (openai
    kind), each parsed into its struct (serde ignores other fields; a non-JSON event panics).
    The text, and whether the loop ended on the marker rather than the stream's end."""
    texts = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        event = json.loads(line[len("data: ") :])
        if openai_kind:
            choice = event["choices"][0]
            assert isinstance(choice["text"], str)
            texts.append(choice["text"])
            if choice["finish_reason"] is not None:
                return "".join(texts), True
        else:
            assert isinstance(event["content"], str) and isinstance(event["stop"], bool)
            texts.append(event["content"])
            if event["stop"]:
                return "".join(texts), True
    return "".join(texts), False


def test_tabby_llamacpp_completion_kind(http):
    client, _ = http
    prefix, suffix = tabby_segments()
    request = {
        "seed": 1755000000123,  # Tabby's default seed: the current time in milliseconds
        "prompt": TABBY_TEMPLATE.format(prefix=prefix, suffix=suffix),
        "n_predict": 64,
        "temperature": 0.1,
        "stream": True,
        "penalty_last_n": 0,
        "presence_penalty": 0.0,
    }
    with client.stream("POST", "/completion", json=request) as r:
        assert r.status_code == 200
        streamed, ended = tabby_events(r, openai_kind=False)
    assert ended
    plain = client.post("/completion", json={**request, "stream": False}).json()
    assert streamed == plain["content"]
    infill = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 64}
    infill |= {"temperature": 0.1, "seed": request["seed"]}
    assert plain["content"] == client.post("/infill", json=infill).json()["content"]


def test_tabby_openai_completion_kind(http):
    client, _ = http
    prefix, suffix = tabby_segments()
    request = {
        "model": MODEL_ID,
        "prompt": prefix,
        "suffix": suffix,
        "max_tokens": 64,
        "temperature": 0.1,
        "stream": True,
        "presence_penalty": 0.0,
    }
    for body in (request, {**request, "suffix": None}):  # null: `legacy_completion_no_fim`
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            streamed, ended = tabby_events(r, openai_kind=True)
        assert ended and isinstance(streamed, str)
    # Tabby sends no seed here; with one, the streamed text is the plain answer's
    seeded = {**request, "seed": 7}
    with client.stream("POST", "/v1/completions", json=seeded) as r:
        streamed, _ = tabby_events(r, openai_kind=True)
    plain = client.post("/v1/completions", json={**seeded, "stream": False}).json()
    assert streamed == plain["choices"][0]["text"]
