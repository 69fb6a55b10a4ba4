"""Fill-in-the-middle training samples: split points, PSM/SPM layout, and whole repo samples.

CodeGemma trains with FIM rate 0.8 (0.9 for 2B v1.1), PSM and SPM 50-50 (CodeGemma report,
arXiv:2406.11409; the FIM paper, Bavarian et al. 2022, arXiv:2207.14255).
Each file of a packed repository sample is FIM'd on its own (context-level FIM: the other files
stay whole around it), and its token layout comes from `codegemma.prompts`, the one place
shared with inference. Three split modes:

* "char"   - the FIM paper's: two uniform character positions.
* "line"   - two uniform line boundaries, so the middle is whole lines.
* "syntax" - with tree-sitter (AST-FIM style): the middle is exactly one named syntax node, or
  a run of consecutive named sibling nodes, chosen with probability proportional to its size
  in characters among nodes that are neither the whole file (ignoring surrounding whitespace)
  nor shorter than `min_node_chars`. The suffix therefore starts where a construct ends. A
  language without a grammar, a tree with no usable node, or text tree-sitter cannot take
  (lone surrogates) falls back to "char", and the reason is counted.

A FIM'd file is split "syntax" with probability `syntax_rate`, "line" with `line_rate`, else
"char" (default 90/0/10, as AST-FIM mixes 90% syntax and 10% random spans). Every choice for a
file comes from a `random.Random` seeded by blake2b(seed, document id), so a file's sample is
the same in every process and whatever the order or company of files around it.

    from codegemma.data.fim import FimConfig, build_repo_sample
    sample = build_repo_sample(tok, packed.documents, FimConfig(), seed=0)
    sample.tokens, sample.stats["fim"]

Grammars: the per-language `tree-sitter-<lang>` wheels (compiled in, no network) and, for any
language they lack, grammars that `tree-sitter-language-pack` has already downloaded.
"""

from __future__ import annotations

import bisect
import functools
import importlib
import random
from collections import Counter
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
    rate: float = option(0.8, "share of files FIM'd, the rest stay plain text")
    spm_rate: float = option(0.5, "share of FIM'd files in SPM layout, the rest PSM")
    syntax_rate: float = option(0.9, "share of FIM'd files split at syntax nodes")
    line_rate: float = 0.0  # share split at line boundaries; the remainder is char-level
    max_middle_chars: int | None = None  # cap on the middle's length, any mode
    sibling_run_rate: float = 0.3  # syntax mode: chance a node with later siblings is widened
    min_node_chars: int = 3  # syntax mode: smaller nodes are not middles

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate", "syntax_rate", "line_rate", "sibling_run_rate"):
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
            return FimSplit(text[:i], text[i:j], text[j:], "syntax")
        fallback = _points_split(text, None, rng, max_middle_chars, "char")
        return FimSplit(fallback.prefix, fallback.middle, fallback.suffix, "char", span)
    return _points_split(text, None, rng, max_middle_chars, "char")


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


def fim_file(doc: Document, config: FimConfig, seed: int) -> FileFim:
    """Decide and split one file; the draws are, in order: FIM?, layout, split mode, split."""
    rng = file_rng(seed, doc.id)
    is_fim, is_spm, u_mode = (
        rng.random() < config.rate,
        rng.random() < config.spm_rate,
        rng.random(),
    )
    if not is_fim:
        return FileFim(path=doc.path, layout=None, requested=None, split=None)
    if u_mode < config.syntax_rate:
        mode = "syntax"
    elif u_mode < config.syntax_rate + config.line_rate:
        mode = "line"
    else:
        mode = "char"
    language = grammar_name(doc.language or language_of(doc.path, doc.text), doc.path)
    parts = split(
        doc.text,
        language,
        mode,
        rng,
        max_middle_chars=config.max_middle_chars,
        sibling_run_rate=config.sibling_run_rate,
        min_node_chars=config.min_node_chars,
    )
    layout = prompts.FimMode.SPM if is_spm else prompts.FimMode.PSM
    return FileFim(path=doc.path, layout=layout, requested=mode, split=parts)


def build_repo_sample(
    tok: Any, docs: Sequence[Document], config: FimConfig, seed: int
) -> RepoSample:
    """Token ids of one repository sample: per file `path\\n` + body (plain or FIM'd), files
    joined by <|file_separator|>, in the given (packing) order. No bos: the shard packer adds it."""
    if not isinstance(config, FimConfig):
        raise FimError(f"config must be a FimConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FimError(f"seed must be an int, got {seed!r}")
    stats: Counter[str] = Counter()
    files_ids = []
    for doc in docs:
        if not isinstance(doc, Document):
            raise FimError(f"docs must be Document records, got {type(doc).__name__}")
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
