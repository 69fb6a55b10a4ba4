"""Which models `codegemma chat` takes: instruction-tuned ones, told by the chat template their
files carry (checkpoint.not_a_chat_model), with Google's pretrained releases refused by name; a
pretrained model is refused before anything loads, naming the model to use, unless --force.
And what records it: a training checkpoint carries the template only from an SFT run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from scripted_model import ScriptedModel

from codegemma import api, cli
from codegemma.checkpoint import CHAT_MODEL, chat_template, not_a_chat_model
from codegemma.config import ModelConfig
from codegemma.engine import Engine
from codegemma.model import GemmaForCausalLM
from codegemma.train import run_checkpoint
from codegemma.train.tokenizer_trainer import GEMMA_CHAT_TEMPLATE


def model_dir(root: Path, tokenizer_dir: Path, *, template: bool) -> Path:
    """The files a model directory's chat signal is read from (weights are not looked at)."""
    root.mkdir(parents=True)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    if not template:
        config.pop("chat_template", None)
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def test_the_bundled_model_is_refused_before_it_loads(capsys, monkeypatch):
    monkeypatch.setattr("codegemma.load", lambda *a, **k: pytest.fail("loaded the model"))
    assert cli.main(["chat", "--message", "hello"]) == 2
    err = capsys.readouterr().err
    assert "the bundled model has no chat template" in err
    assert f"codegemma chat --model {CHAT_MODEL}" in err and "--force" in err


def test_force_chats_and_the_reply_has_no_repetition_loop(capsys, monkeypatch, tiny_tokenizer):
    reply = '        """\n        ' + "self.assertEqual(" * 60  # the bundled model's, to "hello"
    model = ScriptedModel(tiny_tokenizer.encode(reply) + [tiny_tokenizer.special.end_of_turn])
    cg = api.CodeGemma(config=model.config, model=model, tokenizer=tiny_tokenizer)
    cg._engine = Engine(model, tiny_tokenizer, max_batch_size=1, prefix_cache=False)
    monkeypatch.setattr("codegemma.load", lambda *a, **k: cg)
    assert cli.main(["chat", "--force", "--message", "hello", "--max-new-tokens", "256"]) == 0
    assert capsys.readouterr().out == '        """\n        self.assertEqual(\n'


@pytest.mark.slow
def test_force_chats_with_the_bundled_model(capsys):
    """The issue's case: `echo hello | codegemma chat --force` on the bundled model printed
    `self.assertEqual(` a hundred times."""
    assert cli.main(["chat", "--force", "--message", "hello", "--max-new-tokens", "96"]) == 0
    assert capsys.readouterr().out.count("self.assertEqual(") <= 1


def test_official_hugging_face_directories(tmp_path, tiny_tokenizer_dir):
    """Snapshots in the Hugging Face cache are named by their repo: Google's pretrained
    releases are no chat models even with a template in their files; the -it release is."""
    hub = tmp_path / "hub"
    for repo in ("codegemma-2b", "codegemma-7b", "codegemma-1.1-2b", "codegemma-7b-it"):
        snapshot = hub / f"models--google--{repo}" / "snapshots" / "0123abc"
        path = model_dir(snapshot, tiny_tokenizer_dir, template=True)
        problem = not_a_chat_model(f"google/{repo}", path)
        if repo.endswith("-it"):
            assert problem is None
        else:
            assert problem and "pretrained code-completion model" in problem
    local = model_dir(tmp_path / "codegemma-2b", tiny_tokenizer_dir, template=True)
    assert not_a_chat_model(str(local), local)  # downloaded with --local-dir: named by directory


def test_a_model_directory_is_a_chat_model_when_it_carries_a_chat_template(
    tmp_path, tiny_tokenizer_dir
):
    plain = model_dir(tmp_path / "pretrained", tiny_tokenizer_dir, template=False)
    assert chat_template(plain) is None
    assert "no chat template" in not_a_chat_model("pretrained", plain)
    tuned = model_dir(tmp_path / "tuned", tiny_tokenizer_dir, template=True)
    assert "<start_of_turn>" in chat_template(tuned) and not_a_chat_model("t", tuned) is None
    jinja = model_dir(tmp_path / "jinja", tiny_tokenizer_dir, template=False)
    (jinja / "chat_template.jinja").write_text(GEMMA_CHAT_TEMPLATE)  # transformers' newer file
    assert not_a_chat_model("j", jinja) is None
    named = model_dir(tmp_path / "named", tiny_tokenizer_dir, template=False)
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": GEMMA_CHAT_TEMPLATE}]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    assert not_a_chat_model("n", named) is None


def test_ollama_models_are_told_by_their_template_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    templates = {
        "7b-instruct": "<start_of_turn>user\n{{ .Prompt }}<end_of_turn>\n<start_of_turn>model\n",
        "7b-code": "<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>",
    }
    for tag, template in templates.items():
        digest = f"{tag.encode().hex():0<64}"
        (tmp_path / "blobs").mkdir(exist_ok=True)
        (tmp_path / "blobs" / f"sha256-{digest}").write_text(template)
        manifest = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "codegemma" / tag
        manifest.parent.mkdir(parents=True, exist_ok=True)
        layer = {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{digest}"}
        manifest.write_text(json.dumps({"layers": [layer]}))
    assert not_a_chat_model("ollama:codegemma:7b-instruct", tmp_path) is None
    assert "code-completion" in not_a_chat_model("ollama:codegemma:7b-code", tmp_path)
    assert not_a_chat_model("ollama:codegemma:2b", tmp_path)  # no such manifest: no template


@pytest.mark.parametrize("chat", [False, True])
def test_a_training_checkpoint_carries_the_template_only_from_sft(
    tmp_path, tiny_tokenizer_dir, chat
):
    config = ModelConfig.preset("tiny")
    with torch.device("meta"):
        state = GemmaForCausalLM(config).state_dict()
    state = {k: torch.zeros(v.shape) for k, v in state.items()}
    saved = run_checkpoint.save_checkpoint(
        tmp_path / "run",
        1,
        model_state=state,
        model_config=config,
        trainer_state={"step": 1},
        tokenizer_dir=tiny_tokenizer_dir,
        keep=1,
        chat=chat,
    )
    model = saved / run_checkpoint.MODEL
    assert (chat_template(model) == GEMMA_CHAT_TEMPLATE) is chat
    assert (not_a_chat_model("run", model) is None) is chat
    shutil.rmtree(tmp_path / "run")
