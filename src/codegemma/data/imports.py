"""Import extraction and resolution to repository paths, for dependency-graph packing.

The CodeGemma report orders a repository's files by their import graph, built from "imports
extracted from the top lines" and "suffix-matched to repo paths". This module is that step:

* **Header rule.** Imports are read from the first `HEADER_LINES` (200) lines of a file with
  per-language regular expressions anchored at a line start (`#include "x.h"`, `import a.b.C;`,
  `from .x import y`, `use crate::a::b;`, `mod x;`, `import ... from './x'`, `require('./x')`,
  `import ( "x/y" )`, `using A.B;`). An import indented below column 0 is recorded as not
  `top_level`: in Python and Rust that is a lazy or conditional import, the usual way a cycle is
  closed, and the packer treats such edges as the least important.
* **Resolution.** Relative imports (`./x`, `from ..a import b`, `super::x`, `mod x;`, a quoted
  `#include`) are first tried as exact paths from the importer's directory. Everything else, and
  relative imports that miss, is matched by the *longest path suffix*: the candidate `a/b/c.py`
  matches the repo file whose trailing path components agree with the most trailing components
  of the candidate (`src/a/b/c.py` beats `x/b/c.py` beats `y/c.py`). A match must cover the
  file name, and for package files (`__init__.py`, `mod.rs`, `index.ts`) also the directory
  that names the module. Ties go to the file sharing the longest directory prefix with the
  importer, then to the lexicographically first path. Go packages, C# namespaces and Java
  wildcard imports name directories: they resolve to every same-language, non-test file in the
  best-matching directory. Names of the standard library and external packages simply find no
  file (or are skipped outright: Rust `std`/external crates, C# `System.*`, `<...>` includes).

    >>> refs = extract_imports("from .util import slug\\n", "python", "pkg/core.py")
    >>> RepoIndex(["pkg/util.py", "pkg/core.py"]).resolve(refs[0], "pkg/core.py")
    ('pkg/util.py',)
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

HEADER_LINES = 200

# File names that stand for their directory: a suffix match must include the directory too.
_PACKAGE_FILES = frozenset({"__init__.py", "mod.rs", "lib.rs", "main.rs"})
_PACKAGE_STEMS = frozenset({"index"})

# Source extensions of each language family, for directory targets and same-family checks.
FAMILY_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "python": (".py", ".pyi"),
    "javascript": (".ts", ".tsx", ".js", ".jsx", ".mjs", ".cjs", ".mts", ".cts"),
    "typescript": (".ts", ".tsx", ".js", ".jsx", ".mjs", ".cjs", ".mts", ".cts"),
    "java": (".java", ".kt"),
    "kotlin": (".kt", ".java"),
    "go": (".go",),
    "rust": (".rs",),
    "c": (".h", ".c", ".hpp", ".hh", ".cc", ".cpp", ".cxx"),
    "cpp": (".h", ".hpp", ".hh", ".hxx", ".c", ".cc", ".cpp", ".cxx", ".ipp", ".inl"),
    "csharp": (".cs",),
}


@dataclass(frozen=True, slots=True)
class ImportRef:
    """One import statement (or one imported name) and the repo paths it may refer to.

    `exact` paths are tried as written (relative imports, already joined with the importer's
    directory); `suffix` paths by longest suffix match. A path ending in "/" names a package
    directory. Candidates are listed most specific first.
    """

    text: str
    line: int  # 0-based line of the statement
    top_level: bool  # written at column 0 (unconditional), not inside a block
    exact: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()


def header(text: str, max_lines: int = HEADER_LINES) -> str:
    """The first `max_lines` lines of `text`: the region imports are read from."""
    end = -1
    for _ in range(max_lines):
        end = text.find("\n", end + 1)
        if end < 0:
            return text
    return text[:end]


def extract_imports(text: str, language: str | None, path: str) -> list[ImportRef]:
    """Imports in the header of `text` (a file at repo path `path`), in file order."""
    extractor = _EXTRACTORS.get(language or "")
    if extractor is None:
        return []
    refs = extractor(header(text), posixpath.dirname(path), path)
    return sorted(refs, key=lambda r: r.line)


# -- helpers -----------------------------------------------------------------------------------


def _norm(path: str) -> str | None:
    """Normalised repo-relative path, or None when it leaves the repository root."""
    if not path:
        return None
    trailing = path.endswith("/")
    norm = posixpath.normpath(path)
    if norm.startswith("..") or norm.startswith("/") or norm == ".":
        return None
    return norm + "/" if trailing else norm


def _ref(text: str, m: re.Match[str], raw: str, exact=(), suffix=()) -> ImportRef:
    line_start = text.rfind("\n", 0, m.start()) + 1
    return ImportRef(
        text=raw,
        line=text.count("\n", 0, m.start()),
        # an indented statement sits inside a block: lazy, conditional or scoped
        top_level=text[line_start : line_start + 1] not in (" ", "\t"),
        exact=tuple(p for p in (_norm(e) for e in exact) if p),
        suffix=tuple(p for p in (_norm(s) for s in suffix) if p),
    )


# -- python ------------------------------------------------------------------------------------

_PY_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w. \t,]+)", re.M)
_PY_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]+)", re.M)


def _py_module_paths(parts: list[str]) -> list[str]:
    base = "/".join(parts)
    return [f"{base}.py", f"{base}/__init__.py", f"{base}.pyi"] if base else []


def _python(text: str, dirname: str, path: str) -> list[ImportRef]:
    refs: list[ImportRef] = []
    for m in _PY_IMPORT.finditer(text):
        for item in m.group(1).split(","):
            module = item.split(" as ")[0].strip()
            if re.fullmatch(r"[A-Za-z_][\w.]*", module):
                refs.append(_ref(text, m, module, suffix=_py_module_paths(module.split("."))))
    for m in _PY_FROM.finditer(text):
        dots, module = m.group(1), m.group(2)
        mparts = [p for p in module.split(".") if p]
        names = [n.split(" as ")[0].strip() for n in m.group(3).strip("()").split(",")]
        # each imported name may be a submodule (its own file) or a member of the module
        for name in [n for n in names if re.fullmatch(r"[A-Za-z_]\w*", n)] or [""]:
            cands = _py_module_paths([*mparts, name]) if name else []
            cands += _py_module_paths(mparts) if mparts else ["__init__.py"] * bool(dots)
            raw = dots + module + (f":{name}" if name else "")
            if dots:
                base = dirname
                for _ in range(len(dots) - 1):
                    base = posixpath.dirname(base)
                refs.append(_ref(text, m, raw, exact=[posixpath.join(base, c) for c in cands]))
            else:
                refs.append(_ref(text, m, raw, suffix=cands))
    return refs


# -- javascript / typescript -------------------------------------------------------------------

_JS_FROM = re.compile(r"""^[ \t]*(?:import|export)\b[^'";]*?\bfrom[ \t]*['"]([^'"\n]+)['"]""", re.M)
_JS_BARE = re.compile(r"""^[ \t]*import[ \t]*['"]([^'"\n]+)['"]""", re.M)
_JS_CALL = re.compile(r"""\b(?:require|import)[ \t]*\([ \t]*['"]([^'"\n]+)['"][ \t]*\)""")
_JS_EXTS = (".ts", ".tsx", ".js", ".jsx", ".mjs", ".cjs", ".mts", ".cts", ".d.ts")


def _js_expansions(spec: str) -> list[str]:
    stem, ext = posixpath.splitext(spec)
    out = []
    if ext in _JS_EXTS or ext == ".json":
        out.append(spec)
        if ext in (".js", ".jsx", ".mjs", ".cjs"):  # TS sources import their output name
            out += [stem + e for e in (".ts", ".tsx", ".mts", ".cts")]
    else:
        out += [spec + e for e in _JS_EXTS]
    out += [f"{spec}/index{e}" for e in _JS_EXTS]
    return out


def _javascript(text: str, dirname: str, path: str) -> list[ImportRef]:
    refs = []
    seen: set[int] = set()
    for rx in (_JS_FROM, _JS_BARE, _JS_CALL):
        for m in rx.finditer(text):
            if m.start(1) in seen:
                continue
            seen.add(m.start(1))
            spec = m.group(1)
            if spec.startswith("."):
                exact = _js_expansions(posixpath.join(dirname, spec))
                refs.append(_ref(text, m, spec, exact=exact))
            else:
                # path aliases (`@/lib/x`, `~/x`, `#x`) point into the repo; bare names may too
                bare = re.sub(r"^(?:@/|~/|#)", "", spec)
                refs.append(_ref(text, m, spec, suffix=_js_expansions(bare)))
    return refs


# -- java / kotlin -----------------------------------------------------------------------------

_JVM_IMPORT = re.compile(
    r"^[ \t]*import[ \t]+(static[ \t]+)?([\w.]+?)(\.\*)?(?:[ \t]+as[ \t]+\w+)?[ \t]*;?[ \t]*$", re.M
)


def _jvm(text: str, dirname: str, path: str) -> list[ImportRef]:
    refs = []
    own = ".kt" if path.endswith((".kt", ".kts")) else ".java"
    other = ".java" if own == ".kt" else ".kt"
    for m in _JVM_IMPORT.finditer(text):
        parts = m.group(2).split(".")
        cands = []
        # a dotted name may end in a member or nested class: drop trailing parts one at a time
        for k in range(len(parts), 1, -1):
            base = "/".join(parts[:k])
            cands += [base + own, base + other]
        if m.group(3):  # wildcard: the package directory itself
            cands.insert(0, "/".join(parts) + "/")
        refs.append(_ref(text, m, m.group(2) + (m.group(3) or ""), suffix=cands))
    return _file_scoped(refs)


# -- go ----------------------------------------------------------------------------------------

_GO_SINGLE = re.compile(r'^import[ \t]+(?:[\w.]+[ \t]+)?"([^"\n]+)"', re.M)
_GO_BLOCK = re.compile(r"^import[ \t]*\(([^)]*)\)", re.M)
_GO_SPEC = re.compile(r'"([^"\n]+)"')


def _go(text: str, dirname: str, path: str) -> list[ImportRef]:
    refs = [_ref(text, m, m.group(1), suffix=[m.group(1) + "/"]) for m in _GO_SINGLE.finditer(text)]
    for block in _GO_BLOCK.finditer(text):
        for m in _GO_SPEC.finditer(text, block.start(1), block.end(1)):
            refs.append(_ref(text, m, m.group(1), suffix=[m.group(1) + "/"]))
    return _file_scoped(refs)


def _file_scoped(refs: list[ImportRef]) -> list[ImportRef]:
    """Go, JVM and C# imports are file-scoped even when indented (import blocks, namespaces)."""
    return [replace(r, top_level=True) for r in refs]


# -- rust --------------------------------------------------------------------------------------

_RS_USE = re.compile(r"^[ \t]*(?:pub(?:\([^)]*\))?[ \t]+)?use[ \t]+([^;]+);", re.M)
_RS_MOD = re.compile(r"^[ \t]*(?:pub(?:\([^)]*\))?[ \t]+)?mod[ \t]+(\w+)[ \t]*;", re.M)


def _rust_use_paths(tree: str) -> list[list[str]]:
    """Expand `a::{b, c::{d, e}}` into [[a, b], [a, c, d], [a, c, e]]."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+\w+", "", tree))
    brace = tree.find("{")
    if brace < 0:
        return [[p for p in tree.split("::") if p and p not in ("*", "self")]]
    prefix = [p for p in tree[:brace].split("::") if p]
    inner = tree[brace + 1 : tree.rfind("}")]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(inner + ","):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            if inner[start:i]:
                items.append(inner[start:i])
            start = i + 1
    out = [prefix + sub for item in items for sub in _rust_use_paths(item)]
    return out or [prefix]


def _rust_dirs(path: str) -> tuple[str, str, str]:
    """(crate root dir, this module's child dir, parent module's child dir) for a .rs file."""
    dirname = posixpath.dirname(path)
    parts = path.split("/")
    # the crate root is the nearest enclosing `src` directory (cargo's layout)
    src_at = len(parts) - 1 - parts[::-1].index("src") if "src" in parts[:-1] else -1
    root = "/".join(parts[: src_at + 1])
    name = posixpath.basename(path)
    if name in ("mod.rs", "lib.rs", "main.rs"):
        return root, dirname, posixpath.dirname(dirname)
    return root, posixpath.join(dirname, name[:-3]), dirname


def _rust_module_files(base: str, parts: list[str]) -> list[str]:
    cands = []
    for k in range(len(parts), 0, -1):
        stem = posixpath.join(base, *parts[:k])
        cands += [stem + ".rs", stem + "/mod.rs"]
    return cands


def _rust(text: str, dirname: str, path: str) -> list[ImportRef]:
    root, self_dir, super_dir = _rust_dirs(path)
    refs = []
    for m in _RS_USE.finditer(text):
        for parts in _rust_use_paths(m.group(1)):
            if len(parts) < 2:
                continue
            head, rest = parts[0], parts[1:]
            if head == "crate":
                base = root
            elif head == "self":
                base = self_dir
            elif head == "super":
                base, rest = super_dir, rest
                while rest and rest[0] == "super":
                    base, rest = posixpath.dirname(base), rest[1:]
            else:
                continue  # std, core, alloc and other crates live outside this repo
            exact = _rust_module_files(base, rest)
            refs.append(_ref(text, m, "::".join(parts), exact=exact, suffix=exact))
    for m in _RS_MOD.finditer(text):
        exact = _rust_module_files(self_dir, [m.group(1)])
        refs.append(_ref(text, m, "mod " + m.group(1), exact=exact))
    return refs


# -- c / c++ -----------------------------------------------------------------------------------

_C_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"\n]+)"', re.M)


def _c(text: str, dirname: str, path: str) -> list[ImportRef]:
    return [
        _ref(text, m, m.group(1), exact=[posixpath.join(dirname, m.group(1))], suffix=[m.group(1)])
        for m in _C_INCLUDE.finditer(text)
    ]


# -- c# ----------------------------------------------------------------------------------------

_CS_USING = re.compile(
    r"^[ \t]*(?:global[ \t]+)?using[ \t]+(static[ \t]+)?(?:\w+[ \t]*=[ \t]*)?([\w.]+)[ \t]*;", re.M
)


def _csharp(text: str, dirname: str, path: str) -> list[ImportRef]:
    refs = []
    for m in _CS_USING.finditer(text):
        name = m.group(2)
        if name.split(".")[0] in ("System", "Microsoft", "Windows"):
            continue
        parts = name.split(".")
        cands = ["/".join(parts) + ".cs"] if m.group(1) else []
        cands.append("/".join(parts) + "/")  # a namespace is a folder by convention
        refs.append(_ref(text, m, name, suffix=cands))
    return _file_scoped(refs)


_EXTRACTORS: dict[str, Callable[[str, str, str], list[ImportRef]]] = {
    "python": _python,
    "javascript": _javascript,
    "typescript": _javascript,
    "java": _jvm,
    "kotlin": _jvm,
    "go": _go,
    "rust": _rust,
    "c": _c,
    "cpp": _c,
    "csharp": _csharp,
}


# -- resolution --------------------------------------------------------------------------------


def _is_go_test(path: str) -> bool:
    return path.endswith("_test.go")


def family_extensions(path: str) -> tuple[str, ...]:
    """Extensions of the language family of `path` (a .kt file may import a .java class)."""
    ext = posixpath.splitext(path)[1].lower()
    return next((exts for exts in FAMILY_EXTENSIONS.values() if ext in exts), ())


class RepoIndex:
    """The files of one repository, indexed for exact and longest-suffix lookups."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.files = frozenset(paths)
        self._by_tail: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
        self._dir_files: dict[str, list[str]] = defaultdict(list)
        self._dirs_by_tail: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
        for p in sorted(self.files):  # sorted, so the first of equal matches is the smallest
            parts = tuple(p.split("/"))
            # keyed by the last one and the last two components: package files need two
            self._by_tail[parts[-1:]].append(parts)
            self._by_tail[parts[-2:]].append(parts)
            self._dir_files[posixpath.dirname(p)].append(p)
        for d in sorted(self._dir_files):
            if d:
                parts = tuple(d.split("/"))
                self._dirs_by_tail[parts[-1:]].append(parts)
        self._ranked_cache: dict[tuple[str, str], list[tuple[int, str]]] = {}

    def resolve(self, ref: ImportRef, importer: str) -> tuple[str, ...]:
        """Repo paths `ref` refers to (empty when it names nothing in this repo)."""
        for cand in ref.exact:
            found = self._lookup_exact(cand, importer)
            if found:
                return found
        best: tuple[int, tuple[str, ...]] = (0, ())
        for cand in ref.suffix:
            length, found = self._lookup_suffix(cand, importer)
            if length > best[0]:
                best = (length, found)
        return best[1]

    def _dir_targets(self, dirname: str, importer: str) -> tuple[str, ...]:
        exts = family_extensions(importer)
        return tuple(
            f
            for f in self._dir_files.get(dirname, ())
            if f != importer and f.endswith(exts) and not _is_go_test(f)
        )

    def _lookup_exact(self, cand: str, importer: str) -> tuple[str, ...]:
        if cand.endswith("/"):
            return self._dir_targets(cand[:-1], importer)
        return (cand,) if cand in self.files and cand != importer else ()

    def _lookup_suffix(self, cand: str, importer: str) -> tuple[int, tuple[str, ...]]:
        is_dir = cand.endswith("/")
        for length, path in self._ranked(cand, posixpath.dirname(importer)):
            if is_dir:
                targets = self._dir_targets(path, importer)
                if targets:
                    return length, targets
            elif path != importer:
                return length, (path,)
        return 0, ()

    def _ranked(self, cand: str, importer_dir: str) -> list[tuple[int, str]]:
        """Matches of `cand`, best first: longest common suffix, then longest directory prefix
        shared with the importer, then path order. Cached per (candidate, importer directory):
        the same imports recur across a package. Directories come all; files, the top two
        (enough to skip the importer itself)."""
        key = (cand, importer_dir)
        if key in self._ranked_cache:
            return self._ranked_cache[key]
        is_dir = cand.endswith("/")
        want = tuple(cand.rstrip("/").split("/"))
        name = want[-1]
        # `pkg/__init__.py` must match at least `pkg/__init__.py`, not any `__init__.py`
        need = 2 if name in _PACKAGE_FILES or name.split(".")[0] in _PACKAGE_STEMS else 1
        if need > len(want):
            return []
        pool = (self._dirs_by_tail if is_dir else self._by_tail).get(want[-need:], ())
        base = importer_dir.split("/") if importer_dir else []
        scored = []
        for parts in pool:
            n = _common_suffix(parts, want)
            scored.append((-n, -_common_prefix(parts[:-1], base), "/".join(parts)))
        scored.sort()
        ranked = [(-n, path) for n, _, path in (scored if is_dir else scored[:2])]
        self._ranked_cache[key] = ranked
        return ranked


def _common_suffix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _common_prefix(a: Iterable[str], b: Iterable[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
