"""Prompt layouts: FIM PSM/SPM, multi-file context, Gemma chat; sentinels cannot be injected."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegemma.prompts import (
    ContextFile,
    FimMode,
    PromptError,
    chat_example,
    chat_prompt,
    chat_stop_ids,
    file_tokens,
    fim_example,
    fim_prompt,
    fim_stop_ids,
    fold_system,
    join_files,
)
from codegemma.tokenizer import SPECIAL_STRINGS, Tokenizer

BOS, EOS, PRE, MID, SUF, SEP, SOT, EOT = 2, 1, 67, 68, 69, 70, 106, 107
fragments = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=10),
    st.sampled_from((*SPECIAL_STRINGS.values(), "<mask>", "<unused7>", "🎉", "日本", "\n", "    ")),
)
texts = st.lists(fragments, max_size=5).map("".join)


def _split_on(ids: list[int], sentinels: set[int]) -> tuple[list[int], list[list[int]]]:
    """Positions of sentinel ids and the id runs between them."""
    marks, runs, run = [], [], []
    for i in ids:
        if i in sentinels:
            marks.append(i)
            runs.append(run)
            run = []
        else:
            run.append(i)
    return marks, [*runs, run]


def test_psm_and_spm_layouts(any_tokenizer: Tokenizer) -> None:
    tok = any_tokenizer
    p, s = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    assert fim_prompt(tok, p, s) == [BOS, PRE, *tok.encode(p), SUF, *tok.encode(s), MID]
    assert fim_prompt(tok, p, s, mode=FimMode.SPM, bos=False) == [
        PRE,
        SUF,
        *tok.encode(s),
        MID,
        *tok.encode(p),
    ]
    assert fim_prompt(tok, p, s, mode="spm") == fim_prompt(tok, p, s, mode=FimMode.SPM)
    assert (
        tok.decode(fim_prompt(tok, p, s))
        == f"<bos><|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>"
    )


def test_empty_prefix_and_suffix(any_tokenizer: Tokenizer) -> None:
    assert fim_prompt(any_tokenizer, "", "") == [BOS, PRE, SUF, MID]
    assert fim_prompt(any_tokenizer, "", "", mode="spm") == [BOS, PRE, SUF, MID]
    assert fim_prompt(any_tokenizer, "x", "", bos=False) == [
        PRE,
        *any_tokenizer.encode("x"),
        SUF,
        MID,
    ]
    assert fim_example(any_tokenizer, "", "", "", mode="psm") == [PRE, SUF, MID]


def test_path_and_context_files(any_tokenizer: Tokenizer) -> None:
    tok = any_tokenizer
    files = (
        ContextFile(path="utils.py", text="def helper():\n    pass\n"),
        ContextFile(path="b.py", text=""),
    )
    ids = fim_prompt(tok, "x = ", "\n", path="main.py", files=files)
    expected = [
        BOS,
        *tok.encode("utils.py\n"),
        *tok.encode(files[0].text),
        SEP,
        *tok.encode("b.py\n"),
        SEP,
        *tok.encode("main.py\n"),
        PRE,
        *tok.encode("x = "),
        SUF,
        *tok.encode("\n"),
        MID,
    ]
    assert ids == expected
    assert tok.decode(ids) == (
        "<bos>utils.py\ndef helper():\n    pass\n<|file_separator|>b.py\n<|file_separator|>"
        "main.py\n<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>"
    )


def test_fim_example_layouts(any_tokenizer: Tokenizer) -> None:
    tok = any_tokenizer
    p, m, s = "def f(x):\n    ", "return x + 1", "\n"
    enc = tok.encode
    psm = [PRE, *enc(p), SUF, *enc(s), MID, *enc(m)]
    assert fim_example(tok, p, m, s, mode=FimMode.PSM) == psm
    assert fim_example(tok, p, m, s, mode="spm") == [PRE, SUF, *enc(s), MID, *enc(p), *enc(m)]
    # The training example continues the inference prompt token for token.
    assert psm[: len(psm) - len(enc(m))] == fim_prompt(tok, p, s, bos=False)
    spm = fim_example(tok, p, m, s, mode="spm")
    assert spm[: len(spm) - len(enc(m))] == fim_prompt(tok, p, s, mode="spm", bos=False)


def test_files_join_and_stop_ids(any_tokenizer: Tokenizer) -> None:
    tok = any_tokenizer
    a = file_tokens(tok, "a.py", tok.encode("x = 1\n"))
    assert a == tok.encode("a.py\n") + tok.encode("x = 1\n")
    b = file_tokens(tok, "b.py", [])
    assert join_files(tok, [a, b]) == [*a, SEP, *b]
    assert join_files(tok, [a]) == a and join_files(tok, []) == []
    assert fim_stop_ids(tok) == {PRE, MID, SUF, SEP, EOS}
    assert chat_stop_ids(tok) == {EOT, EOS}


def test_bad_mode_and_files(any_tokenizer: Tokenizer) -> None:
    with pytest.raises(PromptError, match="unknown FIM mode 'pms'"):
        fim_prompt(any_tokenizer, "a", "b", mode="pms")
    with pytest.raises(PromptError, match="ContextFile"):
        fim_prompt(any_tokenizer, "a", "b", files=[("a.py", "x")])  # type: ignore[list-item]


@settings(max_examples=80, deadline=None)
@given(prefix=texts, suffix=texts, mode=st.sampled_from(list(FimMode)))
def test_fim_text_survives_and_sentinels_cannot_be_injected(
    any_tokenizer: Tokenizer, prefix: str, suffix: str, mode: FimMode
) -> None:
    tok = any_tokenizer
    ids = fim_prompt(tok, prefix, suffix, mode=mode)
    marks, runs = _split_on(ids, set(tok.special_ids))
    if mode is FimMode.PSM:
        assert marks == [BOS, PRE, SUF, MID]
        assert [tok.decode(r) for r in runs] == ["", "", prefix, suffix, ""]
    else:
        assert marks == [BOS, PRE, SUF, MID]
        assert [tok.decode(r) for r in runs] == ["", "", "", suffix, prefix]


@settings(max_examples=40, deadline=None)
@given(prefix=texts, middle=texts, suffix=texts, path=texts, ctx=texts)
def test_fim_example_and_context_injection(
    any_tokenizer: Tokenizer, prefix: str, middle: str, suffix: str, path: str, ctx: str
) -> None:
    tok = any_tokenizer
    marks, runs = _split_on(fim_example(tok, prefix, middle, suffix, mode="psm"), tok.special_ids)
    assert marks == [PRE, SUF, MID]
    assert [tok.decode(r) for r in runs] == ["", prefix, suffix, middle]
    ids = fim_prompt(tok, prefix, suffix, path="p.py", files=[ContextFile(path=path, text=ctx)])
    marks, runs = _split_on(ids, tok.special_ids)
    assert marks == [BOS, SEP, PRE, SUF, MID]
    assert [tok.decode(r) for r in runs] == ["", f"{path}\n{ctx}", "p.py\n", prefix, suffix, ""]


def test_chat_prompt_matches_gemma_template(any_tokenizer: Tokenizer) -> None:
    tok = any_tokenizer
    msgs = [
        {"role": "user", "content": "Write fib"},
        {"role": "assistant", "content": "def fib"},
        {"role": "user", "content": "  Thanks \n"},
    ]
    ids = chat_prompt(tok, msgs)
    assert tok.decode(ids) == (
        "<bos><start_of_turn>user\nWrite fib<end_of_turn>\n<start_of_turn>model\ndef fib"
        "<end_of_turn>\n<start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n"
    )
    assert ids[:2] == [BOS, SOT] and ids[-1:] != [EOT]
    no_gen = chat_prompt(tok, msgs[:2], add_generation_prompt=False)
    assert tok.decode(no_gen).endswith("def fib<end_of_turn>\n")


def test_chat_prompt_equals_transformers_template(
    tiny_tokenizer_dir: Path, tiny_tokenizer: Tokenizer
) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    msgs = [
        {"role": "user", "content": "Write fib"},
        {"role": "assistant", "content": "def fib"},
        {"role": "user", "content": "Thanks"},
    ]
    ref = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert chat_prompt(tiny_tokenizer, msgs) == list(ref)


def test_chat_role_errors(any_tokenizer: Tokenizer) -> None:
    with pytest.raises(PromptError, match="no system role.*fold_system"):
        chat_prompt(any_tokenizer, [{"role": "system", "content": "be brief"}])
    with pytest.raises(PromptError, match="alternate"):
        chat_prompt(any_tokenizer, [{"role": "model", "content": "hi"}])
    with pytest.raises(PromptError, match="alternate"):
        chat_prompt(
            any_tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )
    with pytest.raises(PromptError, match="role 'tool'"):
        chat_prompt(any_tokenizer, [{"role": "tool", "content": "x"}])
    with pytest.raises(PromptError, match="must be a str"):
        chat_prompt(any_tokenizer, [{"role": "user", "content": None}])
    with pytest.raises(PromptError, match="last message must be a user turn"):
        chat_prompt(
            any_tokenizer, [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}]
        )
    with pytest.raises(PromptError, match="at least one message"):
        chat_prompt(any_tokenizer, [])


def test_fold_system() -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello"},
    ]
    folded = fold_system(msgs)
    assert folded == [
        {"role": "user", "content": "Be brief.\n\nHi"},
        {"role": "model", "content": "Hello"},
    ]
    assert msgs[1]["content"] == "Hi"  # the input is not mutated
    assert fold_system(msgs[1:]) == msgs[1:]
    with pytest.raises(PromptError, match="followed by a user message"):
        fold_system([{"role": "system", "content": "x"}])
    with pytest.raises(PromptError, match="only one system message"):
        fold_system([msgs[0], msgs[1], {"role": "system", "content": "y"}])


def test_chat_example_mask(any_tokenizer: Tokenizer) -> None:
    tok = any_tokenizer
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "model", "content": "A one"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A two 🎉"},
    ]
    ids, mask = chat_example(tok, msgs)
    assert len(ids) == len(mask)
    assert ids == chat_prompt(tok, msgs, add_generation_prompt=False)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert learned == [*tok.encode("A one"), EOT, *tok.encode("A two 🎉"), EOT]
    # Nothing of the user turns or the "<start_of_turn>model\n" headers is learned.
    header = [SOT, *tok.encode("model\n")]
    start = ids.index(SOT, ids.index(EOT))
    assert ids[start : start + len(header)] == header and not any(mask[start : start + len(header)])
    with pytest.raises(PromptError, match="at least one model reply"):
        chat_example(tok, msgs[:1])


@settings(max_examples=40, deadline=None)
@given(user=texts, reply=texts)
def test_chat_injection(any_tokenizer: Tokenizer, user: str, reply: str) -> None:
    tok = any_tokenizer
    msgs = [{"role": "user", "content": user}, {"role": "model", "content": reply}]
    ids, mask = chat_example(tok, msgs)
    marks, runs = _split_on(ids, tok.special_ids)
    assert marks == [BOS, SOT, EOT, SOT, EOT]
    assert [tok.decode(r) for r in runs] == [
        "",
        "",
        f"user\n{user.strip()}",
        "\n",
        f"model\n{reply.strip()}",
        "\n",
    ]
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == (
        f"{reply.strip()}<end_of_turn>"
    )
