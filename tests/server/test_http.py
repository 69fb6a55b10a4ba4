"""Raw HTTP against a live server: /infill, SSE framing, error shapes, limits, disconnects."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

MODEL_ID = "tiny-codegemma"


@pytest.fixture(scope="module")
def http(server_app):
    url, _ = server_app
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing of every event."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [e[len("data: ") :] for e in events]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


INFILL = {
    "input_prefix": "def area(r):\n",
    "prompt": "    return ",
    "input_suffix": "\n\n\nprint(area(2))\n",
    "input_extra": [{"filename": "consts.py", "text": "PI = 3.14159\n", "time": 12}],
    "n_predict": 12,
    # llama.vscode's knobs (greedy: top_k and top_p change nothing; t_max_prompt_ms is ignored)
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "t_max_prompt_ms": 500,
}


def test_infill_is_the_library_fim_completion_with_context_files(http, tiny_cg):
    reply = http.post("/infill", json=INFILL)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = tiny_cg.complete(
        INFILL["input_prefix"] + INFILL["prompt"],
        INFILL["input_suffix"],
        files=[{"path": "consts.py", "text": "PI = 3.14159\n"}],
        max_new_tokens=12,
    )
    assert body["content"] == expected
    assert body["stop"] is True and body["model"] == MODEL_ID
    assert body["tokens_predicted"] <= 12 and body["timings"]["prompt_n"] > 10
    assert body["stop_type"] in ("eos", "word", "limit")


def test_infill_context_files_change_the_prompt(http):
    without = http.post("/infill", json={**INFILL, "input_extra": []}).json()
    assert (
        without["tokens_evaluated"] < http.post("/infill", json=INFILL).json()["tokens_evaluated"]
    )


def test_infill_stream_framing_has_no_done_marker(http):
    plain = http.post("/infill", json=INFILL).json()
    with http.stream("POST", "/infill", json={**INFILL, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(e) for e in sse_events(r.read())]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == plain["content"]


def test_infill_n_predict_zero_generates_nothing(http):
    body = http.post("/infill", json={**INFILL, "n_predict": 0}).json()
    assert body["content"] == "" and body["tokens_predicted"] == 0 and body["tokens_evaluated"] > 0


def test_completion_sse_framing_ends_with_done(http):
    request = {"prompt": "for i in", "max_tokens": 6, "stream": True, "n": 2, "seed": 3}
    with http.stream("POST", "/v1/completions", json=request) as r:
        events = sse_events(r.read())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len(
        {c["id"] for c in chunks}
    ) == 1
    finished = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert sorted(ch["index"] for ch in finished) == [0, 1]


def test_chat_sse_framing(http):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=request) as r:
        events = sse_events(r.read())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_chat_content_parts_and_developer_role(http):
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    request = {"messages": [{"role": "developer", "content": "be brief"}, parts], "max_tokens": 2}
    body = http.post("/v1/chat/completions", json=request).json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),  # no string -> int coercion
        ({"prompt": "x", "stream": 1}, "stream"),
        ({"prompt": "x", "unknown_field": True}, "unknown_field"),
        ({"prompt": "x", "model": ""}, "model"),
        ({"prompt": "\ud800"}, "prompt"),  # a lone surrogate escape
        ({"prompt": "x", "stop": ["a", ""]}, "stop"),
        ({"prompt": [], "max_tokens": 1}, "prompt"),
        ({"prompt": [1, 99999]}, "prompt"),
        ({"prompt": [1, 2], "suffix": "x"}, "suffix"),
        ({"max_tokens": 1}, "prompt"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
    ],
)
def test_malformed_completion_requests_get_400_naming_the_parameter(http, body, param):
    content = json.dumps(body).encode()  # ASCII escapes: a lone surrogate survives as \ud800
    r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param)


def test_invalid_json_and_invalid_utf8_get_400(http):
    headers = {"content-type": "application/json"}
    error = assert_openai_error(
        http.post("/v1/completions", content=b'{"prompt": ', headers=headers), 400
    )
    assert error["code"] == "invalid_json"
    error = assert_openai_error(
        http.post("/v1/completions", content=b'{"prompt": "caf\xe9"}', headers=headers), 400
    )
    assert "UTF-8" in error["message"]
    assert_openai_error(http.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_openai_error(http.post("/v1/completions", content=b"prompt=x"), 400)
    form = {"content-type": "multipart/form-data; boundary=x"}
    assert_openai_error(http.post("/v1/completions", content=b"--x--", headers=form), 400)


def test_json_without_a_json_content_type_is_accepted(http):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; llama.cpp reads it as JSON."""
    body = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": content_type} if content_type else {}
        r = http.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 200, (content_type, r.text)


def test_unknown_model_unknown_route_and_wrong_method(http):
    assert (
        assert_openai_error(http.post("/v1/completions", json={"prompt": "x", "model": "m"}), 404)[
            "code"
        ]
        == "model_not_found"
    )
    assert_openai_error(http.get("/v1/models/other"), 404, "model")
    assert_openai_error(http.get("/v2/nothing"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def test_body_size_limit(serve):
    with serve(max_body_bytes=1000) as (url, _):
        big = {"prompt": "x" * 2000}
        assert_openai_error(httpx.post(url + "/v1/completions", json=big), 413)

        def chunked():  # no Content-Length: the limit is counted while reading
            yield b'{"prompt": "'
            yield b"y" * 2000
            yield b'"}'

        r = httpx.post(
            url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        assert_openai_error(r, 413)


def test_health_models_and_metrics(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["slots_idle"] + health["slots_processing"] == 4
    assert http.get("/v1/models").json()["data"][0]["id"] == MODEL_ID
    http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
    text = http.get("/metrics").text
    for name in (
        "codegemma_requests_total",
        "codegemma_request_errors_total",
        "codegemma_queue_depth",
        "codegemma_request_latency_seconds_bucket",
        "codegemma_generated_tokens_total",
        "codegemma_step_batch_size_bucket",
    ):
        assert f"\n{name}" in text, name
    assert 'codegemma_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_an_editor_retyping_reuses_the_prefix_cache(server_app, wait_idle):
    """The same FIM request twice (a keystroke that changed nothing before the cursor): the second
    prefill takes all but the last prompt token from a free slot's cache; the answer is the same."""
    url, app = server_app
    metrics = app.state.server.metrics.scheduler
    context = "import math\n\n\ndef circle(radius):\n    return math.pi * radius**2\n\n\n" * 3
    body = {
        "prompt": context + "def area(r):\n    return ",  # long enough to be worth reusing
        "suffix": "\n",
        "max_tokens": 6,
        "temperature": 0,
    }
    wait_idle(app)
    before = metrics.cached_prompt_tokens.total()
    first = httpx.post(url + "/v1/completions", json=body).json()
    second = httpx.post(url + "/v1/completions", json=body).json()
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert metrics.cached_prompt_tokens.total() - before >= prompt_tokens - 1
    assert "\ncodegemma_prompt_tokens_cached_total" in httpx.get(url + "/metrics").text


def test_an_spm_server_builds_spm_prompts_and_reuses_nearly_all_of_them(serve, wait_idle):
    """With --fim-mode spm the suffix leads the prompt, so the next keystroke's request (one more
    character before the cursor) reuses everything up to the end of the old prefix."""
    from codegemma import prompts

    with serve(fim_mode="spm") as (url, app):
        tok = app.state.server.scheduler.engine.tokenizer
        context = "import math\n\n\ndef circle(radius):\n    return math.pi * radius**2\n\n\n" * 3
        seen = []
        engine = app.state.server.scheduler.engine
        submit = engine.submit
        engine.submit = lambda ids, *a, **k: seen.append(list(ids)) or submit(ids, *a, **k)
        for typed in ("def area(r):\n    return m", "def area(r):\n    return ma"):
            body = {"prompt": context + typed, "suffix": "\n\nprint(area(2))\n", "max_tokens": 4}
            r = httpx.post(url + "/v1/completions", json={**body, "temperature": 0})
            assert r.status_code == 200
            wait_idle(app)
        expected = prompts.fim_prompt(tok, context + typed, body["suffix"], mode="spm")
        assert seen[-1] == expected
        metrics = app.state.server.metrics.scheduler
        assert metrics.cached_prompt_tokens.total() >= len(seen[0]) - 8


def test_api_key_guards_everything_but_health(serve):
    with serve(api_key="k3y") as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        error = assert_openai_error(httpx.get(url + "/metrics"), 401)
        assert error["code"] == "invalid_api_key"
        assert_openai_error(
            httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3"}), 401
        )
        ok = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200


def pace(app, monkeypatch, seconds: float = 0.005) -> None:
    """The tiny model decodes 400 tokens in a fraction of a second: pace its steps, so a request
    is still running when the client's disconnect arrives, however fast the machine is."""
    engine = app.state.server.scheduler.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(seconds) or step())


def test_streaming_client_disconnect_frees_its_slot(serve, wait_idle, monkeypatch):
    with serve(max_tokens=400) as (url, app):
        pace(app, monkeypatch)
        request = {"prompt": "def", "max_tokens": 400, "stream": True, "temperature": 0}
        with (
            httpx.Client(base_url=url, timeout=30) as client,
            client.stream("POST", "/v1/completions", json=request) as r,
        ):
            next(r.iter_bytes())  # the stream is running; now hang up
        wait_idle(app)
        metrics = app.state.server.metrics.scheduler
        assert metrics.sequences.value(reason="cancelled") == 1
        assert metrics.generated_tokens.total() < 400


def test_plain_request_client_disconnect_is_cancelled(serve, wait_idle, monkeypatch):
    with serve(max_tokens=400) as (url, app):
        pace(app, monkeypatch)
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "def", "max_tokens": 400, "temperature": 0}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            metrics = app.state.server.metrics.scheduler
            deadline = time.monotonic() + 10
            while metrics.generated_tokens.total() < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
        wait_idle(app)
        assert metrics.sequences.value(reason="cancelled") == 1
        assert metrics.generated_tokens.total() < 400


def test_an_app_for_a_loaded_model_is_named_after_its_directory(tiny_cg):
    from codegemma.server import app_for_model

    app = app_for_model(tiny_cg)
    assert app.state.server.model_id == tiny_cg.path.name
    assert app.state.server.scheduler.engine is tiny_cg.engine
