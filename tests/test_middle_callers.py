"""One rule, every caller: for the same model output, the command line, `codegemma.load(...)`, the
server's FIM protocols (OpenAI `suffix`, the textual FIM prompt Continue sends, llama.cpp
`/infill`, Ollama's `/api/generate` with `suffix`, streamed or not) and the evaluation's
single-line infilling give the same middle.

"The model" is scripted: it writes a fixed token sequence after any prompt, so every caller sees
exactly the same raw text and only the post-processing can differ. Two outputs: one that runs
past the line into code an editor must not insert, and one that falls into a repetition loop.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from scripted_model import ScriptedModel

from codegemma import api, cli, middle
from codegemma.engine import Engine
from codegemma.eval.runner import CodeGemmaGenerator, stop_output
from codegemma.eval.tasks import Task
from codegemma.server import ServerSettings, create_app

PREFIX = "def area(w, h):\n    total = mul("
SUFFIX = ")\n    return total\n"  # the cursor is mid-line: single-line mode
# What the model writes: the line's rest, then more lines an editor must not insert.
RAW = "w, h\n    return total\n\nprint(area(2, 3))\n"
LOOP = "w, h" + ", h" * 60  # a weak model's loop, on the cursor's line
OUTPUTS = {"past the line": RAW, "a repetition loop": LOOP}


@pytest.fixture(params=OUTPUTS.values(), ids=OUTPUTS.keys())
def raw(request):
    return request.param


@pytest.fixture
def scripted(tiny_tokenizer, raw):
    tok = tiny_tokenizer
    script = tok.encode(raw) + [tok.special.eos]
    model = ScriptedModel(script)
    cg = api.CodeGemma(config=model.config, model=model, tokenizer=tok)
    cg._engine = Engine(model, tok, max_batch_size=1, prefix_cache=False)
    return cg


def expected_middle(raw: str = RAW) -> str:
    return middle.clean(raw, middle.FimRequest(prefix=PREFIX, suffix=SUFFIX))


def test_the_rule_itself():
    assert expected_middle(RAW) == "w, h"
    assert expected_middle(LOOP) == "w, h"


def test_api_and_cli(scripted, raw, monkeypatch, capsys):
    assert scripted.complete(PREFIX, SUFFIX, max_new_tokens=256) == expected_middle(raw)
    monkeypatch.setattr("codegemma.load", lambda *a, **k: scripted)
    assert cli.main(["complete", "--prefix", PREFIX, "--suffix", SUFFIX]) == 0
    assert capsys.readouterr().out == expected_middle(raw) + "\n"


def test_server_protocols(scripted, raw):
    app = create_app(scripted.engine, ServerSettings(served_model_name="scripted", max_tokens=256))
    with TestClient(app) as client:
        openai = client.post(
            "/v1/completions",
            json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 256, "temperature": 0},
        )
        textual = client.post(
            "/v1/completions",
            json={
                "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
                "max_tokens": 256,
                "temperature": 0,
            },
        )
        infill = client.post(
            "/infill",
            json={
                "input_prefix": PREFIX,
                "input_suffix": SUFFIX,
                "n_predict": 256,
                "temperature": 0,
            },
        )
        streamed = client.post(
            "/v1/completions",
            json={
                "prompt": PREFIX,
                "suffix": SUFFIX,
                "max_tokens": 256,
                "temperature": 0,
                "stream": True,
            },
        )
        ollama = {
            "model": "scripted",
            "prompt": PREFIX,
            "suffix": SUFFIX,
            "options": {"temperature": 0, "num_predict": 256},
        }
        ollama_plain = client.post("/api/generate", json={**ollama, "stream": False})
        ollama_streamed = client.post("/api/generate", json=ollama)  # Ollama streams by default
    assert openai.json()["choices"][0]["text"] == expected_middle(raw)
    assert textual.json()["choices"][0]["text"] == expected_middle(raw)
    assert infill.json()["content"] == expected_middle(raw)
    events = [
        json.loads(line.removeprefix("data: "))
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(e["choices"][0]["text"] for e in events) == expected_middle(raw)
    assert ollama_plain.json()["response"] == expected_middle(raw)
    lines = [json.loads(line) for line in ollama_streamed.text.splitlines()]
    assert "".join(line["response"] for line in lines) == expected_middle(raw)
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"


def test_evaluation(scripted, raw):
    task = Task(
        task_id="SingleLineInfilling/HumanEval/0/L0",
        prompt=PREFIX,
        suffix=SUFFIX,
        canonical_solution="w, h\n",
        test="def check(f):\n    assert f(2, 3) == 6\n",
        entry_point="area",
        kind="infilling",
    )
    (out,) = CodeGemmaGenerator(scripted).infill(
        [(task.prompt, task.suffix)],
        stop=(),
        max_new_tokens=256,
        temperature=0.0,
        top_p=1.0,
        seed=0,
    )
    assert out == raw
    # the benchmark's middle is a whole line: the same rule's line, with its newline kept; a loop
    # stays in it (the benchmark scores the model's own line, as its published protocol does:
    # editor post-processing would change what it measures)
    line = expected_middle(raw) if raw == RAW else middle.first_line(raw)
    assert stop_output(task, out) == line + "\n"


CHAT_LOOP = (
    '        """\n        ' + "self.assertEqual(" * 60
)  # the bundled model's reply to "hello"


@pytest.fixture
def scripted_chat(tiny_tokenizer):
    tok = tiny_tokenizer
    model = ScriptedModel(tok.encode(CHAT_LOOP) + [tok.special.end_of_turn])
    cg = api.CodeGemma(config=model.config, model=model, tokenizer=tok)
    cg._engine = Engine(model, tok, max_batch_size=1, prefix_cache=False)
    return cg


def test_chat_replies_lose_a_repetition_loop_everywhere(scripted_chat):
    """`codegemma.load(...).chat` (what `codegemma chat` prints), OpenAI's chat route and
    Ollama's, streamed or not: the reply ends after the loop's first copy."""
    expected = middle.cut_repetition(CHAT_LOOP)
    assert expected == '        """\n        self.assertEqual('
    messages = [{"role": "user", "content": "hello"}]
    assert scripted_chat.chat(messages, max_new_tokens=256) == expected
    settings = ServerSettings(served_model_name="scripted", max_tokens=256)
    with TestClient(create_app(scripted_chat.engine, settings)) as client:
        body = {"messages": messages, "temperature": 0}
        openai = client.post("/v1/chat/completions", json=body)
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        ollama = client.post(
            "/api/chat",
            json={"model": "scripted", "messages": messages, "options": {"temperature": 0}},
        )
    assert openai.json()["choices"][0]["message"]["content"] == expected
    assert openai.json()["choices"][0]["finish_reason"] == "stop"
    events = [
        json.loads(line.removeprefix("data: "))
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
    lines = [json.loads(line) for line in ollama.text.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == expected
    assert lines[-1]["done_reason"] == "stop"
