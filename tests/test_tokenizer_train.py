"""Tokenizer training: Gemma's id layout, Gemma's tokenizer.json pipeline, transformers parity, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from tiny_corpus_texts import TINY_CORPUS, tiny_corpus

from codegemma.tokenizer import Tokenizer
from codegemma.train.tokenizer_trainer import (
    BYTE_TOKENS,
    FIRST_LEARNED_ID,
    TokenizerTrainingError,
    register,
    train_sentencepiece,
    train_tokenizer,
)

LAYOUT = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    5: "[multimodal]",
    6: "<unused0>",
    66: "<unused60>",
    67: "<|fim_prefix|>",
    68: "<|fim_middle|>",
    69: "<|fim_suffix|>",
    70: "<|file_separator|>",
    71: "<unused61>",
    105: "<unused95>",
    106: "<start_of_turn>",
    107: "<end_of_turn>",
    108: "<0x00>",
    173: "<0x41>",
    363: "<0xFF>",
}
CODE_SAMPLES = (
    "import os\n\n\ndef main():\n    print(os.getcwd())  # cwd\n",
    "class A:\n    def f(self, x):\n        return [x ** 2 for x in range(10)]\n",
    "s = 'naïve café 日本 🎉'\n",
    "\tindented_with_tab = {1: 'a'}\n\n\n",
)


def test_layout_of_both_kinds(tiny_tokenizer: Tokenizer, tiny_sp_tokenizer: Tokenizer) -> None:
    for tok in (tiny_tokenizer, tiny_sp_tokenizer):
        assert {i: tok.id_to_token(i) for i in LAYOUT} == LAYOUT
        assert [tok.id_to_token(108 + b) for b in range(256)] == list(BYTE_TOKENS)
        learned = [tok.id_to_token(i) for i in range(FIRST_LEARNED_ID, tok.vocab_size)]
        assert "▁▁▁▁" in learned and "return" in "".join(learned)
    assert tiny_tokenizer.vocab_size == 512


def test_tokenizer_json_mirrors_gemmas(tiny_tokenizer_dir: Path) -> None:
    data = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    assert data["pre_tokenizer"] is None
    model = data["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is True
    assert model["unk_token"] == "<unk>" and model["fuse_unk"] is True
    assert len(model["vocab"]) == 512 and model["merges"]
    assert [d["type"] for d in data["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse"]
    assert data["post_processor"]["type"] == "TemplateProcessing"
    added = {t["id"]: t["content"] for t in data["added_tokens"]}
    assert all(added[i] == tok for i, tok in LAYOUT.items() if i < 108)
    cfg = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "GemmaTokenizerFast"
    assert (cfg["add_bos_token"], cfg["add_eos_token"]) == (True, False)
    assert "<start_of_turn>" in cfg["chat_template"]
    special_map = json.loads((tiny_tokenizer_dir / "special_tokens_map.json").read_text())
    assert special_map["bos_token"] == "<bos>" and special_map["pad_token"] == "<pad>"


def test_transformers_autotokenizer_agrees(
    tiny_tokenizer_dir: Path, tiny_tokenizer: Tokenizer
) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 1, 0)
    for text in (*CODE_SAMPLES, *TINY_CORPUS):
        ids = tiny_tokenizer.encode(text, bos=True)
        assert hf.encode(text) == ids
        assert hf.decode(ids[1:]) == text
    assert hf.convert_tokens_to_ids("<|fim_middle|>") == 68


def test_vocab_size_too_small_is_explained(tmp_path: Path) -> None:
    for bad in (364, 100, "512"):
        with pytest.raises(TokenizerTrainingError, match="vocab_size > 364"):
            train_tokenizer(["x = 1"], bad, tmp_path)  # type: ignore[arg-type]
        with pytest.raises(TokenizerTrainingError, match="vocab_size > 364"):
            train_sentencepiece(["x = 1"], bad, tmp_path)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_smallest_vocab_and_padding(tmp_path: Path) -> None:
    # A tiny corpus cannot fill 600 ids: the rest is padded with reserved <unusedN> tokens.
    tok = Tokenizer.load(train_tokenizer(["ab ab ab", "ab ab"], 600, tmp_path / "a"))
    assert tok.vocab_size == 600
    assert tok.id_to_token(599).startswith("<unused") and 599 in tok.special_ids
    assert tok.decode(tok.encode("ab ab!")) == "ab ab!"
    tok = Tokenizer.load(train_tokenizer(tiny_corpus(), 365, tmp_path / "b"))
    assert tok.vocab_size == 365


def test_empty_corpus_and_bad_texts(tmp_path: Path) -> None:
    with pytest.raises(TokenizerTrainingError, match="no training text"):
        train_tokenizer([], 512, tmp_path)
    with pytest.raises(TokenizerTrainingError, match="no training text"):
        train_sentencepiece(["", ""], 512, tmp_path)
    with pytest.raises(TokenizerTrainingError, match="must be str"):
        train_tokenizer(["ok", 5], 512, tmp_path)  # type: ignore[list-item]


def test_training_is_deterministic_and_atomic(
    tmp_path: Path, tiny_tokenizer_dir: Path, tiny_sp_tokenizer_dir: Path
) -> None:
    again = train_tokenizer(iter(tiny_corpus()), 512, tmp_path / "json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes()
    sp = train_sentencepiece(iter(tiny_corpus()), 512, tmp_path / "sp")
    assert (sp / "tokenizer.model").read_bytes() == (
        tiny_sp_tokenizer_dir / "tokenizer.model"
    ).read_bytes()
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def test_sentencepiece_has_no_dummy_prefix(tiny_sp_tokenizer: Tokenizer) -> None:
    sp = tiny_sp_tokenizer._backend.sp
    assert [sp.id_to_piece(i) for i in sp.encode("x")] == ["x"]
    assert sp.encode("<|fim_middle|>") == [68]  # raw sentencepiece matches it; our encode must not
    assert 68 not in tiny_sp_tokenizer.encode("<|fim_middle|>")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="codegemma")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_trains_from_directories_and_files(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "repo"
    (corpus / "pkg").mkdir(parents=True)
    (corpus / ".git").mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / "pkg" / f"m{i}.py").write_text(text * 3, encoding="utf-8")
    (corpus / ".git" / "config.txt").write_text("[core]\n")
    (corpus / "pkg" / "bad.py").write_bytes(b"\xff\xfe\x00broken")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    extra = tmp_path / "NOTES"  # named explicitly: read whatever its extension
    extra.write_text("notes about the code\n")
    out = tmp_path / "tok"
    rc = _cli(
        ["tokenizer", "train", str(corpus), str(extra), "--vocab-size", "512", "--out", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"trained on {len(TINY_CORPUS) + 1} file(s), skipped 1 undecodable" in printed
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 512 and tok.special.fim_middle == 68
    rc = _cli(
        [
            "tokenizer",
            "train",
            str(corpus),
            "--vocab-size",
            "512",
            "--out",
            str(tmp_path / "sp"),
            "--kind",
            "sentencepiece",
        ]
    )
    assert rc == 0 and Tokenizer.load(tmp_path / "sp").kind == "tokenizer.model"


def test_cli_reports_bad_arguments(tmp_path: Path, capsys) -> None:
    assert (
        _cli(
            [
                "tokenizer",
                "train",
                str(tmp_path / "missing"),
                "--vocab-size",
                "512",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
    (tmp_path / "a.py").write_text("x = 1\n")
    assert (
        _cli(
            [
                "tokenizer",
                "train",
                str(tmp_path),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "vocab_size > 364" in capsys.readouterr().err
