"""Repository-level packing: the order in which a repository's files enter one training sample.

The CodeGemma report packs each repository so that a file's dependencies come before it:
imports from the top of every file are resolved to repo paths (`codegemma.data.imports`), the
dependency graph's cycles are broken by dropping the least important edges, and files are
topologically sorted, the next file among those whose dependencies are all placed being the one
nearest to the files already placed (ties lexicographic). Files outside the graph follow in
alphabetical order. A unit test is packed right after the code it tests.

Precise rules used here:

* **Tests.** A file is a test by name (`test_foo.py`, `foo_test.go`, `FooTest.java`,
  `FooTests.cs`, `TestFoo.java`, `foo.test.ts`, `foo.spec.js`, `foo_unittest.cc`) or by living
  under a test folder (`tests/`, `test/`, `__tests__/`, `spec/`). Its implementation is the
  non-test file of the same language family whose name stem matches (`foo`, `Foo`), preferring
  the directory most like the test's (`src/test/java/a/FooTest.java` -> `src/main/java/a/Foo.java`)
  and a source over a header; failing that, the same-family file with the highest Jaccard
  overlap of identifiers (>= `MIN_IDENTIFIER_JACCARD`), among the files the test imports when it
  imports any. A test and its implementation form one node of the graph (implementation first,
  then its tests alphabetically), so "tests follow their code" and "dependencies come first"
  hold together.
* **Graph.** Node = implementation file with its tests; edge u -> v when u imports v.
  Self-imports are ignored. "In the graph" means having at least one edge.
* **Least important edge.** An edge's importance is the tuple (is any of its imports at column 0,
  number of import statements/names behind it, number of nodes importing its target). An
  indented import is lazy or conditional - the usual way cycles are closed - and an edge into a
  widely imported node points at foundational code, so both of those are kept longest. While the
  graph has a cycle, in every strongly connected component the edge with the smallest importance
  is dropped (ties: the lexicographically smallest (importer, imported) pair). Dropped edges are
  reported per file pair in `PackingReport.broken_edges`.
* **Order.** Kahn's topological sort over the acyclic graph; among ready nodes the next is the
  one with the smallest shortest-path distance (hops, edges taken undirected, dropped edges
  included since they still relate files) to any placed node, ties by path. The distance to the
  placed set is maintained by a pruned BFS from each newly placed node, which gives exactly the
  minimum over all-pairs shortest paths without materialising the V x V table.

Run: `order_repository(docs)` on the `Document`s of one repository.
"""

from __future__ import annotations

import heapq
import posixpath
import re
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from codegemma.data.document import Document, language_of
from codegemma.data.imports import RepoIndex, extract_imports, family_extensions

MIN_IDENTIFIER_JACCARD = 0.1
TEST_DIRS = frozenset({"test", "tests", "__tests__", "spec", "specs", "testing", "unittests"})
_NOT_TESTS = frozenset(
    {
        "conftest",
        "__init__",
        "mod",
        "lib",
        "main",
        "index",
        "setup",
        "utils",
        "helpers",
        "fixtures",
        "common",
        "testutil",
        "testutils",
    }
)
_TEST_NAME = (
    re.compile(r"^test_(?P<stem>.+)$"),
    re.compile(r"^(?P<stem>.+?)_(?:unit)?tests?$"),
    re.compile(r"^(?P<stem>.+)\.(?:test|spec)$"),
    re.compile(r"^(?P<stem>[A-Z]\w*?)(?:Unit)?Tests?$"),
    re.compile(r"^Test(?P<stem>[A-Z]\w*)$"),
)
_HEADER_EXTS = (".h", ".hpp", ".hh", ".hxx", ".d.ts", ".pyi")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
_STOP = frozenset(
    {
        "def",
        "class",
        "return",
        "import",
        "from",
        "self",
        "None",
        "True",
        "False",
        "assert",
        "test",
        "tests",
        "the",
        "and",
        "for",
        "not",
        "with",
        "function",
        "const",
        "let",
        "var",
        "new",
        "this",
        "export",
        "default",
        "async",
        "await",
        "public",
        "private",
        "protected",
        "static",
        "void",
        "int",
        "string",
        "package",
        "func",
        "struct",
        "impl",
        "use",
        "pub",
        "mut",
        "fun",
        "val",
        "override",
        "using",
        "namespace",
        "include",
        "define",
        "else",
        "while",
    }
)


@dataclass(frozen=True, slots=True)
class BrokenEdge:
    """A dependency dropped to break a cycle: `importer` imports `imported`."""

    importer: str
    imported: str
    references: int


@dataclass(frozen=True, kw_only=True)
class PackingReport:
    files: int
    graph_nodes: int  # files in a node (implementation + its tests) that has an edge
    graph_edges: int  # distinct file -> file import edges resolved in the repo
    imports: int  # import references extracted from headers
    resolved_imports: int  # of which named a file of this repo
    broken_edges: tuple[BrokenEdge, ...]
    test_pairs: tuple[tuple[str, str], ...]  # (test path, implementation path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "graph_nodes": self.graph_nodes,
            "graph_edges": self.graph_edges,
            "imports": self.imports,
            "resolved_imports": self.resolved_imports,
            "broken_edges": [[e.importer, e.imported, e.references] for e in self.broken_edges],
            "test_pairs": [list(p) for p in self.test_pairs],
        }


@dataclass(frozen=True, kw_only=True)
class PackedRepo:
    repo: str
    documents: tuple[Document, ...]  # in packing order
    report: PackingReport


@dataclass(slots=True)
class Dependency:
    """Import references behind one importer -> imported edge."""

    refs: int = 0  # import statements (or imported names) that resolved to the target
    top_level: bool = False  # at least one of them at column 0


def order_repository(docs: Sequence[Document]) -> PackedRepo:
    """Order the files of one repository for packing (see the module docstring for the rules)."""
    if not docs:
        return PackedRepo(repo="", documents=(), report=_empty_report())
    repos = {d.repo for d in docs}
    if len(repos) > 1:
        raise ValueError(
            f"order_repository got files of {len(repos)} repositories ({sorted(repos)[:3]}...); "
            "group documents by Document.repo and call it once per repository"
        )
    by_path: dict[str, Document] = {}
    for d in docs:
        if d.path in by_path:
            raise ValueError(
                f"repository {d.repo!r} has two documents at path {d.path!r}; "
                "deduplicate paths before packing"
            )
        by_path[d.path] = d
    langs = {p: d.language or language_of(p, d.text) for p, d in by_path.items()}
    file_edges, n_imports, n_resolved = _file_edges(by_path, langs)
    pairs = pair_tests(by_path, langs, file_edges)
    group_of, members, edges = _contract(by_path, pairs, file_edges)
    adjacency: dict[str, set[str]] = defaultdict(set)
    for u, v in edges:
        adjacency[u].add(v)
        adjacency[v].add(u)
    dropped = break_cycles(edges)
    in_graph = sorted(adjacency)
    order = nearest_first_toposort(in_graph, [e for e in edges if e not in dropped], adjacency)
    order += sorted(g for g in members if g not in adjacency)
    paths = [p for g in order for p in [g, *sorted(m for m in members[g] if m != g)]]
    broken = tuple(
        BrokenEdge(importer=u, imported=v, references=e.refs)
        for (u, v), e in sorted(file_edges.items())
        if (group_of[u], group_of[v]) in dropped
    )
    report = PackingReport(
        files=len(by_path),
        graph_nodes=sum(len(members[g]) for g in in_graph),
        graph_edges=len(file_edges),
        imports=n_imports,
        resolved_imports=n_resolved,
        broken_edges=broken,
        test_pairs=tuple(sorted(pairs.items())),
    )
    return PackedRepo(repo=docs[0].repo, documents=tuple(by_path[p] for p in paths), report=report)


def _contract(
    paths: Iterable[str], pairs: dict[str, str], file_edges: dict[tuple[str, str], Dependency]
) -> tuple[dict[str, str], dict[str, list[str]], dict[tuple[str, str], Dependency]]:
    """Merge each test into its implementation's node: (node of each file, files of each node,
    node-level edges summing the file-level ones; edges inside a node vanish)."""
    group_of = {p: p for p in paths}
    members: dict[str, list[str]] = {p: [p] for p in group_of}
    for test, impl in sorted(pairs.items()):
        group_of[test] = impl
        members[impl].append(test)
        del members[test]
    edges: dict[tuple[str, str], Dependency] = defaultdict(Dependency)
    for (u, v), e in file_edges.items():
        gu, gv = group_of[u], group_of[v]
        if gu != gv:
            edges[gu, gv].refs += e.refs
            edges[gu, gv].top_level |= e.top_level
    return group_of, members, dict(edges)


def _empty_report() -> PackingReport:
    return PackingReport(
        files=0,
        graph_nodes=0,
        graph_edges=0,
        imports=0,
        resolved_imports=0,
        broken_edges=(),
        test_pairs=(),
    )


def dependency_edges(docs: Sequence[Document]) -> dict[tuple[str, str], Dependency]:
    """(importer path, imported path) -> Dependency for the files of one repository."""
    by_path = {d.path: d for d in docs}
    langs = {p: d.language or language_of(p, d.text) for p, d in by_path.items()}
    return _file_edges(by_path, langs)[0]


def _file_edges(
    by_path: dict[str, Document], langs: dict[str, str | None]
) -> tuple[dict[tuple[str, str], Dependency], int, int]:
    index = RepoIndex(by_path)
    edges: dict[tuple[str, str], Dependency] = defaultdict(Dependency)
    n_imports = n_resolved = 0
    for path in sorted(by_path):
        for ref in extract_imports(by_path[path].text, langs[path], path):
            n_imports += 1
            targets = [t for t in index.resolve(ref, path) if t != path]
            n_resolved += bool(targets)
            for t in targets:
                edges[path, t].refs += 1
                edges[path, t].top_level |= ref.top_level
    return dict(edges), n_imports, n_resolved


# -- tests next to their code ------------------------------------------------------------------


def implementation_stem(path: str) -> str | None:
    """The implementation name stem a test file refers to, or None when `path` is not a test.

    >>> [implementation_stem(p) for p in ("pkg/test_parser.py", "src/test/a/FooTest.java")]
    ['parser', 'Foo']
    >>> [implementation_stem(p) for p in ("web/button.test.tsx", "tests/conftest.py", "a/b.py")]
    ['button', None, None]
    """
    name = posixpath.basename(path)
    stem = name[: -len(".d.ts")] if name.endswith(".d.ts") else posixpath.splitext(name)[0]
    for rx in _TEST_NAME:
        m = rx.match(stem)
        if m:
            return m.group("stem")
    in_test_dir = any(part in TEST_DIRS for part in path.split("/")[:-1])
    return stem if in_test_dir and stem not in _NOT_TESTS else None


def pair_tests(
    by_path: dict[str, Document],
    langs: dict[str, str | None],
    file_edges: dict[tuple[str, str], Any] | None = None,
) -> dict[str, str]:
    """Map each test file to the implementation it tests (tests without one are left out)."""
    stems = {p: implementation_stem(p) for p in by_path if langs[p]}
    impls = [p for p in sorted(by_path) if langs[p] and stems[p] is None]
    by_stem: dict[str, list[str]] = defaultdict(list)
    for p in impls:
        by_stem[_stem(p)].append(p)
    imported: dict[str, set[str]] = defaultdict(set)
    for u, v in file_edges or ():
        imported[u].add(v)
    pairs: dict[str, str] = {}
    idents: dict[str, frozenset[str]] = {}
    for test, stem in sorted(stems.items()):
        if stem is None:
            continue
        exts = family_extensions(test)
        same = [p for p in by_stem.get(stem, ()) if p.endswith(exts)]
        if same:
            pairs[test] = min(same, key=lambda p: _placement_key(test, p))
            continue
        pool = [p for p in impls if p.endswith(exts)]
        pool = [p for p in pool if p in imported[test]] or pool
        best = _best_by_identifiers(test, pool, by_path, idents)
        if best is not None:
            pairs[test] = best
    return pairs


def _stem(path: str) -> str:
    name = posixpath.basename(path)
    return name[: -len(".d.ts")] if name.endswith(".d.ts") else posixpath.splitext(name)[0]


def _placement_key(test: str, impl: str) -> tuple[bool, int, int, str]:
    """Sort key, smallest first: a source before a header, then the directory most like the
    test's (common trailing, then leading components, test folders ignored), then path order."""
    tdir = [p for p in test.split("/")[:-1] if p not in TEST_DIRS]
    idir = impl.split("/")[:-1]
    suffix = 0
    while suffix < min(len(tdir), len(idir)) and tdir[-1 - suffix] == idir[-1 - suffix]:
        suffix += 1
    prefix = 0
    while prefix < min(len(tdir), len(idir)) and tdir[prefix] == idir[prefix]:
        prefix += 1
    return (impl.endswith(_HEADER_EXTS), -suffix, -prefix, impl)


def _identifiers(text: str) -> frozenset[str]:
    return frozenset(w for w in _IDENT.findall(text) if w not in _STOP)


def _best_by_identifiers(
    test: str, pool: Iterable[str], by_path: dict[str, Document], cache: dict[str, frozenset[str]]
) -> str | None:
    def ids(p: str) -> frozenset[str]:
        if p not in cache:
            cache[p] = _identifiers(by_path[p].text)
        return cache[p]

    mine = ids(test)
    best, best_score = None, MIN_IDENTIFIER_JACCARD
    for p in pool:  # sorted, and `>` keeps the first of equals: ties go lexicographic
        theirs = ids(p)
        union = len(mine | theirs)
        score = len(mine & theirs) / union if union else 0.0
        if score > best_score or (best is None and score >= best_score):
            best, best_score = p, score
    return best


# -- graph -------------------------------------------------------------------------------------


def strongly_connected_components(
    nodes: Iterable[str], succ: dict[str, list[str]]
) -> list[list[str]]:
    """Tarjan's algorithm, iterative (repositories can have import chains deeper than Python's
    recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            children = succ.get(node, [])
            if i < len(children):
                work.append((node, i + 1))
                child = children[i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if work:  # propagate low-link to the parent frame
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                out.append(comp)
    return out


def break_cycles(edges: dict[tuple[str, str], Dependency]) -> set[tuple[str, str]]:
    """Edges to drop so that `edges` becomes acyclic (rule in the module docstring).

    Strongly connected components are independent, so each is worked on alone: drop its least
    important edge, split what is left of it into components again, repeat."""
    importers: dict[str, int] = defaultdict(int)
    for _, v in edges:
        importers[v] += 1

    def importance(e: tuple[str, str]) -> tuple[bool, int, int, tuple[str, str]]:
        return (edges[e].top_level, edges[e].refs, importers[e[1]], e)

    dropped: set[tuple[str, str]] = set()
    work = [sorted(edges)]
    while work:
        live = work.pop()
        succ: dict[str, list[str]] = defaultdict(list)
        for u, v in live:
            succ[u].append(v)
        nodes = sorted({n for e in live for n in e})
        for comp in strongly_connected_components(nodes, succ):
            if len(comp) < 2:
                continue
            members = set(comp)
            inside = [e for e in live if e[0] in members and e[1] in members]
            victim = min(inside, key=importance)
            dropped.add(victim)
            work.append([e for e in inside if e != victim])
    return dropped


def nearest_first_toposort(
    nodes: Sequence[str], edges: Iterable[tuple[str, str]], adjacency: dict[str, set[str]]
) -> list[str]:
    """Topological order (edge u -> v means v goes first); the next of the ready nodes is the one
    nearest (undirected hops in `adjacency`) to the placed ones, ties lexicographic."""
    waiting_on: dict[str, int] = dict.fromkeys(nodes, 0)
    dependents: dict[str, list[str]] = defaultdict(list)
    for u, v in edges:
        waiting_on[u] += 1
        dependents[v].append(u)
    inf = len(nodes) + 1
    dist = dict.fromkeys(nodes, inf)
    ready = [(inf, n) for n in nodes if waiting_on[n] == 0]
    heapq.heapify(ready)
    placed: set[str] = set()
    order: list[str] = []
    while ready:
        d, node = heapq.heappop(ready)
        if node in placed or d != dist[node]:
            continue  # a stale heap entry: the node was re-pushed with a smaller distance
        placed.add(node)
        order.append(node)
        improved = _relax_distances(node, dist, adjacency)
        for n in improved:
            if n not in placed and waiting_on[n] == 0:
                heapq.heappush(ready, (dist[n], n))
        for n in dependents[node]:
            waiting_on[n] -= 1
            if waiting_on[n] == 0:
                heapq.heappush(ready, (dist[n], n))
    if len(order) != len(nodes):
        raise ValueError("nearest_first_toposort needs an acyclic graph; call break_cycles first")
    return order


def _relax_distances(
    source: str, dist: dict[str, int], adjacency: dict[str, set[str]]
) -> list[str]:
    """Lower `dist` (distance to the placed set) with BFS distances from `source`. The BFS stops
    at nodes it cannot improve: any path through such a node is no shorter via `source`."""
    dist[source] = 0
    improved = []
    queue = deque([source])
    while queue:
        node = queue.popleft()
        for nxt in adjacency.get(node, ()):
            if dist[node] + 1 < dist[nxt]:
                dist[nxt] = dist[node] + 1
                improved.append(nxt)
                queue.append(nxt)
    return improved
