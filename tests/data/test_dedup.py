"""Dedup: near-copies (renamed variables, reformatting) clustered, distinct files kept, and the
decision independent of order and of how signatures were split over workers."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import pytest
from corpus_fixtures import GRAPH, INVENTORY, INVENTORY_NEAR
from hypothesis import given, settings
from hypothesis import strategies as st

from codegemma.data.dedup import (
    DedupConfig,
    Signatures,
    Signer,
    cluster,
    deduplicate,
    lsh_params,
)
from codegemma.data.document import Document
from codegemma.fileio import file_mode

DISTINCT = [
    "def mean(xs):\n    return sum(xs) / len(xs)\n\n\ndef variance(xs):\n    m = mean(xs)\n"
    "    return sum((x - m) ** 2 for x in xs) / len(xs)\n",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n\n"
    "def save(obj, path):\n    with open(path, 'w') as f:\n        json.dump(obj, f, indent=2)\n",
    "class Counter:\n    def __init__(self):\n        self.n = 0\n\n    def tick(self):\n"
    "        self.n += 1\n        return self.n\n",
    GRAPH,
    INVENTORY,
]


def _docs(texts: list[str], prefix: str = "f") -> list[Document]:
    return [Document(t, "repo", f"{prefix}{i:02d}.py") for i, t in enumerate(texts)]


def test_near_copies_are_caught_and_distinct_files_kept() -> None:
    reformatted = "\n\n".join(line.replace("    ", "\t") for line in GRAPH.split("\n"))
    docs = _docs(DISTINCT) + [
        Document(INVENTORY_NEAR, "zz", "inv.py"),
        Document(reformatted, "zz", "graph.py"),
    ]
    kept, result = deduplicate(docs)
    assert {d.id for d in kept} == {d.id for d in docs[: len(DISTINCT)]}
    assert result.dropped == {"zz/inv.py": "repo/f04.py", "zz/graph.py": "repo/f03.py"}
    assert result.stats["dropped.near"] == 2 and result.stats["near_clusters"] == 2


def test_exact_duplicates_keep_the_smallest_id() -> None:
    docs = [
        Document(GRAPH, "b", "x.py"),
        Document(GRAPH, "a", "z.py"),
        Document(GRAPH, "a", "y.py"),
    ]
    kept, result = deduplicate(docs)
    assert [d.id for d in kept] == ["a/y.py"]
    assert result.stats["dropped.exact"] == 2


def test_signature_estimates_jaccard() -> None:
    signer = Signer()
    a, b = signer.shingles(INVENTORY), signer.shingles(INVENTORY_NEAR)
    true = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
    est = (signer.minhash(INVENTORY) == signer.minhash(INVENTORY_NEAR)).mean()
    assert abs(est - true) < 0.08  # std of the estimate with 256 permutations is ~0.03
    assert (signer.minhash(GRAPH) == signer.minhash(INVENTORY)).mean() < 0.1
    bands, rows = lsh_params(0.7, 256)
    assert bands * rows == 256


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 4))
def test_decision_is_independent_of_order_and_worker_split(rnd: random.Random, parts: int) -> None:
    texts = DISTINCT + [INVENTORY_NEAR, GRAPH, INVENTORY_NEAR.replace("sku", "code")]
    docs = _docs(texts)
    reference = cluster(Signer().sign_all(docs))
    shuffled = docs[:]
    rnd.shuffle(shuffled)
    chunks = [shuffled[i::parts] for i in range(parts)]
    sigs = Signatures.concat([Signer().sign_all(c) for c in chunks], 256)
    again = cluster(sigs)
    assert again.dropped == reference.dropped and again.clusters == reference.clusters


def test_signatures_round_trip(tmp_path) -> None:
    sigs = Signer().sign_all(_docs(DISTINCT))
    sigs.save(tmp_path / "s.npz")
    back = Signatures.load(tmp_path / "s.npz")
    assert back.ids == sigs.ids and back.hashes == sigs.hashes
    assert np.array_equal(back.minhash, sigs.minhash)


def test_exact_only_config() -> None:
    kept, result = deduplicate(
        _docs([INVENTORY, INVENTORY_NEAR, INVENTORY]), DedupConfig(near=False)
    )
    assert len(kept) == 2 and result.stats["dropped.exact"] == 1


def test_signatures_are_saved_atomically(tmp_path, monkeypatch) -> None:
    sigs = Signer().sign_all([Document(INVENTORY, "r", "a.py"), Document(GRAPH, "r", "b.py")])
    path = tmp_path / "read-00000.sig.npz"
    sigs.save(path)
    back = Signatures.load(path)
    assert back.ids == sigs.ids and back.hashes == sigs.hashes
    assert np.array_equal(back.minhash, sigs.minhash)
    assert path.stat().st_mode & 0o777 == file_mode() and os.listdir(tmp_path) == [path.name]

    def disk_full(file, **arrays):  # writes part of the file, then fails
        with contextlib.ExitStack() as stack:
            f = file if hasattr(file, "write") else stack.enter_context(open(file, "wb"))
            f.write(b"PK\x03\x04 half an npz")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        sigs.save(tmp_path / "read-00001.sig.npz")
    assert os.listdir(tmp_path) == [path.name]  # no half-written file, no temporary
