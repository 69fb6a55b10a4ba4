"""Fill-in-the-middle training samples: split points, PSM/SPM layout, repo samples and rows.

CodeGemma trains with FIM rate 0.8 (0.9 for 2B v1.1), PSM and SPM 50-50 (CodeGemma report,
arXiv:2406.11409; the FIM paper, Bavarian et al. 2022, arXiv:2207.14255). Token layouts come
from `codegemma.prompts`, the one place shared with inference. Two levels (`FimConfig.fim_level`):

* "context" (default) - the FIM paper's context-level FIM, which it finds better than
  document-level: repositories are packed plainly into the token stream first, and each
  training row of `seq_len` tokens is then FIM'd with probability `rate` (`fim_row`,
  `ContextPacker`). One file-part of the row is FIM'd, so every FIM'd row holds exactly one
  whole example whose prefix, suffix and middle are all in the row.
* "document" - each file of a repository sample is FIM'd on its own before the sample is cut
  into rows (`build_repo_sample`); a FIM'd file longer than a row puts its sentinels in one row
  and its middle in another.

Three split modes:

* "char"   - the FIM paper's: two uniform character positions.
* "line"   - two uniform line boundaries, so the middle is whole lines.
* "syntax" - with tree-sitter (AST-FIM style): the middle is exactly one named syntax node, or
  a run of consecutive named sibling nodes, chosen with probability proportional to its size
  in characters among nodes that are neither the whole text (ignoring surrounding whitespace)
  nor shorter than `min_node_chars`. The suffix therefore starts where a construct ends. A
  language without a grammar, a tree with no usable node, or text tree-sitter cannot take
  (lone surrogates) falls back to "char", and the reason is counted. At context level the text
  parsed is the file-part inside the row, so the middle is a node that lies inside the row.
  With probability `line_align_rate` a node (or run) that starts a line's code and ends the
  line is widened to whole lines: its indentation and its newline move into the middle, so the
  prefix ends with a newline and the suffix starts the next line. That is the shape of a line
  an editor or a benchmark asks for (HumanEval's single- and multi-line infilling); without it
  the prefix always ends with the line's indentation and the middle never holds a newline at
  its end.

A FIM'd file or row is split "syntax" with probability `syntax_rate`, "line" with `line_rate`,
else "char" (default 90/0/10, as AST-FIM mixes 90% syntax and 10% random spans). Every choice for
a file comes from a `random.Random` seeded by blake2b(seed, document id), and every choice for a
row from one seeded by blake2b(seed, shard, row index), so the output is the same in every
process, whichever executor ran it and whether or not the run was resumed.

    from codegemma.data.fim import FimConfig, build_repo_sample
    sample = build_repo_sample(tok, packed.documents, FimConfig(fim_level="document"), seed=0)
    sample.tokens, sample.stats["fim"]

    packer = ContextPacker(tok, seq_len=2048, config=FimConfig(), seed=0)
    rows = list(packer.add(plain_repo_sample(tok, packed.documents).stream(tok)))

Grammars: the per-language `tree-sitter-<lang>` wheels (compiled in, no network) and, for any
language they lack, grammars that `tree-sitter-language-pack` has already downloaded.
"""

from __future__ import annotations

import bisect
import functools
import importlib
import itertools
import random
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codegemma import prompts
from codegemma.data.base import stable_int
from codegemma.data.document import Document, language_of
from codegemma.errors import FimError
from codegemma.options import option

SPLIT_MODES = ("char", "line", "syntax")
FIM_LEVELS = ("context", "document")

# our language name -> (wheel module, function returning the language pointer)
_GRAMMAR_WHEELS: dict[str, tuple[str, str]] = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "java": ("tree_sitter_java", "language"),
    "kotlin": ("tree_sitter_kotlin", "language"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
    "csharp": ("tree_sitter_c_sharp", "language"),
}
_PACK_NAMES: dict[str, tuple[str, ...]] = {"csharp": ("csharp", "c_sharp")}


@dataclass(frozen=True, kw_only=True)
class FimConfig:
    fim_level: str = option(
        "context",
        "where FIM applies: each training row after packing (context, the FIM paper's "
        "better choice) or each file before packing (document)",
        choices=FIM_LEVELS,
    )
    rate: float = option(0.8, "share of rows (context level) or files (document level) FIM'd")
    spm_rate: float = option(0.5, "share of FIM'd rows or files in SPM layout, the rest PSM")
    syntax_rate: float = option(0.9, "share of FIM'd rows or files split at syntax nodes")
    line_rate: float = 0.0  # share split at line boundaries; the remainder is char-level
    max_middle_chars: int | None = None  # cap on the middle's length, any mode
    sibling_run_rate: float = 0.3  # syntax mode: chance a node with later siblings is widened
    line_align_rate: float = option(
        0.5, "share of syntax-mode middles widened to whole lines, when they fill their lines"
    )
    min_node_chars: int = 3  # syntax mode: smaller nodes are not middles

    def __post_init__(self) -> None:
        if self.fim_level not in FIM_LEVELS:
            raise FimError(
                f"FimConfig.fim_level must be one of {FIM_LEVELS}, got {self.fim_level!r}"
            )
        for name in (
            "rate",
            "spm_rate",
            "syntax_rate",
            "line_rate",
            "sibling_run_rate",
            "line_align_rate",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise FimError(f"FimConfig.{name} must be a probability in [0, 1], got {value!r}")
        if self.syntax_rate + self.line_rate > 1 + 1e-9:
            raise FimError(
                f"FimConfig.syntax_rate + line_rate = {self.syntax_rate + self.line_rate} exceeds 1; "
                "the char-level share is what remains, so lower one of them"
            )
        cap = self.max_middle_chars
        if cap is not None and not (_is_int(cap) and cap >= 1):
            raise FimError(f"FimConfig.max_middle_chars must be None or an int >= 1, got {cap!r}")
        if not (_is_int(self.min_node_chars) and self.min_node_chars >= 1):
            raise FimError(
                f"FimConfig.min_node_chars must be an int >= 1, got {self.min_node_chars!r}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class FimSplit:
    """text == prefix + middle + suffix. `mode` is the mode used; `fallback` says why a
    requested "syntax" split became "char" ("no_grammar", "encoding", "no_nodes")."""

    prefix: str
    middle: str
    suffix: str
    mode: str
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class FileFim:
    """What happens to one file: plain (`layout` None) or FIM'd with `split` in `layout`."""

    path: str
    layout: prompts.FimMode | None
    requested: str | None  # the split mode drawn, before any fallback
    split: FimSplit | None


@dataclass(frozen=True, kw_only=True)
class RepoSample:
    tokens: list[int]
    stats: Counter[str]


# -- grammars ----------------------------------------------------------------------------------


@functools.cache
def parser_for(language: str) -> Any | None:
    """A cached tree-sitter Parser for our language name ("tsx" too), or None without a grammar.

    Parsers are not thread-safe: share this cache across processes, not threads.
    """
    import tree_sitter

    wheel = _GRAMMAR_WHEELS.get(language)
    if wheel is not None:
        try:
            pointer = getattr(importlib.import_module(wheel[0]), wheel[1])()
            return tree_sitter.Parser(tree_sitter.Language(pointer))
        except (ImportError, AttributeError, ValueError):
            pass
    try:  # the language pack downloads grammars on first use; use only what it already has
        import tree_sitter_language_pack as pack

        have = set(pack.downloaded_languages())
        for name in _PACK_NAMES.get(language, (language,)):
            if name in have:
                return pack.get_parser(name)
    except Exception:  # noqa: BLE001 - any failure of the optional pack means "no grammar"
        return None
    return None


def grammar_name(language: str | None, path: str = "") -> str | None:
    """The grammar to parse a file with: TSX files need the tsx grammar, not TypeScript's."""
    if language == "typescript" and path.endswith(".tsx"):
        return "tsx"
    return language


# -- split modes -------------------------------------------------------------------------------


def split(
    text: str,
    language: str | None,
    mode: str,
    rng: random.Random,
    *,
    max_middle_chars: int | None = None,
    sibling_run_rate: float = 0.3,
    min_node_chars: int = 3,
    line_align_rate: float = 0.0,
) -> FimSplit:
    """Split `text` into prefix, middle, suffix by `mode` ("char", "line" or "syntax")."""
    if mode not in SPLIT_MODES:
        raise FimError(f"unknown split mode {mode!r}; use one of {SPLIT_MODES}")
    if mode == "line":
        return _points_split(text, _line_points(text), rng, max_middle_chars, "line")
    if mode == "syntax":
        span = _syntax_span(text, language, rng, max_middle_chars, sibling_run_rate, min_node_chars)
        if isinstance(span, tuple):
            i, j = span
            if line_align_rate and rng.random() < line_align_rate:
                i, j = _whole_lines(text, i, j)
            return FimSplit(text[:i], text[i:j], text[j:], "syntax")
        fallback = _points_split(text, None, rng, max_middle_chars, "char")
        return FimSplit(fallback.prefix, fallback.middle, fallback.suffix, "char", span)
    return _points_split(text, None, rng, max_middle_chars, "char")


def _whole_lines(text: str, i: int, j: int) -> tuple[int, int]:
    """[i, j) widened to whole lines when only indentation precedes it on its first line and only
    trailing blanks follow it on its last (a statement, a block); otherwise unchanged."""
    start = text.rfind("\n", 0, i) + 1
    end = text.find("\n", j)
    end = len(text) if end < 0 else end + 1
    if text[start:i].strip(" \t") or text[j:end].strip():
        return i, j
    return start, end


def _line_points(text: str) -> list[int]:
    points = [0] + [k + 1 for k, ch in enumerate(text) if ch == "\n"]
    if points[-1] != len(text):
        points.append(len(text))
    return points


def _points_split(
    text: str, points: list[int] | None, rng: random.Random, cap: int | None, mode: str
) -> FimSplit:
    """Two uniform split points (any character position when `points` is None). A middle longer
    than `cap` keeps its start and redraws its end uniformly among points within `cap`."""
    n = len(text)
    if points is None:
        i, j = sorted((rng.randint(0, n), rng.randint(0, n)))
        if cap is not None and j - i > cap:
            j = rng.randint(i, i + cap)
    else:
        a, b = sorted((rng.randrange(len(points)), rng.randrange(len(points))))
        i, j = points[a], points[b]
        if cap is not None and j - i > cap:
            hi = bisect.bisect_right(points, i + cap) - 1
            j = points[rng.randint(a, hi)]
    return FimSplit(text[:i], text[i:j], text[j:], mode)


def _char_offsets(data: bytes) -> np.ndarray:
    """Map UTF-8 byte offsets (0..len) to str indices: count the bytes that start a character."""
    starts = (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80
    return np.concatenate(([0], np.cumsum(starts, dtype=np.int64)))


def _syntax_span(
    text: str,
    language: str | None,
    rng: random.Random,
    cap: int | None,
    run_rate: float,
    min_chars: int,
) -> tuple[int, int] | str:
    """(start, end) str indices of a size-weighted node or sibling run, or a fallback reason."""
    parser = parser_for(language) if language else None
    if parser is None:
        return "no_grammar"
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return "encoding"
    offsets = None if text.isascii() else _char_offsets(data)

    def span(node: Any) -> tuple[int, int]:
        s, e = node.start_byte, node.end_byte
        return (s, e) if offsets is None else (int(offsets[s]), int(offsets[e]))

    lead, trail = len(text) - len(text.lstrip()), len(text.rstrip())
    limit = cap if cap is not None else len(text)

    def usable(s: int, e: int) -> bool:
        return min_chars <= e - s <= limit and not (s <= lead and e >= trail)

    nodes, cum, total = [], [], 0
    for node in _named_nodes(parser.parse(data).root_node):
        s, e = span(node)
        if usable(s, e):
            total += e - s
            nodes.append(node)
            cum.append(total)
    if not nodes:
        return "no_nodes"
    node = nodes[bisect.bisect_right(cum, rng.random() * total)]
    s, e = span(node)
    if node.parent is not None and rng.random() < run_rate:
        # widen to a run: from this node to one of its later named siblings, when any fits
        later = [c for c in node.parent.named_children if c.start_byte >= node.end_byte]
        ends = [span(c)[1] for c in later if not c.is_extra and usable(s, span(c)[1])]
        if ends:
            e = ends[rng.randrange(len(ends))]
    return s, e


def _named_nodes(root: Any) -> Iterator[Any]:
    """Named, error-free, non-extra descendants of `root` (root excluded), by a tree cursor."""
    cursor = root.walk()
    depth = 0
    while True:
        if cursor.goto_first_child():
            depth += 1
        else:
            while not cursor.goto_next_sibling():
                if depth <= 1 or not cursor.goto_parent():
                    return
                depth -= 1
        node = cursor.node
        if node.is_named and not node.is_extra and not node.has_error and not node.is_missing:
            yield node


# -- per file and per repository ---------------------------------------------------------------


def file_rng(seed: int, doc_id: str) -> random.Random:
    """A generator for one file, seeded by `stable_int(seed, id)`."""
    return random.Random(stable_int(seed, doc_id))


def _draw(rng: random.Random, config: FimConfig) -> tuple[bool, bool, str]:
    """The first three draws of a file or a row, always all three: FIM?, SPM?, split mode."""
    is_fim, is_spm, u_mode = (
        rng.random() < config.rate,
        rng.random() < config.spm_rate,
        rng.random(),
    )
    if u_mode < config.syntax_rate:
        return is_fim, is_spm, "syntax"
    if u_mode < config.syntax_rate + config.line_rate:
        return is_fim, is_spm, "line"
    return is_fim, is_spm, "char"


def fim_file(doc: Document, config: FimConfig, seed: int) -> FileFim:
    """Decide and split one file; the draws are, in order: FIM?, layout, split mode, split."""
    rng = file_rng(seed, doc.id)
    is_fim, is_spm, mode = _draw(rng, config)
    if not is_fim:
        return FileFim(path=doc.path, layout=None, requested=None, split=None)
    language = grammar_name(doc.language or language_of(doc.path, doc.text), doc.path)
    parts = split(
        doc.text,
        language,
        mode,
        rng,
        max_middle_chars=config.max_middle_chars,
        sibling_run_rate=config.sibling_run_rate,
        line_align_rate=config.line_align_rate,
        min_node_chars=config.min_node_chars,
    )
    layout = prompts.FimMode.SPM if is_spm else prompts.FimMode.PSM
    return FileFim(path=doc.path, layout=layout, requested=mode, split=parts)


def build_repo_sample(
    tok: Any, docs: Sequence[Document], config: FimConfig, seed: int
) -> RepoSample:
    """Token ids of one repository sample: per file `path\\n` + body (plain or FIM'd), files
    joined by <|file_separator|>, in the given (packing) order. No bos: the shard packer adds it."""
    _check_args(config, seed)
    stats: Counter[str] = Counter()
    files_ids = []
    for doc in _checked_docs(docs):
        plan = fim_file(doc, config, seed)
        stats["files"] += 1
        if plan.split is None:
            stats["plain"] += 1
            body = tok.encode(doc.text)
        else:
            parts = plan.split
            stats["fim"] += 1
            stats[plan.layout.value] += 1
            stats[f"split_{parts.mode}"] += 1
            if parts.fallback:
                stats[f"syntax_fallback_{parts.fallback}"] += 1
            body = prompts.fim_example(
                tok, parts.prefix, parts.middle, parts.suffix, mode=plan.layout
            )
        files_ids.append(prompts.file_tokens(tok, doc.path, body))
    tokens = prompts.join_files(tok, files_ids)
    stats["tokens"] += len(tokens)
    return RepoSample(tokens=tokens, stats=stats)


def _check_args(config: object, seed: object) -> None:
    if not isinstance(config, FimConfig):
        raise FimError(f"config must be a FimConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FimError(f"seed must be an int, got {seed!r}")


def _checked_docs(docs: Sequence[Document]) -> Iterator[Document]:
    for doc in docs:
        if not isinstance(doc, Document):
            raise FimError(f"docs must be Document records, got {type(doc).__name__}")
        yield doc


# -- context level: FIM per training row -------------------------------------------------------
#
# A FIM'd row must still be exactly `seq_len` tokens and hold the same text as the stream tokens
# it stands for. Its sentinels take 3 places, and prefix, middle and suffix encoded apart can take
# a token or two more than the text took in the stream, so a FIM'd row holds fewer stream tokens
# than a plain one. The row is cut at its end: first the plain tokens after the FIM'd part (other
# files), then the end of the suffix, which is why a part that reaches the row's end keeps its
# last RESERVE_TOKENS out of the split and in the suffix. What is cut is `carry`: tokens with
# exactly the cut text, put back at the front of the stream, where they start the next row. So no
# text is lost or repeated; the only tokens lost are the shard's last partial row, as at
# document level. A row drawn for FIM that cannot be made so (no file-part of MIN_PART_TOKENS,
# or a cut that would split a character) stays plain, and the reason is counted.

RESERVE_TOKENS = 8
MIN_PART_TOKENS = 16
_CHAR_TOKENS = 4  # a UTF-8 character is at most 4 byte-fallback tokens


@dataclass(frozen=True, slots=True)
class BodySpan:
    """Where a file's body lies in a token sequence: tokens [start, end), parsed with the grammar
    `language` (None: no grammar, so char-level splits)."""

    start: int
    end: int
    language: str | None


@dataclass(frozen=True, kw_only=True)
class PlainSample:
    """A repository sample without FIM (the tokens `build_repo_sample` makes at rate 0) and the
    span of every file body in it, which is all context-level FIM may split."""

    tokens: list[int]
    bodies: tuple[BodySpan, ...]
    stats: Counter[str]

    def stream(self, tok: Any) -> tuple[list[int], tuple[BodySpan, ...]]:
        """`<bos> sample <eos>`, as the shards hold a repository, with the bodies shifted to it."""
        shifted = tuple(BodySpan(b.start + 1, b.end + 1, b.language) for b in self.bodies)
        return [tok.bos_id, *self.tokens, tok.eos_id], shifted


def plain_repo_sample(tok: Any, docs: Sequence[Document]) -> PlainSample:
    """Token ids of one repository sample with every file plain (`path\\n` + body, files joined by
    <|file_separator|>, layout from `codegemma.prompts`), and where each body lies."""
    files_ids: list[list[int]] = []
    bodies: list[BodySpan] = []
    offset = 0
    for doc in _checked_docs(docs):
        body = tok.encode(doc.text)
        ids = prompts.file_tokens(tok, doc.path, body)
        if body and ids[len(ids) - len(body) :] != body:
            raise FimError("prompts.file_tokens no longer ends with the body; update fim.py")
        offset += bool(files_ids)  # the <|file_separator|> before every file but the first
        start = offset + len(ids) - len(body)
        language = grammar_name(doc.language or language_of(doc.path, doc.text), doc.path)
        bodies.append(BodySpan(start, start + len(body), language))
        offset += len(ids)
        files_ids.append(ids)
    tokens = prompts.join_files(tok, files_ids)
    if len(tokens) != offset:
        raise FimError("prompts.join_files no longer puts one token between files; update fim.py")
    stats = Counter({"files": len(bodies), "tokens": len(tokens)})
    return PlainSample(tokens=tokens, bodies=tuple(bodies), stats=stats)


@dataclass(frozen=True, kw_only=True)
class RowFim:
    """One training row (`tokens`, as long as the window it was made from) and `carry`: tokens
    holding the text at the window's end that did not fit; they go back to the stream's front.
    `layout` is None for a plain row; `skipped` says why a row drawn for FIM stayed plain.
    `split` is the split of the FIM'd part without its reserved last tokens, whose text (less
    what the carry took) follows `split.suffix` in the row's suffix."""

    tokens: list[int]
    carry: list[int]
    layout: prompts.FimMode | None = None
    requested: str | None = None
    split: FimSplit | None = None
    skipped: str | None = None


def row_rng(seed: int, shard: int, index: int) -> random.Random:
    """The generator of row `index` of output shard `shard`: a pure function of the three, so a
    resumed run and every executor draw the same."""
    return random.Random(stable_int(seed, "row", shard, index))


def _clean_cut(tok: Any, ids: Sequence[int], x: int) -> bool:
    """True when cutting `ids` before index x splits no UTF-8 character. The stream is valid
    UTF-8, so a cut splits one exactly when the token after it is a continuation byte (the
    stream decoder answers U+FFFD for it at once) or, at the end of `ids`, when the last
    character is incomplete (the decoder still holds it back)."""
    decoder = tok.stream_decoder()
    if x < len(ids):
        return not decoder.push(ids[x]).startswith("\ufffd")
    for t in ids[-_CHAR_TOKENS:]:
        decoder.push(t)
    return decoder.flush() == ""


def _clean_near(tok: Any, ids: Sequence[int], x: int, step: int) -> int | None:
    """The first clean cut from x going `step` (+1 or -1), within one character's tokens."""
    for y in range(x, x + step * _CHAR_TOKENS, step):
        if 0 <= y <= len(ids) and _clean_cut(tok, ids, y):
            return y
    return None


@dataclass(frozen=True, slots=True)
class _Part:
    start: int
    end: int
    language: str | None
    ends_body: bool  # the body ends at `end` (else the window cuts it)


def _row_parts(tok: Any, window: Sequence[int], bodies: Sequence[BodySpan]) -> list[_Part]:
    """The file-parts of a window (bodies relative to it, clipped to it) that can be FIM'd: at
    least MIN_PART_TOKENS, and cut by the window's edges only between characters."""
    parts = []
    n = len(window)
    for body in bodies:
        a, b = max(body.start, 0), min(body.end, n)
        if body.start < 0:
            a = _clean_near(tok, window, a, +1)
        if body.end > n:
            b = _clean_near(tok, window, b, -1)
        if a is not None and b is not None and b - a >= MIN_PART_TOKENS:
            parts.append(_Part(a, b, body.language, body.end <= n))
    return parts


def _pick(parts: list[_Part], rng: random.Random) -> _Part:
    """A part with probability proportional to its length in tokens."""
    cum = list(itertools.accumulate(p.end - p.start for p in parts))
    return parts[bisect.bisect_right(cum, rng.random() * cum[-1])]


def fim_row(
    tok: Any,
    window: Sequence[int],
    bodies: Sequence[BodySpan],
    config: FimConfig,
    rng: random.Random,
) -> RowFim:
    """Make one row from `window` (the next row's worth of stream tokens; `bodies` relative to
    it): plain, or with one file-part FIM'd, exactly `len(window)` tokens either way.

    Draws, in order: FIM?, layout, split mode (as for a file), then the part, then the split."""
    window = list(window)
    is_fim, is_spm, mode = _draw(rng, config)
    if not is_fim:
        return RowFim(tokens=window, carry=[])
    candidates = _row_parts(tok, window, bodies)
    if not candidates:
        return RowFim(tokens=window, carry=[], skipped="no_part")
    part = _pick(candidates, rng)
    layout = prompts.FimMode.SPM if is_spm else prompts.FimMode.PSM
    a, b = part.start, part.end
    keep = window[b:] if part.ends_body else []  # other files after the part: cut first
    lost = [] if part.ends_body else window[b:]  # the rest of a character the window cut
    q = _clean_near(tok, window, b - max(0, RESERVE_TOKENS - len(keep)), -1)
    if q is None or q <= a:
        return RowFim(tokens=window, carry=[], skipped="fit")
    parts = split(
        tok.decode(window[a:q]),
        part.language,
        mode,
        rng,
        max_middle_chars=config.max_middle_chars,
        sibling_run_rate=config.sibling_run_rate,
        line_align_rate=config.line_align_rate,
        min_node_chars=config.min_node_chars,
    )
    fitted = _fit(tok, window, part, keep, layout, parts, tok.decode(window[q:b]))
    if fitted is None or len(fitted[1]) + len(lost) >= len(window) - a:
        # no exact fit, or the carry would outgrow the part (the next row must move on)
        return RowFim(tokens=window, carry=[], skipped="fit")
    row, carry = fitted
    return RowFim(
        tokens=row,
        carry=carry + lost,
        layout=layout,
        requested=mode,
        split=parts,
    )


def _fit(
    tok: Any,
    window: list[int],
    part: _Part,
    keep: list[int],
    layout: prompts.FimMode,
    parts: FimSplit,
    tail: str,
) -> tuple[list[int], list[int]] | None:
    """(row, carry) of exactly `len(window)` row tokens: the example of `parts` (its suffix
    extended by `tail`) after the window's tokens before the part, then as many of `keep` as fit;
    when none fit, the suffix gives up its last tokens. None when no exact fit exists."""
    before, n = window[: part.start], len(window)
    prefix, middle, suffix = parts.prefix, parts.middle, parts.suffix + tail
    example = prompts.fim_example(tok, prefix, middle, suffix, mode=layout)
    cut = len(before) + len(example) + len(keep) - n
    if cut < 0:
        return None  # the text took fewer tokens than in the stream: the row would be short
    if cut <= len(keep):
        return before + example + keep[: len(keep) - cut], keep[len(keep) - cut :]
    sp = tok.special
    suffix_ids = example[example.index(sp.fim_suffix) + 1 : example.index(sp.fim_middle)]
    k = len(suffix_ids) - (cut - len(keep))
    if k < 0:
        return None
    kept, rest = tok.decode(suffix_ids[:k]), suffix_ids[k:]
    if kept + tok.decode(rest) != suffix:
        return None  # the cut would split a character
    example = prompts.fim_example(tok, prefix, middle, kept, mode=layout)
    if len(before) + len(example) != n:
        return None  # the kept suffix encodes differently on its own
    return before + example, rest + keep


def restore_row(tok: Any, row: Sequence[int]) -> list[int]:
    """`row` with its FIM example back in reading order (prefix, middle, suffix) and its three
    sentinels removed; a row without one comes back as it is. The middle runs to the next bos,
    eos or file separator, or to the row's end. Tests check FIM'd rows with it."""
    sp = tok.special
    row = list(row)
    if sp.fim_prefix not in row:
        return row
    i = row.index(sp.fim_prefix)
    j = row.index(sp.fim_suffix, i)
    k = row.index(sp.fim_middle, j)
    bounds = {sp.bos, sp.eos, sp.file_separator}
    end = next((x for x in range(k + 1, len(row)) if row[x] in bounds), len(row))
    # PSM: <pre>P<suf>S<mid>M   SPM: <pre><suf>S<mid>P M (nothing between <pre> and <suf>)
    return row[:i] + row[i + 1 : j] + row[k + 1 : end] + row[j + 1 : k] + row[end:]


class ContextPacker:
    """Cuts a token stream into rows of `seq_len` tokens and FIMs each with probability
    `config.rate` (`fim_row`): context-level FIM, applied after packing (the FIM paper, §4).

    Row r of shard s draws from `row_rng(seed, s, r)`. A FIM'd row's `carry` goes back to the
    stream's front, in the places of the tokens it stands for, and starts the next row. `add`
    returns the rows completed so far; `finish` returns the tail shorter than a row (the shard
    writer drops and counts it). `stats` counts rows by layout, split mode and skip reason.

        packer = ContextPacker(tok, 2048, FimConfig(), seed=0, shard=3)
        for tokens, bodies in streams: rows += packer.add(tokens, bodies)
        tail = packer.finish()
    """

    def __init__(
        self, tok: Any, seq_len: int, config: FimConfig, *, seed: int, shard: int = 0
    ) -> None:
        _check_args(config, seed)
        if not (_is_int(seq_len) and seq_len >= 2 * MIN_PART_TOKENS):
            raise FimError(
                f"context-level FIM needs seq_len >= {2 * MIN_PART_TOKENS}, got {seq_len!r}; "
                "use a longer --seq-len or --fim-level document"
            )
        self.tok, self.seq_len, self.config = tok, seq_len, config
        self.seed, self.shard = seed, shard
        self.rows = 0
        self.stats: Counter[str] = Counter()
        self._buf: list[int] = []
        self._head = 0
        self._bodies: deque[BodySpan] = deque()

    def add(self, tokens: Sequence[int], bodies: Sequence[BodySpan] = ()) -> list[list[int]]:
        """Append a piece of the stream (`bodies` relative to `tokens`); the rows now complete."""
        self._compact()
        base = len(self._buf)
        self._buf.extend(tokens)
        self._bodies.extend(BodySpan(base + b.start, base + b.end, b.language) for b in bodies)
        rows = []
        while len(self._buf) - self._head >= self.seq_len:
            rows.append(self._next_row())
        return rows

    def finish(self) -> list[int]:
        """The stream's tail, shorter than a row; the packer is empty afterwards."""
        tail = self._buf[self._head :]
        self._buf, self._head, self._bodies = [], 0, deque()
        return tail

    def _compact(self) -> None:
        h = self._head
        if h:
            del self._buf[:h]
            self._bodies = deque(
                BodySpan(b.start - h, b.end - h, b.language) for b in self._bodies if b.end > h
            )
            self._head = 0

    def _next_row(self) -> list[int]:
        h, n = self._head, self.seq_len
        while self._bodies and self._bodies[0].end <= h:
            self._bodies.popleft()
        bodies = []
        for body in self._bodies:
            if body.start >= h + n:
                break
            bodies.append(BodySpan(body.start - h, body.end - h, body.language))
        rng = row_rng(self.seed, self.shard, self.rows)
        result = fim_row(self.tok, self._buf[h : h + n], bodies, self.config, rng)
        self.rows += 1
        self._count(result)
        c = len(result.carry)
        self._buf[h + n - c : h + n] = result.carry
        self._head = h + n - c
        return result.tokens

    def _count(self, result: RowFim) -> None:
        s = self.stats
        s["rows"] += 1
        if result.layout is None:
            s["plain"] += 1
            if result.skipped:
                s[f"context_skipped_{result.skipped}"] += 1
            return
        s["fim"] += 1
        s[result.layout.value] += 1
        s[f"split_{result.split.mode}"] += 1
        if result.split.fallback:
            s[f"syntax_fallback_{result.split.fallback}"] += 1
        s["carried_tokens"] += len(result.carry)
