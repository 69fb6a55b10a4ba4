"""The command line's one error format, and `codegemma info` checking what `complete` checks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from codegemma.cli import main

ERROR = re.compile(r"\Acodegemma [a-z -]+: error: .+", re.DOTALL)


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `codegemma argv`, whether argparse or a command fails."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# Each command given one option value it cannot take: argparse's type check or the check of the
# settings dataclass the flags come from.
BAD_OPTIONS = {
    "complete": ["complete", "--prefix", "x", "--max-new-tokens", "many"],
    "complete (value)": ["complete", "--prefix", "x", "--temperature", "-1"],
    "chat": ["chat", "--message", "hi", "--top-p", "lots"],
    "info": ["info", "--model"],
    "tokenizer": ["tokenizer", "train", "src", "--vocab-size", "big", "--out", "o"],
    "data": ["data", "prepare", "src", "--out", "o", "--tokenizer", "t", "--seq-len", "long"],
    "eval": ["eval", "run", "humaneval", "--limit", "few"],
    "eval (task set)": ["eval", "run", "no-such-taskset"],
    "train": ["train", "--max-steps", "ten"],
    "train (value)": ["train", "--preset", "tiny", "--data", "d", "--run-dir", "r", "--lr", "-1"],
    "serve": ["serve", "--port", "eighty"],
}


@pytest.mark.parametrize("argv", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_a_bad_option_value_fails_in_the_one_format(argv, capsys):
    code, err = run(argv, capsys)
    assert code == 2
    assert ERROR.match(err), err
    assert "Traceback" not in err


def test_errors_carry_their_fix_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    code, err = run(["complete", "--model", missing, "--prefix", "x"], capsys)
    assert code == 2 and ERROR.match(err) and "nowhere" in err
    with pytest.raises(Exception, match="nowhere"):
        main(["--debug", "complete", "--model", missing, "--prefix", "x"])


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_info_reports_the_tokenizer_of_a_good_model(tiny_model_dir, capsys):
    assert main(["info", "--model", str(tiny_model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokenizer"]["special_ids"]["fim_middle"] == 68
    assert info["tokenizer"]["vocab_size"] <= info["config"]["vocab_size"]


def test_info_refuses_a_config_that_disagrees_with_the_weights(model_copy, capsys):
    # the probe's case: vocab_size 9000 in config.json over a smaller embedding
    _edit_json(model_copy / "config.json", vocab_size=9000)
    code, err = run(["info", "--model", str(model_copy)], capsys)
    assert code == 2 and ERROR.match(err)
    assert "embed_tokens" in err and "9000" in err


@pytest.mark.parametrize("breakage", ["missing", "unparsable", "no FIM tokens", "too large"])
def test_info_refuses_a_tokenizer_complete_could_not_use(model_copy, breakage, capsys):
    tok = model_copy / "tokenizer.json"
    if breakage == "missing":
        tok.unlink()
        (model_copy / "tokenizer.model").unlink(missing_ok=True)
    elif breakage == "unparsable":
        tok.write_text("{not json")
    elif breakage == "no FIM tokens":
        tok.write_text(tok.read_text().replace("<|fim_middle|>", "<|fim_mid|>"))
    else:  # weights and config agree, but the embedding has fewer rows than there are tokens
        from codegemma.checkpoint import save_model
        from codegemma.config import ModelConfig
        from codegemma.model import GemmaForCausalLM

        model = GemmaForCausalLM(ModelConfig.preset("tiny", vocab_size=400)).init_weights(seed=0)
        save_model(model, model.config, model_copy)
    code, err = run(["info", "--model", str(model_copy)], capsys)
    assert code == 2 and ERROR.match(err), err
    expected = {
        "missing": "tokenizer",
        "unparsable": "tokenizer.json",
        "no FIM tokens": "fim_middle",
        "too large": "vocab_size",
    }[breakage]
    assert expected in err
