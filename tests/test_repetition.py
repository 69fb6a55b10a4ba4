"""The repetition rule (middle.cut_repetition): the loops weak models write are cut after their
first copy, the repetition real code has is left alone, and the streaming forms (ReplyGuard,
the server's FimTracker) give what the rule gives for the whole text.

The weak-model outputs below are the bundled model's own: greedy, 128 tokens, FIM at a random
point of a file of CPython's standard library (the first five), and `echo hello | codegemma chat
--force` (the last).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from codegemma import middle
from codegemma.middle import FimRequest, ReplyGuard, cut_repetition, repetition
from codegemma.server.serving import FimTracker

WEAK_OUTPUTS = [  # (raw output, what is left; all ran out of tokens)
    (
        '"""Tests for the server file.\n\n'
        + "import sys\n" * 22
        + "import\n"
        + "import sys\n" * 20,
        '"""Tests for the server file.\n\nimport sys\n',
    ),
    (
        "# 1" + "9" * 125,
        "# 19",
    ),
    (
        '"""Return the file file.\n\n_AAA' + "-C" * 59,
        '"""Return the file file.\n\n_AAA-C',
    ),
    (
        '"""A-type: 00.py\n                     "test_only" <doctest test.py\n'
        "        self.set_with_with_with_with_error_error_error_error\n"
        + '        """\n' * 24
        + "        ",
        '"""A-type: 00.py\n                     "test_only" <doctest test.py\n'
        '        self.set_with_with_with_with_error_error_error_error\n        """\n',
    ),
    (
        '(r1.py.py\nS.py.py.py.py.py.py.py.py\n"""\n\nimport.py.py.py.py.py.py.py.py\n'
        "#.py.py.py.py.py.py.py.py.py.py.py.py.py.py.py.",
        '(r1.py.py\nS.py.py.py.py.py.py.py.py\n"""\n\nimport.py.py.py.py.py.py.py.py\n#.py',
    ),
    (
        '        """\n        ' + "self.assertEqual(" * 100,
        '        """\n        self.assertEqual(',
    ),
]


@pytest.mark.parametrize("raw, kept", WEAK_OUTPUTS)
def test_weak_model_loops_are_cut_after_their_first_copy(raw, kept):
    assert cut_repetition(raw, exhausted=True) == kept


def test_a_long_loop_is_cut_even_when_the_model_stopped_by_itself():
    raw = "x = 1\n" + "self.assertEqual(" * 20 + ")\n"
    assert cut_repetition(raw) == "x = 1\nself.assertEqual("
    assert cut_repetition("a" + ")" * 200) == "a)"
    assert cut_repetition('"""Auti' + "i" * 300 + '"""') == '"""Auti'


def test_a_short_loop_counts_only_when_the_generation_ran_out_of_tokens():
    raw = "def f():\n    return [" + "0, " * 12
    assert cut_repetition(raw) == raw  # it may have been closing the list
    assert cut_repetition(raw, exhausted=True) == "def f():\n    return [0, "


def test_a_line_loop_keeps_the_line_it_cuts_in_with_its_newline():
    assert cut_repetition("foo = 1\n" + "import sys\n" * 40) == "foo = 1\nimport sys\n"


LEGITIMATE = [
    "x = [0, 0, 0]\n",
    "zeros = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]\n",
    '    """Title\n    ' + "=" * 79 + "\n\n    Body.\n    " + '"""\n',
    "# " + "-" * 77 + "\n",
    "MASK = 0xFFFFFFFFFFFFFFFF\nBITS = 0b" + "1" * 64 + "\n",
    "NUL = b'" + "\\x00" * 7 + "'\n",
    "".join(f"        self.assertEqual(f({i}), {i * i})\n" for i in range(30)),
    "".join(f"    self.{c} = {c}\n" for c in "abcdefghijklmnop"),
    "    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,\n" * 3,
    "if x:\n    pass\nelse:\n    pass\n",
    "print()\nprint()\nprint()\n",
    "SQL = 'INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)'\n",
    "call(a,\n" + " " * 40,  # a token limit in the middle of an aligned continuation line
]


@pytest.mark.parametrize("text", LEGITIMATE)
def test_repetition_real_code_has_is_left_alone(text):
    assert cut_repetition(text) == text
    assert cut_repetition(text, exhausted=True) == text


# -- properties ---------------------------------------------------------------------------------
code_chars = st.sampled_from(list("abcxyz_019 =+-*/()[]{},.:'\"#\n    "))
texts = st.text(code_chars, max_size=300)
units = st.text(st.sampled_from(list("abz09(),._ =-\n")), min_size=1, max_size=24).filter(
    lambda u: u.strip() and middle._is_unit(u, blank=False)
)


@given(prefix=texts, unit=units, extra=st.integers(0, 30), after=texts)
def test_a_loop_is_cut_within_its_second_copy(prefix, unit, extra, after):
    copies = max(middle.LOOP_COPIES, -(-middle.LOOP_SPAN // len(unit))) + extra
    text = prefix + unit * copies + after
    cut = cut_repetition(text)
    assert text.startswith(cut)
    assert len(cut) <= len(prefix) + 2 * len(unit)  # the first copy (and the rest of its line)
    assert cut_repetition(cut) == cut  # no loop is left


@given(
    list_length=st.integers(0, 24),
    underline=st.integers(1, 79),
    lines=st.lists(st.integers(0, 10**6), max_size=30),
    exhausted=st.booleans(),
)
def test_legitimate_repetition_is_never_cut(list_length, underline, lines, exhausted):
    text = (
        "def f():\n"
        f"    values = [{', '.join(['0'] * list_length)}]\n"
        f'    """Title\n    {"=" * underline}\n    """\n'
        + "".join(f"    check(values, {n})\n" for n in lines)
        + "    return values\n"
    )
    assert cut_repetition(text, exhausted=exhausted) == text


@given(text=texts, more=texts)
def test_a_loop_found_is_found_again_in_any_longer_text(text, more):
    """The cut depends only on the text up to where the loop was found, so a server that stops
    generating there answers what a client that generated on would get."""
    found = repetition(text).loop
    if found is not None:
        assert repetition(text + more).loop == found


@given(text=texts, more=texts)
def test_no_later_cut_reaches_into_settled_text(text, more):
    settled = repetition(text).settled
    later = repetition(text + more)
    assert all(c is None or c >= settled for c in (later.loop, later.tail))


def _chunks(text: str, sizes: list[int]) -> list[str]:
    out, at = [], 0
    for size in sizes:
        out.append(text[at : at + size])
        at += size
    return [*out, text[at:]]


loopy = st.one_of(
    texts,
    st.builds(lambda p, u, k, a: p + u * k + a, texts, units, st.integers(2, 40), texts),
)


@given(text=loopy, sizes=st.lists(st.integers(1, 9), max_size=80), exhausted=st.booleans())
def test_a_streamed_reply_is_the_whole_reply_without_its_loop(text, sizes, exhausted):
    guard, sent = ReplyGuard(), ""
    for chunk in _chunks(text, sizes)[:-1]:
        sent += guard.push(chunk)
        if guard.looping:
            break
    else:
        sent += guard.finish(_chunks(text, sizes)[-1], exhausted=exhausted)
    assert sent == cut_repetition(text, exhausted=exhausted)


REQUESTS = [
    FimRequest(prefix="def f(x):\n    ", suffix="\n\nprint(f(2))\n"),
    FimRequest(prefix="values = [", suffix="]\n"),
    FimRequest(prefix="class A:\n    def g(self):\n", suffix=""),
    FimRequest(prefix="", suffix="", mode="block"),
]


@settings(max_examples=200)
@given(
    text=loopy,
    sizes=st.lists(st.integers(1, 9), max_size=80),
    request=st.sampled_from(REQUESTS),
    exhausted=st.booleans(),
)
# a loop of lines dedented below the block: the block rule cuts first, without the newline
@example(text="0000000\n" * 20, sizes=[7, 9], request=REQUESTS[0], exhausted=False)
def test_a_streamed_fim_middle_is_the_whole_middle(text, sizes, request, exhausted):
    """The server's FIM tracker, fed the text in pieces and stopped where it says the middle has
    ended for good, releases exactly `clean` of all of it (a loop cut included)."""
    tracker, sent = FimTracker(request), ""
    chunks = _chunks(text, sizes)
    for chunk in chunks[:-1]:
        sent += tracker.push(chunk)
        if tracker.cut:  # the server cancels the sequence here
            sent += tracker.finish("")
            break
    else:
        sent += tracker.finish(chunks[-1], exhausted)
    assert sent == middle.clean(text, request, exhausted=exhausted)
