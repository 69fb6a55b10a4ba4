"""FIM requests, and the text rules that turn raw model output into the middle an editor inserts.

The one implementation of each rule, used by the command line, `codegemma.load(...).complete`,
the server (its three protocols, streamed or not) and the evaluation:
- `first_line`: single-line mode keeps the text before the first newline; single-line mode is on
  when the cursor is mid-line (`cursor_is_mid_line`: non-blank text follows it on its line);
- `limit_to_block`: block mode cuts where a later line dedents out of the cursor's block;
- `trim_suffix_repeat`: output that starts repeating the suffix is cut (a line equal to the
  suffix's next non-blank line, or a tail equal to the suffix's beginning, `suffix_overlap`);
- `clean`: all of the above, then whitespace-only output becomes "";
- `cut_at_stops`: text before the first of some stop strings (the evaluation's stop words).
Generation itself stops at the FIM sentinels and eos (`prompts.fim_stop_ids`), which is why no
rule here looks for sentinel text. This is the practice of Tabby, Continue and llama.vim.

    request = FimRequest(prefix="def add(a, b):\\n    return ", suffix="\\n")
    clean("a + b\\n\\nprint(add(1, 2))", request)   # -> "a + b\\n" ... cut at the block's end
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def truncate(text: str, request: FimRequest) -> str:
    """The rules that end a completion early: the first line only (single-line mode) or the
    cursor's block, and no repeat of the suffix. A streaming server stops generating once one of
    them has cut (server/serving.py's FimTracker)."""
    text = first_line(text) if request.single_line else limit_to_block(text, request.prefix)
    return trim_suffix_repeat(text, request.suffix)


def clean(text: str, request: FimRequest) -> str:
    """The editor-ready middle from raw generated text: `truncate`, then nothing at all if only
    whitespace is left."""
    text = truncate(text, request)
    return "" if not text.strip() else text
