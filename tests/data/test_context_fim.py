"""Context-level FIM (FIM applied per training row after packing, the FIM paper's choice): every
row keeps its length, restores to exactly the text it stands for, carries what does not fit to
the next row, holds its sentinels only where the layout puts them; rates hold over many rows;
choices are a pure function of (seed, shard, row); the settings and the row counter."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from codegemma import prompts
from codegemma.data.document import Document
from codegemma.data.fim import (
    MIN_PART_TOKENS,
    BodySpan,
    ContextPacker,
    FimConfig,
    FimError,
    fim_row,
    parser_for,
    plain_repo_sample,
    restore_row,
    row_rng,
)
from codegemma.data.pipeline import PrepareConfig, count_fim_rows
from codegemma.data.shards import write_token_dataset
from codegemma.errors import UsageError

CODE = '''import math


class Circle:
    """A circle — géométrie 📐."""

    def __init__(self, r: float) -> None:
        self.r = r

    def area(self) -> float:
        return math.pi * self.r ** 2


def total(shapes):
    return sum(s.area() for s in shapes if s)
'''
JS = "export function total(items) {\n  let sum = 0;\n  for (const it of items) sum += it;\n  return sum;\n}\n"


def _stream(tok, docs: list[Document]) -> tuple[list[int], tuple[BodySpan, ...]]:
    return plain_repo_sample(tok, docs).stream(tok)


def _sentinels(tok, row) -> tuple[int, int, int]:
    sp = tok.special
    return tuple(sum(t == s for t in row) for s in (sp.fim_prefix, sp.fim_suffix, sp.fim_middle))


def _window(tokens, bodies, start: int, n: int):
    rel = [BodySpan(b.start - start, b.end - start, b.language) for b in bodies]
    return tokens[start : start + n], [b for b in rel if b.end > 0 and b.start < n]


def _check_row(tok, stream: list[int], start: int, window: list[int], result) -> None:
    """The invariants of one row made by fim_row from `window` = stream[start:...]."""
    sp = tok.special
    row = result.tokens
    assert len(row) == len(window)
    # the middle moved back, then the carried tokens: exactly the window's text, in the stream
    # (so a character the window's edges cut is still whole with its other bytes)
    before, after = stream[:start], stream[start + len(window) :]
    restored = before + restore_row(tok, row) + result.carry + after
    assert tok.decode(restored) == tok.decode(stream)
    if result.layout is None:
        assert row == window and result.carry == [] and _sentinels(tok, row) == (0, 0, 0)
        return
    assert _sentinels(tok, row) == (1, 1, 1)
    i, j, k = row.index(sp.fim_prefix), row.index(sp.fim_suffix), row.index(sp.fim_middle)
    assert i < j < k
    if result.layout is prompts.FimMode.SPM:
        assert j == i + 1  # <pre><suf>S<mid>P M
    elif result.split.prefix:
        assert j > i + 1  # <pre>P<suf>S<mid>M
    # the middle is whole in the row and is the split's middle
    bounds = {sp.bos, sp.eos, sp.file_separator}
    end = next((x for x in range(k + 1, len(row)) if row[x] in bounds), len(row))
    body = tok.decode(row[k + 1 : end])
    if result.layout is prompts.FimMode.SPM:
        assert body == result.split.prefix + result.split.middle
    else:
        assert body == result.split.middle
    # the carry stands for text at the window's end and is shorter than the part it came from
    assert len(result.carry) < len(window) - i


files = st.lists(
    st.tuples(
        st.one_of(
            st.text(alphabet="abc xyz_():=\n\t{}é日🎉ß", max_size=300),
            st.sampled_from([CODE, JS]).flatmap(
                lambda code: st.integers(0, len(code)).map(
                    lambda at: code[:at] + "<|fim_middle|>x<|fim_prefix|>" + code[at:]
                )
            ),
            st.just(CODE),
        ),
        st.sampled_from([None, "python", "javascript"]),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=files,
    seq_len=st.sampled_from([32, 48, 64, 101]),
    spm_rate=st.sampled_from([0.0, 1.0]),
    syntax_rate=st.sampled_from([0.0, 0.9, 1.0]),
    seed=st.integers(0, 2**32),
    offset=st.integers(0, 400),
)
def test_every_row_restores_to_its_window(
    tiny_tokenizer, files, seq_len, spm_rate, syntax_rate, seed, offset
):
    docs = [
        Document(text=t, repo="r", path=f"d{i}/f.py", language=lang)
        for i, (t, lang) in enumerate(files)
    ]
    tokens, bodies = _stream(tiny_tokenizer, docs)
    assume(len(tokens) >= seq_len)
    start = offset % (len(tokens) - seq_len + 1)
    window, rel = _window(tokens, bodies, start, seq_len)
    config = FimConfig(rate=1.0, spm_rate=spm_rate, syntax_rate=syntax_rate)
    for k in range(3):  # a few draws of the same window
        result = fim_row(tiny_tokenizer, window, rel, config, row_rng(seed, 0, k))
        event(f"layout {result.layout}, skipped {result.skipped}")
        _check_row(tiny_tokenizer, tokens, start, window, result)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=files, seq_len=st.sampled_from([32, 64, 97]), seed=st.integers(0, 2**32))
def test_packed_rows_lose_and_repeat_nothing(tiny_tokenizer, files, seq_len, seed):
    tok = tiny_tokenizer
    docs = [
        Document(text=t, repo="r", path=f"f{i}.py", language=g) for i, (t, g) in enumerate(files)
    ]
    tokens, bodies = _stream(tok, docs)
    packer = ContextPacker(tok, seq_len, FimConfig(), seed=seed)
    rows = packer.add(tokens, bodies)
    tail = packer.finish()
    assert all(len(r) == seq_len for r in rows) and len(tail) < seq_len
    restored = [t for r in rows for t in restore_row(tok, r)]
    assert tok.decode(restored + tail) == tok.decode(tokens)
    for r in rows:
        assert _sentinels(tok, r) in {(0, 0, 0), (1, 1, 1)}
    assert packer.stats["rows"] == len(rows)
    assert packer.stats["fim"] == sum(_sentinels(tok, r) == (1, 1, 1) for r in rows)
    assert packer.stats["psm"] + packer.stats["spm"] + packer.stats["plain"] == len(rows)


def _corpus(n: int) -> list[Document]:
    """ASCII Python files of varied shape (no byte-fallback tokens, so no row is skipped for a
    split character)."""
    rng = random.Random(0)
    docs = []
    for i in range(n):
        name = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
        body = "".join(
            f"def {name}_{k}(x, y={k}):\n    if x > {k}:\n        return x * y + {k}\n"
            f"    return [{name}_{k - 1}(v) for v in range(x)]\n\n\n"
            for k in range(rng.randint(1, 6))
        )
        docs.append(Document(text=f"import os\n\n\n{body}", repo="r", path=f"m{i}.py"))
    return docs


def _z(p: float, n: int) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("config", [FimConfig(), FimConfig(rate=0.5, spm_rate=0.2)])
def test_rates_hold_over_many_rows(tiny_tokenizer, config):
    tokens, bodies = _stream(tiny_tokenizer, _corpus(400))
    packer = ContextPacker(tiny_tokenizer, 48, config, seed=3)
    rows = packer.add(tokens, bodies)
    s, n = packer.stats, len(rows)
    assert n > 2000
    skipped = sum(v for k, v in s.items() if k.startswith("context_skipped_"))
    assert skipped <= 0.01 * n
    drawn = s["fim"] + skipped  # rows drawn for FIM; the few skipped stay plain
    assert abs(drawn - n * config.rate) <= _z(config.rate, n)
    assert abs(s["spm"] - s["fim"] * config.spm_rate) <= _z(config.spm_rate, s["fim"])
    syntax = s["split_syntax"] + sum(v for k, v in s.items() if k.startswith("syntax_fallback"))
    assert abs(syntax - s["fim"] * config.syntax_rate) <= _z(config.syntax_rate, s["fim"])


def _spans(text: str) -> set[tuple[int, int]]:
    """Byte spans of every named node and of every run of consecutive named siblings."""
    root = parser_for("python").parse(text.encode()).root_node
    spans, stack = set(), [root]
    while stack:
        node = stack.pop()
        spans.add((node.start_byte, node.end_byte))
        kids = [c for c in node.named_children if not c.is_extra]
        for i, a in enumerate(kids):
            spans.update((a.start_byte, b.end_byte) for b in kids[i + 1 :])
        stack.extend(node.children)
    return spans


def test_syntax_middles_are_nodes_inside_the_row(tiny_tokenizer):
    tokens, bodies = _stream(tiny_tokenizer, _corpus(40))
    config = FimConfig(rate=1.0, syntax_rate=1.0, line_align_rate=0.0)  # exact nodes
    seen = 0
    for r in range(0, len(tokens) - 64, 37):
        window, rel = _window(tokens, bodies, r, 64)
        result = fim_row(tiny_tokenizer, window, rel, config, row_rng(0, 0, r))
        if result.split is None or result.split.mode != "syntax":
            continue
        parts = result.split
        head = parts.prefix + parts.middle + parts.suffix  # the part's text that was parsed
        start = len(parts.prefix.encode())
        assert (start, start + len(parts.middle.encode())) in _spans(head)
        assert tiny_tokenizer.decode(window).find(head) >= 0  # the part lies inside the row
        seen += 1
    assert seen > 50


def test_rows_are_a_pure_function_of_seed_shard_and_row(tiny_tokenizer):
    docs = _corpus(60)
    repos = [_stream(tiny_tokenizer, docs[k : k + 10]) for k in range(0, 60, 10)]

    def rows(seed, shard, together=False):
        packer = ContextPacker(tiny_tokenizer, 64, FimConfig(), seed=seed, shard=shard)
        if not together:  # one repository at a time, as a shard job adds them
            return [r for tokens, bodies in repos for r in packer.add(tokens, bodies)]
        tokens, bodies = [], []
        for t, b in repos:
            bodies += [BodySpan(x.start + len(tokens), x.end + len(tokens), x.language) for x in b]
            tokens += t
        return packer.add(tokens, bodies)

    first = rows(1, 0)
    assert rows(1, 0) == first == rows(1, 0, together=True)
    assert rows(2, 0) != first and rows(1, 1) != first


def test_short_rows_and_bad_settings_are_refused(tiny_tokenizer):
    with pytest.raises(FimError, match="seq_len >= 32"):
        ContextPacker(tiny_tokenizer, 2 * MIN_PART_TOKENS - 1, FimConfig(), seed=0)
    with pytest.raises(UsageError, match="--seq-len"):
        PrepareConfig(tokenizer="t", seq_len=16)
    assert PrepareConfig(tokenizer="t", seq_len=16, fim=FimConfig(fim_level="document"))
    with pytest.raises(FimError, match="fim_level"):
        FimConfig(fim_level="file")
    with pytest.raises(FimError, match="FimConfig"):
        ContextPacker(tiny_tokenizer, 64, {"rate": 0.8}, seed=0)


def test_fim_level_flag_sets_the_config():
    import argparse

    from codegemma.data import cli as data_cli

    root = argparse.ArgumentParser()
    data_cli.register(root.add_subparsers())
    base = ["data", "prepare", "src", "--out", "o", "--tokenizer", "tok"]
    assert data_cli.build_config(root.parse_args(base)).fim.fim_level == "context"
    args = root.parse_args([*base, "--fim-level", "document", "--fim-rate", "0.5"])
    assert data_cli.build_config(args).fim == FimConfig(fim_level="document", rate=0.5)
    with pytest.raises(SystemExit):
        root.parse_args([*base, "--fim-level", "file"])


def test_count_fim_rows(tiny_tokenizer, tmp_path):
    sp = tiny_tokenizer.special
    p, s, m = sp.fim_prefix, sp.fim_suffix, sp.fim_middle
    rows = [
        [5] * 8,
        [p, 5, s, 5, m, 5, 5, 5],  # one whole example
        [p, s, 5, m, 5, p, 5, s],  # one whole example and the start of a second
        [5, 5, m, 5, 5, 5, 5, 5],  # a middle whose prefix and suffix are in another row
        [p, 5, s, m, p, s, m, 5],  # two
    ]
    out = write_token_dataset(tmp_path, np.array(rows).ravel(), tiny_tokenizer, seq_len=8)
    counts = count_fim_rows(out / "shard-00000.bin", 8, tiny_tokenizer)
    assert counts == {"rows": 5, "fim": 3, "fim_broken": 1, "fim_examples": 4}
