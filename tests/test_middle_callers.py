"""One rule, every caller: for the same model output, the command line, `codegemma.load(...)`, the
server's three FIM protocols (OpenAI `suffix`, the textual FIM prompt Continue sends, llama.cpp
`/infill`) and the evaluation's single-line infilling give the same middle.

"The model" is scripted: it writes a fixed token sequence after any prompt, so every caller sees
exactly the same raw text and only the post-processing can differ.
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


@pytest.fixture
def scripted(tiny_tokenizer):
    tok = tiny_tokenizer
    script = tok.encode(RAW) + [tok.special.eos]
    model = ScriptedModel(script)
    cg = api.CodeGemma(config=model.config, model=model, tokenizer=tok)
    cg._engine = Engine(model, tok, max_batch_size=1, prefix_cache=False)
    return cg


def expected_middle() -> str:
    return middle.clean(RAW, middle.FimRequest(prefix=PREFIX, suffix=SUFFIX))


def test_the_rule_itself():
    assert expected_middle() == "w, h"


def test_api_and_cli(scripted, monkeypatch, capsys):
    assert scripted.complete(PREFIX, SUFFIX, max_new_tokens=64) == expected_middle()
    monkeypatch.setattr("codegemma.load", lambda *a, **k: scripted)
    assert cli.main(["complete", "--prefix", PREFIX, "--suffix", SUFFIX]) == 0
    assert capsys.readouterr().out == expected_middle() + "\n"


def test_server_protocols(scripted):
    app = create_app(scripted.engine, ServerSettings(served_model_name="scripted", max_tokens=64))
    with TestClient(app) as client:
        openai = client.post(
            "/v1/completions",
            json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 64, "temperature": 0},
        )
        textual = client.post(
            "/v1/completions",
            json={
                "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
                "max_tokens": 64,
                "temperature": 0,
            },
        )
        infill = client.post(
            "/infill",
            json={
                "input_prefix": PREFIX,
                "input_suffix": SUFFIX,
                "n_predict": 64,
                "temperature": 0,
            },
        )
        streamed = client.post(
            "/v1/completions",
            json={
                "prompt": PREFIX,
                "suffix": SUFFIX,
                "max_tokens": 64,
                "temperature": 0,
                "stream": True,
            },
        )
    assert openai.json()["choices"][0]["text"] == expected_middle()
    assert textual.json()["choices"][0]["text"] == expected_middle()
    assert infill.json()["content"] == expected_middle()
    events = [
        json.loads(line.removeprefix("data: "))
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(e["choices"][0]["text"] for e in events) == expected_middle()


def test_evaluation(scripted):
    task = Task(
        task_id="SingleLineInfilling/HumanEval/0/L0",
        prompt=PREFIX,
        suffix=SUFFIX,
        canonical_solution="w, h\n",
        test="def check(f):\n    assert f(2, 3) == 6\n",
        entry_point="area",
        kind="infilling",
    )
    (raw,) = CodeGemmaGenerator(scripted).infill(
        [(task.prompt, task.suffix)], stop=(), max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0
    )
    assert raw == RAW
    # the benchmark's middle is a whole line: the same rule's line, with its newline kept
    assert stop_output(task, raw) == expected_middle() + "\n"
