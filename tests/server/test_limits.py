"""Limits a hostile or careless client runs into: huge prompts, impossible `n`, unauthenticated
bodies, slow clients, and the error text each of them gets.

Each test reproduces a fault an independent probe found: the tokenizer blocking the server on a
multi-megabyte prompt, `n` beyond the server's capacity answered 503 forever, a body read and
validated before the API key was checked, slow headers and bodies never timed out, and error
messages naming the wrong problem.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import httpx
import pytest

from codegemma import prompts
from codegemma.prompts import ContextFile

MIB = 1024 * 1024


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def record_encodes(monkeypatch, tokenizer) -> list[int]:
    """The length of every text the tokenizer is asked to encode, from now on."""
    lengths: list[int] = []
    encode = tokenizer.encode

    def recording(text, **kwargs):
        lengths.append(len(text))
        return encode(text, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", recording)
    return lengths


# -- the tokenizer must not block the server -----------------------------------------------------
def test_a_multi_megabyte_prompt_is_refused_without_tokenizing_it(serve, monkeypatch):
    with serve(max_body_bytes=8 * MIB) as (url, app):
        ctx = app.state.server.ctx
        encoded = record_encodes(monkeypatch, ctx.tokenizer)
        prompt = "def f(x):\n    return x + 1\n" * 120_000  # 3.24 MB
        replies: dict[str, httpx.Response] = {}

        def big() -> None:
            replies["big"] = httpx.post(
                url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=60
            )

        thread = threading.Thread(target=big)
        thread.start()
        health = httpx.get(url + "/health", timeout=60)
        thread.join()
        error = assert_error(replies["big"], 400, "context_length_exceeded")
        assert error["param"] == "prompt" and "characters" in error["message"]
        assert health.status_code == 200
        # at most a context's worth of characters was tokenized, never the whole prompt
        assert encoded and max(encoded) <= ctx.max_prompt_chars < len(prompt) // 100


def test_a_multi_megabyte_chat_message_is_refused_without_tokenizing_it(serve, monkeypatch):
    with serve(max_body_bytes=8 * MIB) as (url, app):
        ctx = app.state.server.ctx
        encoded = record_encodes(monkeypatch, ctx.tokenizer)
        messages = [{"role": "user", "content": "x = [1, 2, 3]\n" * 200_000}]
        reply = httpx.post(url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
        assert_error(reply, 400, "context_length_exceeded")
        assert max(encoded, default=0) <= ctx.max_prompt_chars


def test_a_multi_megabyte_fim_prefix_is_trimmed_before_tokenizing(serve, monkeypatch, tiny_cg):
    """FIM prompts are fitted, not refused: only the end of the prefix, the start of the suffix
    and the last context files can fit, so only those are tokenized; the answer is the same."""
    prefix = "import os\n\n\ndef f(x):\n    return x + 1\n" * 30_000 + "def g(y):\n    return "
    suffix = "\n\n\nprint(g(2))\n" * 20_000
    extra = [
        {"filename": "big.py", "text": "y = 2\n" * 200_000},
        {"filename": "a.py", "text": "A = 1\n"},
    ]
    request = {"input_prefix": prefix, "input_suffix": suffix, "input_extra": extra, "n_predict": 6}
    with serve(max_body_bytes=16 * MIB, max_tokens=64) as (url, app):
        ctx = app.state.server.ctx
        encoded = record_encodes(monkeypatch, ctx.tokenizer)
        reply = httpx.post(url + "/infill", json=request, timeout=60)
        assert reply.status_code == 200, reply.text
        assert max(encoded) <= ctx.max_prompt_chars
    monkeypatch.undo()
    files = [ContextFile(path=e["filename"], text=e["text"]) for e in extra]
    untrimmed = prompts.fit_infill_prompt(
        tiny_cg.tokenizer, prefix, suffix, files, budget=ctx.max_seq_len - 6
    )
    body = reply.json()
    assert body["prompt"] == tiny_cg.tokenizer.decode(untrimmed.ids)
    assert body["truncated"] is True and body["tokens_evaluated"] == len(untrimmed.ids)


# -- answers that mislead a client ---------------------------------------------------------------
def test_n_beyond_what_the_server_can_ever_hold_is_a_400_naming_the_limit(serve):
    with serve(max_batch_size=2, max_queue=2) as (url, _):
        reply = httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 5, "max_tokens": 1})
        error = assert_error(reply, 400, "invalid_value")
        assert error["param"] == "n" and "4" in error["message"]
        assert "retry-after" not in reply.headers
        ok = httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 4, "max_tokens": 1})
        assert ok.status_code == 200, ok.text


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    return sock


def _read_reply(sock: socket.socket, deadline: float = 60.0) -> bytes:
    """Everything the server sends until it closes the connection (or the deadline)."""
    data, end = b"", time.monotonic() + deadline
    while time.monotonic() < end:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if ready:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"the server did not close the connection; got {data[:300]!r}")


def _trickle(sock: socket.socket, byte: bytes, interval: float = 0.05, deadline: float = 60.0):
    """Send one byte per `interval` until the server answers; return its whole reply. A client
    this slow would need hours to finish, so only a server-side timeout ends the loop."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        ready, _, _ = select.select([sock], [], [], interval)
        if ready:
            return _read_reply(sock)
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError):
            return _read_reply(sock)
    raise AssertionError("the server never cut off the slow client")


def test_the_api_key_is_checked_before_the_body_is_validated(serve):
    with serve(api_key="k3y") as (url, _):
        bad = b"\xff" * (4 * MIB)  # not UTF-8: the body checks would answer 400
        reply = httpx.post(
            url + "/v1/completions", content=bad, headers={"content-type": "application/json"}
        )
        assert_error(reply, 401, "invalid_api_key")


def test_the_api_key_is_checked_before_the_body_is_read(serve):
    """A client announcing 4 MiB without a key gets its 401 at once: the server does not wait
    for (or read) a body it would refuse anyway."""
    with serve(api_key="k3y", body_timeout_s=120) as (url, _), _connect(url) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {4 * MIB}\r\n\r\n".encode()
        )
        reply = _read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b"invalid_api_key" in reply


def test_a_slow_body_is_cut_off_with_408(serve):
    with serve(body_timeout_s=0.5) as (url, _), _connect(url) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"prompt": "'
        )
        reply = _trickle(sock, b"a")
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"request_timeout" in reply and b"connection: close" in reply.lower()


def test_slow_headers_are_cut_off_with_408(serve):
    with serve(header_timeout_s=0.5) as (url, _), _connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        reply = _trickle(sock, b"a")
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply


def test_a_connection_that_sends_nothing_is_closed(serve):
    with serve(header_timeout_s=0.5) as (url, _), _connect(url) as sock:
        assert _read_reply(sock) == b""  # closed without a word: no request, no response


# -- error text ----------------------------------------------------------------------------------
def test_an_empty_body_says_it_is_empty_and_names_the_required_fields(server):
    headers = {"content-type": "application/json"}
    error = assert_error(httpx.post(server + "/v1/completions", content=b"", headers=headers), 400)
    assert "empty" in error["message"] and "prompt" in error["message"], error
    assert "None" not in error["message"]
    error = assert_error(httpx.post(server + "/v1/chat/completions", headers=headers), 400)
    assert "empty" in error["message"] and "messages" in error["message"], error


def test_deeply_nested_json_is_called_too_deeply_nested(server):
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    reply = httpx.post(
        server + "/v1/completions", content=deep, headers={"content-type": "application/json"}
    )
    error = assert_error(reply, 400, "invalid_json")
    assert "nested" in error["message"] and "UTF-8" not in error["message"], error


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ([-1], ["token id", "-1", "non-negative"]),
        ([[2, 3], [4, -7]], ["token id", "-7", "non-negative"]),
        ([2, 10**9], ["token id", str(10**9), "vocabulary"]),
        ([1, "a"], ["text", "token ids"]),
        (5, ["text", "token ids"]),
    ],
)
def test_bad_prompts_say_what_a_prompt_may_be(server, prompt, words):
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    reply = httpx.post(
        server + "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    error = assert_error(reply, 400)
    assert error["param"] == "prompt" and "valid string" not in error["message"], error
    for word in words:
        assert word in error["message"], error
