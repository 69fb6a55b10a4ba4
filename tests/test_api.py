"""Public API (`codegemma.load`) and the command line, over a tiny checkpoint directory."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import codegemma
from codegemma.cli import main, split_at_cursor
from codegemma.config import ModelConfig


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_load_exposes_config_model_tokenizer(model_dir):
    cg = codegemma.load(model_dir, device="cpu")
    assert cg.config == ModelConfig.load(model_dir)
    ids = torch.tensor([cg.tokenizer.encode("def f(x):", bos=True)])
    assert cg.model(ids).shape == (1, ids.shape[1], cg.config.vocab_size)
    assert cg.tokenizer.decode(cg.tokenizer.encode("x = 1")) == "x = 1"
    assert isinstance(cg.complete("def f(x):\n    return ", "\n", max_new_tokens=8), str)
    assert cg.complete_batch(
        [{"prefix": "a = ", "suffix": ""}, {"prefix": "b", "suffix": ")"}], max_new_tokens=4
    ) == [cg.complete("a = ", "", max_new_tokens=4), cg.complete("b", ")", max_new_tokens=4)]


def test_load_with_dtype(model_dir):
    cg = codegemma.load(model_dir, dtype="bfloat16", device="cpu")
    assert cg.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(cg.generate("import os\n", max_new_tokens=4), str)


def test_greedy_completion_equals_transformers_on_the_same_directory(model_dir):
    cg = codegemma.load(model_dir, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = cg.tokenizer.encode("def add(a, b):\n    return a", bos=True)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
    ours = cg.generate_results([ids], max_new_tokens=20, stop_token_ids=frozenset())[0]
    assert ours.token_ids == out
    # random weights emit invalid UTF-8 byte runs, which tokenizers' ByteFallback replaces byte by
    # byte and Python's codec per sequence: compare text with our decode, ids with transformers'
    assert ours.text == cg.tokenizer.decode(out, skip_special=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert hf_tok("def add(a, b):\n    return a")["input_ids"] == ids


def test_load_refuses_a_missing_model(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        codegemma.load(tmp_path / "nowhere")


def test_cli_complete_prefix_suffix(model_dir, capsys):
    assert (
        main(
            [
                "complete",
                "--model",
                str(model_dir),
                "--prefix",
                "def f(x):\\n    return ",
                "--suffix",
                "\\n",
                "--max-new-tokens",
                "6",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    cg = codegemma.load(model_dir, device="cpu")
    expected = cg.complete("def f(x):\n    return ", "\n", max_new_tokens=6)
    assert capsys.readouterr().out == expected + ("" if expected.endswith("\n") else "\n")


def test_cli_complete_file_line_column(model_dir, tmp_path, capsys):
    src = tmp_path / "app.py"
    src.write_text("def f(x):\n    return x\n\nprint(f(1))\n")
    assert (
        main(
            [
                "complete",
                "--model",
                str(model_dir),
                "--file",
                str(src),
                "--line",
                "2",
                "--column",
                "13",
                "--max-new-tokens",
                "4",
                "--show",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("def f(x):\n    return x") and out.endswith("print(f(1))\n\n")


def test_cli_errors_are_reported_not_raised(model_dir, tmp_path, capsys):
    src = tmp_path / "a.py"
    src.write_text("x = 1\n")
    assert (
        main(
            [
                "complete",
                "--model",
                str(model_dir),
                "--file",
                str(src),
                "--line",
                "9",
                "--column",
                "1",
            ]
        )
        == 2
    )
    assert "--line 9 is outside the file" in capsys.readouterr().err
    assert main(["complete", "--model", str(tmp_path / "missing"), "--prefix", "x"]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_info(model_dir, capsys):
    assert main(["info", "--model", str(model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == ModelConfig.preset("tiny").num_parameters
    assert info["attention"] == "GQA" and info["config"]["model_type"] == "gemma"


def test_split_at_cursor():
    text = "ab\ncd\n"
    assert split_at_cursor(text, 1, 1) == ("", text)
    assert split_at_cursor(text, 2, 2) == ("ab\nc", "d\n")
    assert split_at_cursor(text, 3, 1) == ("ab\ncd\n", "")
    with pytest.raises(ValueError, match="column"):
        split_at_cursor(text, 1, 4)
