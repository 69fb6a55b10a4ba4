"""Tokenizer: special ids by name, plain-text encoding (no injection), explicit BOS, streaming."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegemma.tokenizer import SPECIAL_STRINGS, Tokenizer, TokenizerError

GEMMA_IDS = dict(
    pad=0,
    eos=1,
    bos=2,
    unk=3,
    fim_prefix=67,
    fim_middle=68,
    fim_suffix=69,
    file_separator=70,
    start_of_turn=106,
    end_of_turn=107,
)
SPECIAL_LIKE = (*SPECIAL_STRINGS.values(), "<mask>", "[multimodal]", "<unused0>", "<unused95>")
MULTIBYTE = ("▁", "🎉", "日本語", "é", "ß", "𝔘𝔫𝔦", "👩‍👩‍👧", "\u0301", "\x00", "\r\n", "\t", "  ")

utf8_chars = st.characters(codec="utf-8")
texts = st.lists(
    st.one_of(
        st.text(utf8_chars, max_size=12),
        st.sampled_from(SPECIAL_LIKE),
        st.sampled_from(MULTIBYTE),
        st.sampled_from(("def ", "return x", "    ", "\n", "self.items")),
    ),
    max_size=8,
).map("".join)


def test_special_ids_are_gemmas(any_tokenizer: Tokenizer) -> None:
    assert {k: getattr(any_tokenizer.special, k) for k in GEMMA_IDS} == GEMMA_IDS
    assert (any_tokenizer.bos_id, any_tokenizer.eos_id, any_tokenizer.pad_id) == (2, 1, 0)
    assert any_tokenizer.unk_id == 3
    assert any_tokenizer.vocab_size == 512
    for name, tok in SPECIAL_STRINGS.items():
        assert any_tokenizer.token_to_id(tok) == GEMMA_IDS[name]
        assert any_tokenizer.id_to_token(GEMMA_IDS[name]) == tok


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_round_trip_and_no_special_ids(any_tokenizer: Tokenizer, text: str) -> None:
    ids = any_tokenizer.encode(text)
    assert any_tokenizer.decode(ids) == text
    assert not set(ids) & any_tokenizer.special_ids
    assert all(0 <= i < any_tokenizer.vocab_size for i in ids)


@pytest.mark.parametrize("literal", SPECIAL_LIKE)
def test_sentinel_strings_are_plain_text(any_tokenizer: Tokenizer, literal: str) -> None:
    ids = any_tokenizer.encode(f"x = '{literal}'")
    assert any_tokenizer.token_to_id(literal) not in ids
    assert not set(ids) & any_tokenizer.special_ids
    assert any_tokenizer.decode(ids) == f"x = '{literal}'"


def test_fim_middle_literal_is_never_68(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("<|fim_middle|>")
    assert 68 not in ids and len(ids) > 1
    assert any_tokenizer.decode(ids) == "<|fim_middle|>"


def test_post_processor_bos_is_not_doubled(tiny_tokenizer: Tokenizer) -> None:
    # The trained tokenizer.json carries Gemma's post-processor that prepends <bos> ...
    raw = tiny_tokenizer._backend.tk.encode("def f", add_special_tokens=True).ids
    assert raw[0] == 2
    # ... but encode never runs it: exactly one bos, only when asked.
    for tok_text in ("def f", "", "<bos>def", "<bos>"):
        with_bos = tiny_tokenizer.encode(tok_text, bos=True)
        assert with_bos[0] == 2 and with_bos.count(2) == 1
        assert with_bos[1:] == tiny_tokenizer.encode(tok_text)
        assert 2 not in tiny_tokenizer.encode(tok_text)


def test_bos_on_sentencepiece(tiny_sp_tokenizer: Tokenizer) -> None:
    assert tiny_sp_tokenizer.encode("", bos=True) == [2]
    assert tiny_sp_tokenizer.encode("<bos>x", bos=True).count(2) == 1


def test_no_dummy_prefix_and_spaces_as_metaspace(any_tokenizer: Tokenizer) -> None:
    first = any_tokenizer.id_to_token(any_tokenizer.encode("def")[0])
    assert not first.startswith("▁")
    pieces = [any_tokenizer.id_to_token(i) for i in any_tokenizer.encode("a b")]
    assert "".join(pieces) == "a▁b"
    indented = [any_tokenizer.id_to_token(i) for i in any_tokenizer.encode("    return x")]
    assert "".join(indented) == "▁▁▁▁return▁x"


def test_literal_metaspace_survives(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("a▁b c")
    assert any_tokenizer.decode(ids) == "a▁b c"
    assert ids.count(108 + 0xE2) == 1  # "▁" as its three UTF-8 bytes, the space as "▁" pieces


def test_multibyte_falls_back_to_bytes(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("😀")  # not in the tiny corpus: four byte tokens
    assert [any_tokenizer.id_to_token(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert ids == [108 + b for b in "😀".encode()]


def test_stream_never_emits_broken_characters(any_tokenizer: Tokenizer) -> None:
    text = "x = '😀日本語ǅ' # 🎉"
    ids = any_tokenizer.encode(text)
    dec = any_tokenizer.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + dec.flush() == text
    emoji = any_tokenizer.encode("😀")
    dec = any_tokenizer.stream_decoder()
    assert [dec.push(i) for i in emoji] == ["", "", "", "😀"]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_stream_equals_decode_for_any_ids(any_tokenizer: Tokenizer, data: st.DataObject) -> None:
    # Arbitrary ids include truncated/invalid UTF-8 byte runs: both paths must agree exactly.
    ids = data.draw(st.lists(st.integers(0, any_tokenizer.vocab_size - 1), max_size=30))
    skip = data.draw(st.booleans())
    dec = any_tokenizer.stream_decoder(skip_special=skip)
    streamed = "".join(dec.push(i) for i in ids) + dec.flush()
    assert streamed == any_tokenizer.decode(ids, skip_special=skip)


@settings(max_examples=60, deadline=None)
@given(text=texts)
def test_stream_of_encoded_text(any_tokenizer: Tokenizer, text: str) -> None:
    dec = any_tokenizer.stream_decoder()
    out = [dec.push(i) for i in any_tokenizer.encode(text)]
    assert "".join(out) + dec.flush() == text
    assert "\ufffd" not in "".join(out) or "\ufffd" in text


def test_decode_skip_special(any_tokenizer: Tokenizer) -> None:
    ids = [2, 67, *any_tokenizer.encode("a"), 69, 68, 1]
    assert any_tokenizer.decode(ids) == "<bos><|fim_prefix|>a<|fim_suffix|><|fim_middle|><eos>"
    assert any_tokenizer.decode(ids, skip_special=True) == "a"


def test_bad_ids_and_inputs_raise(any_tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        any_tokenizer.decode([5000])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        any_tokenizer.id_to_token(-1)
    with pytest.raises(TokenizerError, match="takes a str"):
        any_tokenizer.encode(b"bytes")  # type: ignore[arg-type]
    assert any_tokenizer.token_to_id("no-such-token-xyz") is None


def test_fingerprint_is_file_sha256(
    tiny_tokenizer: Tokenizer, tiny_sp_tokenizer: Tokenizer
) -> None:
    for tok in (tiny_tokenizer, tiny_sp_tokenizer):
        assert tok.fingerprint == hashlib.sha256(Path(tok.path).read_bytes()).hexdigest()
    assert tiny_tokenizer.fingerprint != tiny_sp_tokenizer.fingerprint


def test_load_prefers_json_and_accepts_files(
    tmp_path: Path, tiny_tokenizer_dir: Path, tiny_sp_tokenizer_dir: Path
) -> None:
    both = tmp_path / "both"
    shutil.copytree(tiny_tokenizer_dir, both)
    shutil.copy(tiny_sp_tokenizer_dir / "tokenizer.model", both / "tokenizer.model")
    assert Tokenizer.load(both).kind == "tokenizer.json"
    assert Tokenizer.load(both / "tokenizer.model").kind == "tokenizer.model"
    assert Tokenizer.load(str(both / "tokenizer.json")).kind == "tokenizer.json"


def test_load_errors_name_the_problem(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")
    data = (tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")
    broken = tmp_path / "nofim"
    broken.mkdir()
    (broken / "tokenizer.json").write_text(data.replace("<|fim_middle|>", "<unused999>"))
    with pytest.raises(TokenizerError, match=r"fim_middle '<\|fim_middle\|>'"):
        Tokenizer.load(broken)
    nobytes = tmp_path / "nobytes"
    nobytes.mkdir()
    (nobytes / "tokenizer.json").write_text(data.replace('"<0x41>"', '"<0x41x>"'))
    with pytest.raises(TokenizerError, match="byte-fallback tokens"):
        Tokenizer.load(nobytes)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="could not be parsed"):
        Tokenizer.load(garbage)


def test_special_names_follow_tokenizer_config(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    # A tokenizer whose config names "<pad>" as eos (unusual but legal) is honoured.
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "t")
    cfg_path = tmp_path / "t" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = "<end_of_turn>"
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "t" / "special_tokens_map.json").unlink()
    assert Tokenizer.load(tmp_path / "t").eos_id == 107


def test_codegemma_style_non_special_fim_tokens_stay_safe(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    # Real CodeGemma's tokenizer.json marks the FIM tokens "special": false, so the library's
    # encode_special_tokens switch alone would let a typed "<|fim_middle|>" become id 68.
    data = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for added in data["added_tokens"]:
        if added["content"].startswith("<|"):
            added["special"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = Tokenizer.load(tmp_path)
    assert tok._backend.tk.encode("<|fim_middle|>", add_special_tokens=False).ids == [68]
    ids = tok.encode("a<|fim_middle|>b<|file_separator|>")
    assert not {67, 68, 69, 70} & set(ids)
    assert tok.decode(ids) == "a<|fim_middle|>b<|file_separator|>"
