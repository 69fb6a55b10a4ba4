"""FIM: exact reassembly in every split mode, rates, determinism, syntax-aware middles, and the
token layout of whole repository samples (decoded back to the files)."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegemma import prompts
from codegemma.data.document import Document
from codegemma.data.fim import (
    SPLIT_MODES,
    FimConfig,
    FimError,
    build_repo_sample,
    fim_file,
    parser_for,
    split,
)

SOURCES: dict[str, tuple[str, str]] = {
    "python": (
        "pkg/shapes.py",
        '"""Shapes — géométrie 📐."""\nimport math\n\n\nclass Circle:\n'
        "    def __init__(self, r: float) -> None:\n        self.r = r  # rayon\n\n"
        "    def area(self) -> float:\n        return math.pi * self.r ** 2\n\n\n"
        "def total(shapes):\n    return sum(s.area() for s in shapes if s)\n",
    ),
    "javascript": (
        "web/cart.js",
        "import { price } from './price.js';\n\n// Größe: ünïcode\n"
        "export function total(items) {\n  let sum = 0;\n  for (const it of items) {\n"
        "    sum += price(it) * it.qty;\n  }\n  return sum;\n}\n",
    ),
    "typescript": (
        "web/user.ts",
        "export interface User { name: string; age: number }\n\n"
        "export function greet(u: User): string {\n  return `héllo ${u.name}`;\n}\n",
    ),
    "java": (
        "src/main/java/a/Stack.java",
        "package a;\n\nimport java.util.ArrayList;\n\n/** Pile — LIFO. */\npublic class Stack<T> {\n"
        "  private final ArrayList<T> items = new ArrayList<>();\n\n"
        "  public void push(T x) { items.add(x); }\n\n"
        "  public T pop() {\n    return items.remove(items.size() - 1);\n  }\n}\n",
    ),
    "go": (
        "util/strings.go",
        'package util\n\nimport "strings"\n\n// Reverse — 反転.\nfunc Reverse(s string) string {\n'
        "\tr := []rune(s)\n\tfor i, j := 0, len(r)-1; i < j; i, j = i+1, j-1 {\n"
        "\t\tr[i], r[j] = r[j], r[i]\n\t}\n\treturn strings.TrimSpace(string(r))\n}\n",
    ),
    "rust": (
        "src/lib.rs",
        "/// Somme — ∑.\npub fn sum(xs: &[i64]) -> i64 {\n    xs.iter().copied().sum()\n}\n\n"
        "pub struct Point { pub x: f64, pub y: f64 }\n\nimpl Point {\n"
        "    pub fn norm(&self) -> f64 { (self.x * self.x + self.y * self.y).sqrt() }\n}\n",
    ),
    "c": (
        "src/vec.c",
        '#include "vec.h"\n\n/* Längen */\nint dot(const int *a, const int *b, int n) {\n'
        "    int s = 0;\n    for (int i = 0; i < n; i++) s += a[i] * b[i];\n    return s;\n}\n",
    ),
    "cpp": (
        "src/box.cpp",
        "#include <vector>\n\nnamespace geo {\nstruct Box { double w, h; };\n"
        "double area(const Box& b) { return b.w * b.h; }  // «aire»\n}\n",
    ),
    "csharp": (
        "Lib/Greeter.cs",
        "using System;\n\nnamespace Lib {\n  public class Greeter {\n"
        '    public string Hello(string n) => $"Hallo {n} — ¡hola!";\n  }\n}\n',
    ),
    "kotlin": (
        "app/Util.kt",
        'package app\n\nfun shout(s: String): String = s.uppercase() + "!"\n\n'
        "data class Pair2(val a: Int, val b: Int) {\n    fun sum() = a + b\n}\n",
    ),
}


def _doc(language: str) -> Document:
    path, text = SOURCES[language]
    return Document(text=text, repo="fixture", path=path, language=language)


def _z(p: float, n: int) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


# -- reassembly --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(max_size=300),
    language=st.sampled_from([None, "python", "javascript", "rust", "c", "cobol"]),
    mode=st.sampled_from(SPLIT_MODES),
    seed=st.integers(0, 2**32),
    cap=st.one_of(st.none(), st.integers(1, 40)),
)
def test_reassembly_any_text(text, language, mode, seed, cap):
    parts = split(text, language, mode, random.Random(seed), max_middle_chars=cap)
    assert parts.prefix + parts.middle + parts.suffix == text
    assert parts.mode in SPLIT_MODES
    if cap is not None:
        assert len(parts.middle) <= cap
    if parts.mode == "line":  # both split points at a line start or the end of the text
        points = {0, len(text)} | {k + 1 for k, ch in enumerate(text) if ch == "\n"}
        assert {len(parts.prefix), len(parts.prefix) + len(parts.middle)} <= points


@settings(max_examples=120, deadline=None)
@given(
    language=st.sampled_from(sorted(SOURCES)),
    mode=st.sampled_from(SPLIT_MODES),
    seed=st.integers(0, 2**32),
    noise=st.text(alphabet="é日🎉ß \n\t{}()", max_size=12),
)
def test_reassembly_code_with_unicode(language, mode, seed, noise):
    # noise at a random place: still exact, even when the tree then has errors
    text = SOURCES[language][1]
    at = random.Random(seed).randint(0, len(text))
    text = text[:at] + noise + text[at:]
    parts = split(text, language, mode, random.Random(seed))
    assert parts.prefix + parts.middle + parts.suffix == text


# -- syntax-aware middles ----------------------------------------------------------------------


def _node_and_run_spans(text: str, language: str) -> tuple[set, set]:
    """Byte spans of every named node, and of every run of >= 2 consecutive named siblings."""
    root = parser_for(language).parse(text.encode()).root_node
    nodes, runs, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        nodes.add((node.start_byte, node.end_byte))
        kids = [c for c in node.named_children if not c.is_extra]
        for i, a in enumerate(kids):
            runs.update((a.start_byte, b.end_byte) for b in kids[i + 1 :])
        stack.extend(node.children)
    return nodes, runs - nodes


def _byte_span(parts) -> tuple[int, int]:
    # recomputed from the str pieces: catches any byte/char index confusion in the splitter
    start = len(parts.prefix.encode())
    return start, start + len(parts.middle.encode())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(language=st.sampled_from(sorted(SOURCES)), seed=st.integers(0, 2**32))
def test_syntax_middle_is_a_node_or_sibling_run(language, seed):
    text = SOURCES[language][1]
    parts = split(text, language, "syntax", random.Random(seed))
    assert parts.mode == "syntax" and parts.fallback is None
    nodes, runs = _node_and_run_spans(text, language)
    assert _byte_span(parts) in nodes | runs
    assert parts.middle.strip() and parts.middle.strip() != text.strip()
    assert len(parts.middle) >= 3


def test_syntax_middles_mix_single_nodes_and_sibling_runs():
    text = SOURCES["python"][1]
    nodes, runs = _node_and_run_spans(text, "python")
    rng = random.Random(7)
    spans = [_byte_span(split(text, "python", "syntax", rng)) for _ in range(400)]
    assert len(set(spans)) > 25
    assert sum(s in runs for s in spans) > 20  # sibling_run_rate 0.3 widens some (~10%)
    singles = [split(text, "python", "syntax", rng, sibling_run_rate=0.0) for _ in range(200)]
    assert all(_byte_span(p) in nodes for p in singles)
    assert any(p.middle.startswith("def area") for p in singles)  # a whole method
    # size-weighted: the big class is picked far more often than a 3-character name
    count = {m: sum(p.middle == m for p in singles) for m in ("math", "self.r")}
    assert sum(p.middle.startswith("class Circle") for p in singles) > count["self.r"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(language=st.sampled_from(sorted(SOURCES)), seed=st.integers(0, 2**32))
def test_line_aligned_middles_are_whole_lines_of_a_node(language, seed):
    """line_align_rate 1: a node that fills its lines becomes those whole lines (indentation and
    newline in the middle, as in HumanEval's line infilling); any other node stays as it is."""
    text = SOURCES[language][1]
    plain = split(text, language, "syntax", random.Random(seed), sibling_run_rate=0.0)
    aligned = split(
        text, language, "syntax", random.Random(seed), sibling_run_rate=0.0, line_align_rate=1.0
    )
    assert aligned.prefix + aligned.middle + aligned.suffix == text
    assert plain.middle.strip() in aligned.middle  # the same node, maybe widened
    fills = not plain.prefix.rsplit("\n", 1)[-1].strip(" \t") and not (
        plain.suffix.split("\n", 1)[0].strip()
    )
    if fills:
        assert aligned.prefix == "" or aligned.prefix.endswith("\n")
        assert aligned.middle.endswith("\n") or not aligned.suffix
        assert aligned.middle.strip() == plain.middle.strip()
    else:
        assert aligned == plain


def test_line_alignment_gives_the_benchmark_shape():
    text = "def f(x):\n    y = x + 1\n    return y\n"
    rng = random.Random(0)
    shapes = {
        (p.prefix, p.middle)
        for p in (
            split(text, "python", "syntax", rng, sibling_run_rate=0.0, line_align_rate=1.0)
            for _ in range(200)
        )
    }
    assert ("def f(x):\n", "    y = x + 1\n") in shapes
    assert ("def f(x):\n    y = x + 1\n", "    return y\n") in shapes
    assert ("def f(x):\n    y = ", "x + 1") in shapes  # not a whole line: as it is
    # rate 0 draws nothing more: the bytes of earlier versions
    a = [split(text, "python", "syntax", random.Random(s)) for s in range(50)]
    b = [split(text, "python", "syntax", random.Random(s), line_align_rate=0.0) for s in range(50)]
    assert a == b


def test_syntax_split_respects_non_ascii_offsets():
    text = "s = '日本語のテキスト🎉🎉'\n\ndef f(x):\n    return x * 2\n"
    expected = {
        "def f(x):\n    return x * 2",
        "return x * 2",
        "x * 2",
        "(x)",
        "'日本語のテキスト🎉🎉'",
    }
    rng = random.Random(1)
    seen = {split(text, "python", "syntax", rng, sibling_run_rate=0.0).middle for _ in range(300)}
    assert expected <= seen
    data = text.encode()
    root = parser_for("python").parse(data).root_node
    node_texts, stack = set(), [root]
    while stack:
        n = stack.pop()
        node_texts.add(data[n.start_byte : n.end_byte].decode())
        stack.extend(n.children)
    assert seen <= node_texts


def test_syntax_respects_cap_and_falls_back():
    text = SOURCES["java"][1]
    rng = random.Random(3)
    for _ in range(100):
        parts = split(text, "java", "syntax", rng, max_middle_chars=20)
        assert len(parts.middle) <= 20
    none = split("plain words here", None, "syntax", rng)
    assert (none.mode, none.fallback) == ("char", "no_grammar")
    tiny = split("x=1", "python", "syntax", rng)  # every node is the whole file or trivial
    assert (tiny.mode, tiny.fallback) == ("char", "no_nodes")


def test_every_language_has_a_grammar():
    for language in (*SOURCES, "tsx"):
        assert parser_for(language) is not None, language


# -- rates and determinism ---------------------------------------------------------------------


def _plans(config: FimConfig, n: int, seed: int = 0) -> list:
    # language-less docs: the draws are the same, and no parsing makes a few thousand cheap
    docs = [Document(text="abc\ndef\n", repo="r", path=f"f{i}.txt") for i in range(n)]
    return [fim_file(d, config, seed) for d in docs]


@pytest.mark.parametrize(
    "config",
    [FimConfig(), FimConfig(rate=0.5, spm_rate=0.2, syntax_rate=0.5, line_rate=0.3)],
)
def test_rates_within_binomial_bounds(config):
    n = 4000
    plans = _plans(config, n)
    fim = [p for p in plans if p.layout is not None]
    assert abs(len(fim) - n * config.rate) <= _z(config.rate, n)
    spm = sum(p.layout is prompts.FimMode.SPM for p in fim)
    assert abs(spm - len(fim) * config.spm_rate) <= _z(config.spm_rate, len(fim))
    for mode, p in (("syntax", config.syntax_rate), ("line", config.line_rate)):
        k = sum(x.requested == mode for x in fim)
        assert abs(k - len(fim) * p) <= _z(p, len(fim)) + (0 if 0 < p < 1 else 0.5)
    char_share = 1 - config.syntax_rate - config.line_rate
    k = sum(x.requested == "char" for x in fim)
    assert abs(k - len(fim) * char_share) <= _z(char_share, len(fim)) + 0.5


def test_extreme_rates():
    assert all(p.layout is None for p in _plans(FimConfig(rate=0.0), 200))
    plans = _plans(FimConfig(rate=1.0, spm_rate=1.0, syntax_rate=0.0, line_rate=1.0), 200)
    assert all(p.layout is prompts.FimMode.SPM and p.split.mode == "line" for p in plans)


def test_deterministic_per_seed_and_document():
    docs = [_doc(lang) for lang in sorted(SOURCES)]
    first = [fim_file(d, FimConfig(), 11) for d in docs]
    again = [fim_file(d, FimConfig(), 11) for d in reversed(docs)][::-1]
    assert first == again
    other = [fim_file(d, FimConfig(), 12) for d in docs]
    assert first != other
    # the outcome belongs to the document id, not to its position
    renamed = Document(text=docs[0].text, repo="elsewhere", path=docs[0].path)
    outcomes = {fim_file(renamed, FimConfig(rate=1.0), s).split for s in range(5)}
    assert len(outcomes) > 1


def test_deterministic_across_processes():
    doc = _doc("python")
    here = fim_file(doc, FimConfig(rate=1.0), 5)
    code = (
        "from codegemma.data.document import Document; from codegemma.data.fim import *;"
        f"d = Document(text={doc.text!r}, repo='fixture', path={doc.path!r}, language='python');"
        "s = fim_file(d, FimConfig(rate=1.0), 5).split; print(repr((s.prefix, s.middle)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == repr((here.split.prefix, here.split.middle))


def test_config_validation():
    for bad in (
        {"rate": 1.5},
        {"spm_rate": -0.1},
        {"syntax_rate": 0.8, "line_rate": 0.3},
        {"max_middle_chars": 0},
        {"min_node_chars": 0},
        {"rate": True},
    ):
        with pytest.raises(FimError, match=next(iter(bad))):
            FimConfig(**bad)
    with pytest.raises(FimError, match="split mode"):
        split("x", None, "word", random.Random(0))


# -- repository samples ------------------------------------------------------------------------


def _decode_sample(tok, tokens: list[int], docs: list[Document]) -> list[tuple[str, str, str]]:
    """Invert the layout: (path, reassembled text, "plain"|"psm"|"spm") per file segment."""
    sp = tok.special
    segments, cur = [], []
    for t in tokens:
        if t == sp.file_separator:
            segments.append(cur)
            cur = []
        else:
            cur.append(t)
    segments.append(cur)
    out = []
    for seg, doc in zip(segments, docs, strict=True):
        head = len(tok.encode(doc.path + "\n"))
        path, body = tok.decode(seg[:head])[:-1], seg[head:]
        if sp.fim_prefix not in body:
            out.append((path, tok.decode(body), "plain"))
            continue
        assert body[0] == sp.fim_prefix
        suf_at, mid_at = body.index(sp.fim_suffix), body.index(sp.fim_middle)
        if suf_at == 1:  # SPM: <pre><suf>S<mid>P M  (PSM with an empty prefix looks the same)
            text = tok.decode(body[mid_at + 1 :]) + tok.decode(body[2:mid_at])
            out.append((path, text, "spm"))
        else:  # PSM: <pre>P<suf>S<mid>M
            pre, suf = tok.decode(body[1:suf_at]), tok.decode(body[suf_at + 1 : mid_at])
            out.append((path, pre + tok.decode(body[mid_at + 1 :]) + suf, "psm"))
    return out


def test_repo_sample_contains_every_file_once(tiny_tokenizer):
    docs = [_doc(lang) for lang in sorted(SOURCES)]
    docs.append(Document(text="", repo="fixture", path="empty.py", language="python"))
    docs.append(Document(text="notes ✓\n", repo="fixture", path="NOTES.md"))
    for seed in range(4):
        sample = build_repo_sample(tiny_tokenizer, docs, FimConfig(), seed)
        decoded = _decode_sample(tiny_tokenizer, sample.tokens, docs)
        assert [(p, t) for p, t, _ in decoded] == [(d.path, d.text) for d in docs]
        kinds = [k for _, _, k in decoded]
        plans = [fim_file(d, FimConfig(), seed) for d in docs]
        for kind, plan in zip(kinds, plans, strict=True):
            if plan.layout is None:
                assert kind == "plain"
            elif plan.layout is prompts.FimMode.PSM and plan.split.prefix:
                assert kind == "psm"
            else:
                assert kind == "spm"
        assert sample.stats["files"] == len(docs)
        assert sample.stats["fim"] == len(docs) - kinds.count("plain")
        assert sample.stats["psm"] == sum(p.layout is prompts.FimMode.PSM for p in plans)
        assert sample.stats["spm"] == sum(p.layout is prompts.FimMode.SPM for p in plans)
        assert sample.stats["tokens"] == len(sample.tokens)
        assert tiny_tokenizer.special.bos not in sample.tokens


def test_repo_sample_is_order_independent_per_file(tiny_tokenizer):
    docs = [_doc(lang) for lang in ("python", "go", "rust", "c")]
    fwd = build_repo_sample(tiny_tokenizer, docs, FimConfig(rate=0.5), 3)
    rev = build_repo_sample(tiny_tokenizer, docs[::-1], FimConfig(rate=0.5), 3)
    sep = tiny_tokenizer.special.file_separator

    def segments(tokens):
        out, cur = [], []
        for t in [*tokens, sep]:
            if t == sep:
                out.append(tuple(cur))
                cur = []
            else:
                cur.append(t)
        return out

    assert segments(fwd.tokens) == segments(rev.tokens)[::-1]
    assert fwd.stats == rev.stats


def test_syntax_fallback_is_counted(tiny_tokenizer):
    docs = [Document(text="just some words\n" * 3, repo="r", path=f"n{i}.txt") for i in range(20)]
    config = FimConfig(rate=1.0, syntax_rate=1.0)
    stats = build_repo_sample(tiny_tokenizer, docs, config, 0).stats
    assert stats["syntax_fallback_no_grammar"] == 20 == stats["split_char"]


def test_build_repo_sample_rejects_bad_input(tiny_tokenizer):
    with pytest.raises(FimError, match="FimConfig"):
        build_repo_sample(tiny_tokenizer, [], {"rate": 0.8}, 0)
    with pytest.raises(FimError, match="seed"):
        build_repo_sample(tiny_tokenizer, [], FimConfig(), "0")
    with pytest.raises(FimError, match="Document"):
        build_repo_sample(tiny_tokenizer, ["text"], FimConfig(), 0)
