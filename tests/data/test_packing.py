"""Repository packing: imports resolved per language, dependencies before dependents, cycles
broken by the documented rule and reported, unit tests right after their implementation."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegemma.data import packing
from codegemma.data.document import Document
from codegemma.data.imports import RepoIndex, extract_imports
from codegemma.data.packing import (
    Dependency,
    break_cycles,
    dependency_edges,
    nearest_first_toposort,
    order_repository,
)

# Each fixture: files, the dependency edges (importer, imported) a reader sees, test -> impl.
REPOS: dict[str, tuple[dict[str, str], set[tuple[str, str]], dict[str, str]]] = {
    "python": (
        {
            "pkg/__init__.py": "from .api import run\n",
            "pkg/api.py": "from .models import User\nfrom .db import connect\n\n\ndef run():\n"
            "    return connect(User())\n",
            "pkg/models.py": "from pkg.util.strings import slug\n\n\nclass User:\n    name = slug('x')\n",
            "pkg/db.py": "import sqlite3\nimport pkg.models\n\n\ndef connect(u):\n    return u\n",
            "pkg/util/__init__.py": "",
            "pkg/util/strings.py": "import re\n\n\ndef slug(s):\n    return re.sub('-', '_', s)\n",
            "tests/test_models.py": "from pkg.models import User\n\n\ndef test_user():\n    User()\n",
            "tests/test_strings.py": "from pkg.util.strings import slug\n",
            "setup.py": "from setuptools import setup\nsetup(name='pkg')\n",
            "README.md": "# pkg\n",
        },
        {
            ("pkg/__init__.py", "pkg/api.py"),
            ("pkg/api.py", "pkg/models.py"),
            ("pkg/api.py", "pkg/db.py"),
            ("pkg/models.py", "pkg/util/strings.py"),
            ("pkg/db.py", "pkg/models.py"),
            ("tests/test_models.py", "pkg/models.py"),
            ("tests/test_strings.py", "pkg/util/strings.py"),
        },
        {"tests/test_models.py": "pkg/models.py", "tests/test_strings.py": "pkg/util/strings.py"},
    ),
    "typescript": (
        {
            "src/index.ts": "import { App } from './app';\nexport * from './lib/math';\n",
            "src/app.tsx": "import React from 'react';\nimport { add } from './lib/math.js';\n"
            "import Button from '@/components/Button';\n\nexport const App = () => add(1, 2);\n",
            "src/components/Button.tsx": "import { cls } from '../lib/css'\n\n"
            "export default function Button() { return cls('b'); }\n",
            "src/lib/math.ts": "export const add = (a: number, b: number) => a + b;\n",
            "src/lib/css.js": "const path = require('path');\n"
            "module.exports = { cls: (...a) => a.join(' ') };\n",
            "src/lib/math.test.ts": "import { add } from './math';\n\ntest('add', () => add(1, 1));\n",
            "src/components/__tests__/Button.test.tsx": "import Button from '../Button';\n",
            "package.json": "{}\n",
        },
        {
            ("src/index.ts", "src/app.tsx"),
            ("src/index.ts", "src/lib/math.ts"),
            ("src/app.tsx", "src/lib/math.ts"),
            ("src/app.tsx", "src/components/Button.tsx"),
            ("src/components/Button.tsx", "src/lib/css.js"),
            ("src/lib/math.test.ts", "src/lib/math.ts"),
            ("src/components/__tests__/Button.test.tsx", "src/components/Button.tsx"),
        },
        {
            "src/lib/math.test.ts": "src/lib/math.ts",
            "src/components/__tests__/Button.test.tsx": "src/components/Button.tsx",
        },
    ),
    "java": (
        {
            "src/main/java/com/acme/App.java": "package com.acme;\n\nimport com.acme.util.Strings;\n"
            "import com.acme.model.*;\nimport java.util.List;\n\npublic class App {}\n",
            "src/main/java/com/acme/util/Strings.java": "package com.acme.util;\n\n"
            "import static com.acme.util.Chars.isBlank;\n\npublic final class Strings {}\n",
            "src/main/java/com/acme/util/Chars.java": "package com.acme.util;\n\nclass Chars {}\n",
            "src/main/java/com/acme/model/User.java": "package com.acme.model;\n\n"
            "import com.acme.util.Strings;\n\npublic class User {}\n",
            "src/main/java/com/acme/model/Order.java": "package com.acme.model;\n\nclass Order {}\n",
            "src/test/java/com/acme/util/StringsTest.java": "package com.acme.util;\n\n"
            "import org.junit.Test;\n\npublic class StringsTest {}\n",
            "src/test/java/com/acme/model/TestUser.java": "package com.acme.model;\n\n"
            "import com.acme.model.User;\n\nclass TestUser {}\n",
            "src/main/java/com/acme/Legacy.java": "package com.acme;\n\nclass Legacy {}\n",
            "pom.xml": "<project/>\n",
        },
        {
            ("src/main/java/com/acme/App.java", "src/main/java/com/acme/util/Strings.java"),
            ("src/main/java/com/acme/App.java", "src/main/java/com/acme/model/User.java"),
            ("src/main/java/com/acme/App.java", "src/main/java/com/acme/model/Order.java"),
            ("src/main/java/com/acme/util/Strings.java", "src/main/java/com/acme/util/Chars.java"),
            ("src/main/java/com/acme/model/User.java", "src/main/java/com/acme/util/Strings.java"),
            (
                "src/test/java/com/acme/model/TestUser.java",
                "src/main/java/com/acme/model/User.java",
            ),
        },
        {
            "src/test/java/com/acme/util/StringsTest.java": "src/main/java/com/acme/util/Strings.java",
            "src/test/java/com/acme/model/TestUser.java": "src/main/java/com/acme/model/User.java",
        },
    ),
    "go": (
        {
            "go.mod": "module example.com/shop\n",
            "cmd/shop/main.go": 'package main\n\nimport (\n\t"fmt"\n\t"example.com/shop/internal/cart"\n)\n',
            "internal/cart/cart.go": 'package cart\n\nimport "example.com/shop/internal/money"\n',
            "internal/cart/items.go": "package cart\n\ntype Item struct{}\n",
            "internal/money/money.go": "package money\n\ntype Cents int64\n",
            "internal/cart/cart_test.go": 'package cart\n\nimport "testing"\n',
        },
        {
            ("cmd/shop/main.go", "internal/cart/cart.go"),
            ("cmd/shop/main.go", "internal/cart/items.go"),
            ("internal/cart/cart.go", "internal/money/money.go"),
        },
        {"internal/cart/cart_test.go": "internal/cart/cart.go"},
    ),
    "rust": (
        {
            "Cargo.toml": "[package]\nname = 'shop'\n",
            "src/main.rs": "mod config;\nmod net;\n\nuse crate::net::client::Client;\n\nfn main() {}\n",
            "src/config.rs": "use serde::Deserialize;\n\npub struct Config;\n",
            "src/net/mod.rs": "pub mod client;\npub mod proto;\n",
            "src/net/client.rs": "use super::proto::Frame;\nuse crate::config::Config;\n",
            "src/net/proto.rs": "use std::io;\n\npub struct Frame;\n",
            "tests/client.rs": "use shop::net::client;\n",
        },
        {
            ("src/main.rs", "src/config.rs"),
            ("src/main.rs", "src/net/mod.rs"),
            ("src/main.rs", "src/net/client.rs"),
            ("src/net/mod.rs", "src/net/client.rs"),
            ("src/net/mod.rs", "src/net/proto.rs"),
            ("src/net/client.rs", "src/net/proto.rs"),
            ("src/net/client.rs", "src/config.rs"),
        },
        {"tests/client.rs": "src/net/client.rs"},
    ),
    "c": (
        {
            "include/vec.h": '#ifndef VEC_H\n#define VEC_H\n#include "util/mem.h"\nint dot(void);\n#endif\n',
            "include/util/mem.h": "#pragma once\n#include <stddef.h>\n",
            "src/vec.c": '#include "vec.h"\n#include <stdio.h>\n\nint dot(void) { return 0; }\n',
            "src/mem.c": '#include "util/mem.h"\n',
            "src/main.c": '#include "vec.h"\n\nint main(void) { return dot(); }\n',
            "tests/test_vec.c": '#include "../include/vec.h"\n',
            "Makefile": "all:\n\tcc src/*.c\n",
        },
        {
            ("include/vec.h", "include/util/mem.h"),
            ("src/vec.c", "include/vec.h"),
            ("src/mem.c", "include/util/mem.h"),
            ("src/main.c", "include/vec.h"),
            ("tests/test_vec.c", "include/vec.h"),
        },
        {"tests/test_vec.c": "src/vec.c"},
    ),
    "csharp_kotlin": (
        {
            "Acme.Core/Text/Slug.cs": "namespace Acme.Core.Text;\npublic static class Slug {}\n",
            "Acme.Web/Home.cs": "using System;\nusing Acme.Core.Text;\n\nclass Home {}\n",
            "Acme.Tests/SlugTests.cs": "using Acme.Core.Text;\n\nclass SlugTests {}\n",
            "app/src/main/kotlin/io/x/Main.kt": "package io.x\n\nimport io.x.data.Repo\n\nfun main() {}\n",
            "app/src/main/kotlin/io/x/data/Repo.kt": "package io.x.data\n\nclass Repo\n",
            "app/src/test/kotlin/io/x/data/RepoTest.kt": "package io.x.data\n\nclass RepoTest\n",
            "build.gradle.kts": 'plugins { kotlin("jvm") }\n',
            "Acme.sln": "\n",
        },
        {
            ("Acme.Web/Home.cs", "Acme.Core/Text/Slug.cs"),
            ("Acme.Tests/SlugTests.cs", "Acme.Core/Text/Slug.cs"),
            ("app/src/main/kotlin/io/x/Main.kt", "app/src/main/kotlin/io/x/data/Repo.kt"),
        },
        {
            "Acme.Tests/SlugTests.cs": "Acme.Core/Text/Slug.cs",
            "app/src/test/kotlin/io/x/data/RepoTest.kt": "app/src/main/kotlin/io/x/data/Repo.kt",
        },
    ),
}


def _docs(files: dict[str, str], repo: str = "fixture", shuffle: int | None = None) -> list:
    docs = [Document(text=t, repo=repo, path=p) for p, t in files.items()]
    if shuffle is not None:
        random.Random(shuffle).shuffle(docs)
    return docs


def _assert_tests_follow(paths: list[str], pairs: dict[str, str]) -> None:
    for test, impl in pairs.items():
        i, j = paths.index(impl), paths.index(test)
        assert i < j, (test, impl)
        between = paths[i + 1 : j]
        assert all(pairs.get(p) == impl for p in between), (test, impl, between)


@pytest.mark.parametrize("name", sorted(REPOS))
def test_fixture_repo_dependencies_and_tests(name):
    files, expected_edges, expected_pairs = REPOS[name]
    assert set(dependency_edges(_docs(files))) == expected_edges
    packed = order_repository(_docs(files, shuffle=1))
    paths = [d.path for d in packed.documents]
    assert sorted(paths) == sorted(files)  # every file exactly once
    assert packed.report.broken_edges == ()  # the fixtures are acyclic
    pos = {p: i for i, p in enumerate(paths)}
    for importer, imported in expected_edges:
        assert pos[imported] < pos[importer], (importer, imported)
    assert dict(packed.report.test_pairs) == expected_pairs
    _assert_tests_follow(paths, expected_pairs)
    assert packed.report.graph_edges == len(expected_edges)
    # files outside the graph close the sample, alphabetically
    outside = [p for p in paths if not any(p in e for e in expected_edges)]
    outside = [p for p in outside if p not in expected_pairs and p not in expected_pairs.values()]
    assert outside  # every fixture has some (README.md, go.mod, Cargo.toml, ...)
    assert paths[-len(outside) :] == sorted(outside)


def test_order_does_not_depend_on_input_order():
    files = REPOS["python"][0]
    orders = {
        tuple(d.path for d in order_repository(_docs(files, shuffle=s)).documents) for s in range(6)
    }
    assert len(orders) == 1


def test_python_order_is_exactly_the_nearest_first_topological_sort():
    packed = order_repository(_docs(REPOS["python"][0]))
    assert [d.path for d in packed.documents] == [
        "pkg/util/strings.py",  # the only root of the graph
        "tests/test_strings.py",
        "pkg/models.py",
        "tests/test_models.py",
        "pkg/db.py",
        "pkg/api.py",
        "pkg/__init__.py",
        "README.md",  # outside the graph, alphabetically
        "pkg/util/__init__.py",
        "setup.py",
    ]


def test_nearest_ready_node_goes_next():
    # a -> b means a imports b. Roots: b, x, z. After b, x (2 hops: b <- a -> x) beats z.
    files = {
        "a.py": "import b\nimport x\n",
        "b.py": "",
        "x.py": "",
        "c.py": "import z\n",
        "z.py": "",
        "aa.py": "import c\n",
    }
    paths = [d.path for d in order_repository(_docs(files)).documents]
    assert paths == ["b.py", "x.py", "a.py", "z.py", "c.py", "aa.py"]


def test_cycles_are_broken_by_the_documented_rule():
    files = {
        # a lazy (indented) import closes the a <-> b cycle: that edge goes
        "a.py": "import b\n",
        "b.py": "def f():\n    import a\n",
        # x -> y -> z -> x, all top level; x names y twice, so (y, z) and (z, x) tie and the
        # lexicographically smaller pair (y, z) is dropped
        "x.py": "from y import p, q\n",
        "y.py": "import z\n",
        "z.py": "import x\n",
    }
    packed = order_repository(_docs(files))
    broken = {(e.importer, e.imported) for e in packed.report.broken_edges}
    assert broken == {("b.py", "a.py"), ("y.py", "z.py")}
    paths = [d.path for d in packed.documents]
    kept = set(dependency_edges(_docs(files))) - broken
    assert all(paths.index(v) < paths.index(u) for u, v in kept)
    assert packed.report.to_dict()["broken_edges"] == [["b.py", "a.py", 1], ["y.py", "z.py", 1]]


def test_widely_imported_target_keeps_its_edges():
    # core <-> helpers cycle; core is imported by three files, so the edge into it is kept
    files = {
        "core.py": "import helpers\n",
        "helpers.py": "import core\n",
        "u1.py": "import core\n",
        "u2.py": "import core\n",
    }
    broken = order_repository(_docs(files)).report.broken_edges
    assert [(e.importer, e.imported) for e in broken] == [("core.py", "helpers.py")]


@pytest.mark.parametrize(
    ("path", "stem"),
    [
        ("pkg/test_foo.py", "foo"),
        ("pkg/foo_test.py", "foo"),
        ("x/foo_test.go", "foo"),
        ("src/test/java/FooTest.java", "Foo"),
        ("src/TestFoo.java", "Foo"),
        ("T/FooTests.cs", "Foo"),
        ("web/foo.test.ts", "foo"),
        ("web/foo.spec.js", "foo"),
        ("cc/foo_unittest.cc", "foo"),
        ("tests/foo.rs", "foo"),
        ("src/__tests__/Bar.tsx", "Bar"),
        ("tests/conftest.py", None),
        ("src/foo.py", None),
        ("src/Testing.java", None),
        ("src/contest.py", None),
        ("test/__init__.py", None),
    ],
)
def test_test_name_conventions(path, stem):
    assert packing.implementation_stem(path) == stem


def test_tests_pair_by_identifier_overlap_when_names_do_not():
    files = {
        "pkg/parser.py": "def tokenize_expression(src):\n    return src.split()\n\n\n"
        "def parse_tokens(tokens):\n    return build_tree(tokens)\n",
        "pkg/render.py": "def render_html(node):\n    return '<p>' + node.title + '</p>'\n",
        "tests/test_behaviour.py": "def test_expression():\n"
        "    assert parse_tokens(tokenize_expression('1 + 2')) == build_tree(['1'])\n",
        "tests/test_unrelated.py": "def test_nothing():\n    assert 1 + 1 == 2\n",
    }
    packed = order_repository(_docs(files))
    assert dict(packed.report.test_pairs) == {"tests/test_behaviour.py": "pkg/parser.py"}
    paths = [d.path for d in packed.documents]
    assert paths.index("tests/test_behaviour.py") == paths.index("pkg/parser.py") + 1


def test_rejects_mixed_repositories_and_duplicate_paths():
    with pytest.raises(ValueError, match="group documents by Document.repo"):
        order_repository(
            [Document(text="", repo="a", path="x.py"), Document(text="", repo="b", path="y.py")]
        )
    with pytest.raises(ValueError, match="two documents at path"):
        order_repository([Document(text="", repo="a", path="x.py")] * 2)
    assert order_repository([]).documents == ()


# -- import extraction details -----------------------------------------------------------------


def test_import_extraction_details():
    py = extract_imports(
        "import a.b as c, d\nif X:\n    from .e import (f,\n  g)\n", "python", "p/m.py"
    )
    assert [(r.text, r.top_level) for r in py] == [
        ("a.b", True),
        ("d", True),
        (".e:f", False),
        (".e:g", False),
    ]
    index = RepoIndex(["p/e.py", "p/m.py", "lib/a/b.py", "other/b.py", "x/__init__.py"])
    assert index.resolve(py[0], "p/m.py") == ("lib/a/b.py",)  # longest suffix wins
    assert index.resolve(py[2], "p/m.py") == ("p/e.py",)  # relative, name is a member
    # a bare `import d` must not match any package's __init__.py
    assert index.resolve(py[1], "p/m.py") == ()
    go = extract_imports('import (\n\t"fmt"\n\tm "ex.com/r/money"\n)\n', "go", "main.go")
    assert [r.text for r in go] == ["fmt", "ex.com/r/money"] and all(r.top_level for r in go)
    rs = extract_imports("use crate::{a::b, c::{d, e as f}};\n", "rust", "src/lib.rs")
    assert [r.text for r in rs] == ["crate::a::b", "crate::c::d", "crate::c::e"]
    js = extract_imports(
        "import {\n  a,\n  b,\n} from './x';\nfunction f() { require('./y'); }\n",
        "javascript",
        "w/m.js",
    )
    assert [(r.text, r.top_level) for r in js] == [("./x", True), ("./y", True)]
    assert extract_imports('#include <stdio.h>\n#include "a/b.h"\n', "c", "m.c")[0].text == "a/b.h"
    cs = extract_imports(
        "using System.Text;\nusing static A.B.C;\nusing X = D.E;\n", "csharp", "m.cs"
    )
    assert [r.text for r in cs] == ["A.B.C", "D.E"]
    late = "x = 1\n" * 300 + "import late\n"  # beyond the header region
    assert extract_imports(late, "python", "m.py") == []


# -- graph algorithms, property-tested ---------------------------------------------------------


def _reference_order(nodes, edges, undirected_edges):
    """Literal reading of the report: all-pairs shortest paths (Floyd-Warshall), then repeatedly
    the ready node nearest to any placed one, ties lexicographic."""
    inf = float("inf")
    d = {(a, b): 0 if a == b else inf for a in nodes for b in nodes}
    for u, v in undirected_edges:
        d[u, v] = d[v, u] = min(d[u, v], 1)
    for k, i, j in itertools.product(nodes, nodes, nodes):
        if d[i, k] + d[k, j] < d[i, j]:
            d[i, j] = d[i, k] + d[k, j]
    placed: list[str] = []
    while len(placed) < len(nodes):
        ready = [
            n for n in nodes if n not in placed and all(v in placed for u, v in edges if u == n)
        ]
        placed.append(min(ready, key=lambda n: (min((d[p, n] for p in placed), default=inf), n)))
    return placed


@st.composite
def _graphs(draw):
    n = draw(st.integers(1, 9))
    nodes = [f"n{i}" for i in range(n)]
    pairs = draw(st.sets(st.tuples(st.sampled_from(nodes), st.sampled_from(nodes)), max_size=20))
    return nodes, {(u, v) for u, v in pairs if u != v}


@settings(max_examples=150, deadline=None)
@given(_graphs())
def test_toposort_matches_all_pairs_reference(graph):
    nodes, edges = graph
    deps = {e: Dependency(refs=1, top_level=True) for e in edges}
    dropped = break_cycles(deps)
    acyclic = edges - dropped
    adjacency: dict[str, set[str]] = {n: set() for n in nodes}
    for u, v in edges:
        adjacency[u].add(v)
        adjacency[v].add(u)
    order = nearest_first_toposort(nodes, acyclic, adjacency)
    assert sorted(order) == sorted(nodes)
    pos = {n: i for i, n in enumerate(order)}
    assert all(pos[v] < pos[u] for u, v in acyclic)
    assert dropped <= edges
    assert order == _reference_order(nodes, acyclic, edges)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_python_repos_pack_every_file_once_in_dependency_order(data):
    n = data.draw(st.integers(1, 12))
    names = [f"m{i}" for i in range(n)]
    files = {}
    for i, name in enumerate(names):
        deps = data.draw(st.sets(st.sampled_from(names[:i]), max_size=3)) if i else set()
        files[f"pkg/{name}.py"] = "".join(f"from pkg import {d}\n" for d in sorted(deps))
    packed = order_repository(_docs(files, shuffle=data.draw(st.integers(0, 99))))
    paths = [d.path for d in packed.documents]
    assert sorted(paths) == sorted(files)
    assert packed.report.broken_edges == ()
    for u, v in dependency_edges(_docs(files)):
        assert paths.index(v) < paths.index(u)
