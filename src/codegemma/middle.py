"""FIM requests, and the text rules that turn raw model output into the middle an editor inserts.

The one implementation of each rule, used by the command line, `codegemma.load(...).complete`,
the server (its three protocols, streamed or not) and the evaluation:
- `first_line`: single-line mode keeps the text before the first newline; single-line mode is on
  when the cursor is mid-line (`cursor_is_mid_line`: non-blank text follows it on its line);
- `limit_to_block`: block mode cuts where a later line dedents out of the cursor's block;
- `trim_suffix_repeat`: output that starts repeating the suffix is cut (a line equal to the
  suffix's next non-blank line, or a tail equal to the suffix's beginning, `suffix_overlap`);
- `cut_repetition`: a repetition loop (one character, an n-gram or a line over and over, what weak
  models fall into) is cut after its first copy; chat replies get this rule too (`ReplyGuard`
  streams a reply under it);
- `clean`: all of the above, then whitespace-only output becomes "";
- `cut_at_stops`: text before the first of some stop strings (the evaluation's stop words).
Generation itself stops at the FIM sentinels and eos (`prompts.fim_stop_ids`), which is why no
rule here looks for sentinel text. This is the practice of Tabby, Continue and llama.vim.

    request = FimRequest(prefix="def add(a, b):\\n    return ", suffix="\\n")
    clean("a + b\\n\\nprint(add(1, 2))", request)   # -> "a + b\\n" ... cut at the block's end
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codegemma.errors import UsageError
from codegemma.prompts import ContextFile, FimMode

MODES = ("auto", "line", "block")


@dataclass(frozen=True, kw_only=True)
class FimRequest:
    """One fill-in-the-middle request: the text around the cursor and how to complete it."""

    prefix: str
    suffix: str = ""
    path: str | None = None
    files: tuple[ContextFile, ...] = ()
    mode: str = "auto"  # auto | line | block
    fim_mode: FimMode = FimMode.PSM  # the prompt layout; CodeGemma documents PSM

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        try:
            object.__setattr__(self, "fim_mode", FimMode(self.fim_mode))
        except ValueError:
            raise UsageError(f"fim_mode must be psm or spm; got {self.fim_mode!r}") from None
        files = tuple(f if isinstance(f, ContextFile) else ContextFile(**f) for f in self.files)
        object.__setattr__(self, "files", files)

    @property
    def single_line(self) -> bool:
        if self.mode != "auto":
            return self.mode == "line"
        return cursor_is_mid_line(self.suffix)


def cursor_is_mid_line(suffix: str) -> bool:
    return bool(suffix.split("\n", 1)[0].strip())


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` before the earliest occurrence of any of `stops`."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def limit_to_block(text: str, prefix: str) -> str:
    """Cut before the first later line that dedents below the cursor's block.

    The block's indentation: the cursor line's, if it has text; the cursor's column, if the line is
    only indentation; at column 0, the last non-blank line's (one deeper if it opens a block)."""
    current = prefix.rsplit("\n", 1)[-1]
    if current.strip():
        base = _indent(current)
    elif current:
        base = len(current)
    else:
        previous = [ln for ln in prefix.split("\n")[:-1] if ln.strip()]
        if not previous:
            return text
        opens = previous[-1].rstrip().endswith((":", "{", "(", "["))
        base = _indent(previous[-1]) + opens
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and _indent(line) < base:
            return "\n".join(lines[:i])  # the suffix brings its own newline
    return text


def suffix_overlap(text: str, suffix: str, *, blank: bool = True) -> int:
    """Length of the longest tail of `text` that is a beginning of `suffix` (0 if none); with
    `blank=False` an overlap that is only whitespace does not count."""
    for k in range(min(len(text), len(suffix)), 0, -1):
        if (blank or suffix[:k].strip()) and text.endswith(suffix[:k]):
            return k
    return 0


def trim_suffix_repeat(text: str, suffix: str) -> str:
    """Cut where the completion starts repeating the suffix."""
    next_line = next((ln.strip() for ln in suffix.split("\n") if ln.strip()), "")
    if next_line:
        lines = text.split("\n")
        for i, line in enumerate(lines[1:], start=1):
            if line.strip() == next_line:
                return "\n".join(lines[:i])
    return text[: len(text) - suffix_overlap(text, suffix, blank=False)]


def truncate(text: str, request: FimRequest, *, exhausted: bool = False) -> str:
    """The rules that end a completion early: no repetition loop (`cut_repetition`; `exhausted`:
    the generation ran out of tokens), then the first line only (single-line mode) or the cursor's
    block, and no repeat of the suffix. A streaming server stops generating once one of them has
    cut (server/serving.py's FimTracker).

    The line rules read the whole text, not what the loop rule left of it, and the earlier cut
    wins: a loop of whole lines cut after its first line keeps that line's newline, where the
    block rule, seeing the next line, drops it, and a streaming server that stopped on the block
    rule must send what this function gives for all the text."""
    looped = cut_repetition(text, exhausted=exhausted)
    lines = first_line(text) if request.single_line else limit_to_block(text, request.prefix)
    return trim_suffix_repeat(min(looped, lines, key=len), request.suffix)


def clean(text: str, request: FimRequest, *, exhausted: bool = False) -> str:
    """The editor-ready middle from raw generated text: `truncate`, then nothing at all if only
    whitespace is left."""
    text = truncate(text, request, exhausted=exhausted)
    return "" if not text.strip() else text


# -- repetition loops ----------------------------------------------------------------------------
# A loop is an exact periodic stretch of the text: each character equal to the one `unit`
# characters before it, for a unit of 1 to LOOP_UNIT characters (`iiii`, `0000`, `))))`, `the list
# of the list of`, `self.assertEqual(self.assertEqual(`, a line over and over). Legitimate code
# repeats too (`[0, 0, 0]`, a `====` underline, `b"\x00\x00"`, runs of indentation, a few equal
# lines), so the thresholds ask for more than code writes: anywhere in the text, LOOP_SPAN
# characters and LOOP_COPIES copies of the unit; at the end of a generation that ran out of tokens
# (the loop never ended), TAIL_SPAN characters and TAIL_COPIES copies, a single character more
# than TAIL_ONE_CHAR times (longer than an underline or a comment banner of a 79-column line), a
# unit of only whitespace never (indentation that a token limit interrupted). Similar but unequal
# lines never count (Tabby's edit-distance rule would cut a column of near-identical asserts).
# scripts/repetition_scan.py measures how often the rule fires on real code.
LOOP_UNIT = 80  # the longest unit looked for: a line
LOOP_SPAN, LOOP_COPIES = 160, 8
TAIL_SPAN, TAIL_COPIES, TAIL_ONE_CHAR = 32, 5, 80
NOT_A_CHARACTER = 0xFFFFFFFF  # above every code point: padding equal to no character


@dataclass(frozen=True)
class Repetition:
    """Where the repetition rule cuts a text. Cuts keep the loop's first copy (and, for a unit
    spanning lines, the rest of the line it ends in)."""

    loop: int | None  # a loop anywhere: final, more text cannot move it (the earliest to end)
    tail: int | None  # a loop the text ends in: the cut when the generation ran out of tokens
    settled: int  # no cut that more text may bring can fall before this index


def cut_repetition(text: str, *, exhausted: bool = False) -> str:
    """`text` without a repetition loop: cut after the loop's first copy. `exhausted`: the text
    is the whole output of a generation that ran out of tokens, so a loop at its end counts at
    the lower tail thresholds."""
    found = repetition(text)
    cut = found.loop if found.loop is not None else found.tail if exhausted else None
    return text if cut is None else text[:cut]


class ReplyGuard:
    """A reply (chat) streamed without its repetition loop: `push(delta)` returns the text no loop
    can take back any more, `looping` turns True once a loop is found (the rest would be cut: stop
    generating), `finish(delta, exhausted=...)` returns the rest. What it returns adds up to
    `cut_repetition(whole text, exhausted=...)`."""

    def __init__(self) -> None:
        self.raw, self.sent, self.looping = "", 0, False

    def push(self, delta: str) -> str:
        if self.looping:
            return ""
        self.raw += delta
        found = repetition(self.raw)
        self.looping = found.loop is not None
        return self._release(found.loop if self.looping else found.settled)

    def finish(self, delta: str = "", *, exhausted: bool = False) -> str:
        if self.looping:
            return ""
        self.raw += delta
        return self._release(len(cut_repetition(self.raw, exhausted=exhausted)))

    def _release(self, end: int) -> str:
        text, self.sent = self.raw[self.sent : end], max(self.sent, end)
        return text


@functools.lru_cache(maxsize=64)  # a streaming tracker asks about the same text several times
def repetition(text: str) -> Repetition:
    """The repetition loops of `text`: where they cut it, and how much of it is settled."""
    n = len(text)
    if n < 2:
        return Repetition(None, None, n)
    same = _same_as_before(text)
    units = np.arange(1, len(same) + 1)
    # the run of matches each unit length has at the end of the text
    trailing = np.argmax(~same[:, ::-1], axis=1)
    settled = n - int(trailing.max())  # the second copy of the longest run at the end
    loop = _first_loop(text, same, _needed(units, LOOP_SPAN, LOOP_COPIES, LOOP_SPAN))
    needed = _needed(units, TAIL_SPAN, TAIL_COPIES, TAIL_ONE_CHAR)
    tails = [
        (n - int(trailing[i]), int(i) + 1)
        for i in np.flatnonzero(trailing >= needed)
        if _is_unit(_unit(text, n - int(trailing[i]), int(i) + 1), blank=False)
    ]
    tail = _keep_line(text, *min(tails)) if tails else None
    return Repetition(loop, tail, settled)


def _same_as_before(text: str) -> np.ndarray:
    """same[u - 1, p]: text[p] == text[p - u], for units u of 1 to LOOP_UNIT characters (shorter
    than the text). A run of k such matches ending at p is a stretch of period u:
    text[p - k - u + 1 : p + 1]."""
    n = len(text)
    units = min(LOOP_UNIT, n - 1)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    padded = np.concatenate((np.full(units, NOT_A_CHARACTER, dtype=np.uint32), codes))
    before = np.lib.stride_tricks.sliding_window_view(padded, n)[units - 1 :: -1]  # row u - 1
    return before == codes  # is text[p - u] (padding before the text)


def _needed(units: np.ndarray, span: int, copies: int, one_char: int) -> np.ndarray:
    """The run of matches (characters beyond the first copy) a unit of each length needs."""
    spans = np.maximum(span, copies * units)
    spans[0] = max(spans[0], one_char)
    return spans - units


def _first_loop(text: str, same: np.ndarray, needed: np.ndarray) -> int | None:
    """The cut of the loop that reaches its threshold first (ties: the earliest cut)."""
    best: tuple[int, int, int] | None = None  # (where it reaches the threshold, cut, unit)
    for i in np.flatnonzero(_has_run(same, int(needed.min()))):
        k, size = int(needed[i]), int(i) + 1
        count = np.concatenate(([0], np.cumsum(same[i], dtype=np.int32)))
        full = np.flatnonzero(count[k:] - count[:-k] == k) + k - 1  # ends of k matches in a row
        for end in full[np.diff(full, prepend=-2) != 1]:  # where each run crosses k
            cut = int(end) - k + 1
            if _is_unit(_unit(text, cut, size), blank=True):
                best = min(best or (int(end), cut, size), (int(end), cut, size))
                break
    return None if best is None else _keep_line(text, best[1], best[2])


def _has_run(same: np.ndarray, k: int) -> np.ndarray:
    """Rows with a run of at least the largest power of two <= k matches (a quick filter: a few
    whole-array ANDs instead of a scan per row)."""
    shift = 1
    while 2 * shift <= k and same.shape[1] > shift:
        same = same[:, :-shift] & same[:, shift:]
        shift *= 2
    return same.any(axis=1)


def _unit(text: str, cut: int, size: int) -> str:
    return text[cut - size : cut]


def _is_unit(unit: str, *, blank: bool) -> bool:
    """`unit` is no repetition of a shorter one (whose row counts the same run), and has a
    non-blank character unless `blank` units count."""
    if not blank and not unit.strip():
        return False
    size = len(unit)
    return not any(size % d == 0 and unit[:d] * (size // d) == unit for d in range(1, size))


def _keep_line(text: str, cut: int, size: int) -> int:
    """A cut after a first copy that spans lines keeps the rest of the line it stops in (which
    the second copy holds), so the completion still ends with its newline."""
    if "\n" in _unit(text, cut, size) and text[cut - 1] != "\n":
        return text.index("\n", cut) + 1
    return cut
