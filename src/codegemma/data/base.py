"""Step and filter bases, and the mergeable counters every step reports.

datatrove style: a step is a small class whose `run(docs)` is a generator over `Document`s; a
filter only implements `filter(doc) -> bool | (False, reason)` and the base counts what it kept
and what it dropped, by reason. Counters are plain `Counter`s so the stats of many workers merge
by addition, whichever engine ran them.

    >>> class Short(BaseFilter):
    ...     name = "short"
    ...     def filter(self, doc): return len(doc.text) < 5 or (False, "too_long")
    >>> f = Short(); _ = list(f.run([Document("x", "r", "a"), Document("xxxxxx", "r", "b")]))
    >>> dict(f.stats)
    {'kept': 1, 'dropped.too_long': 1}
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from codegemma.data.document import Document


class Stats:
    """Counters by stage name: `{"filters": Counter(...), "pii": Counter(...)}`; merge with +=."""

    def __init__(self, data: Mapping[str, Mapping[str, int]] | None = None) -> None:
        self.data: dict[str, Counter[str]] = {}
        for stage, counts in (data or {}).items():
            self.data[stage] = Counter(dict(counts))

    def __getitem__(self, stage: str) -> Counter[str]:
        return self.data.setdefault(stage, Counter())

    def __iadd__(self, other: Stats) -> Stats:
        for stage, counts in other.data.items():
            self[stage].update(counts)
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stats) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, dict[str, int]]:
        """Sorted, zero-free plain dicts: the form written to manifests (deterministic JSON)."""
        return {
            stage: {k: int(v) for k, v in sorted(counts.items()) if v}
            for stage, counts in sorted(self.data.items())
            if any(counts.values())
        }

    def __repr__(self) -> str:
        return f"Stats({self.to_dict()})"


class PipelineStep:
    """A generator over documents with its own counters (`self.stats`)."""

    name: str = "step"

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        raise NotImplementedError(f"{type(self).__name__} must implement run(docs)")

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        return self.run(docs)


class BaseFilter(PipelineStep):
    """Keeps documents for which `filter(doc)` is true; counts drops as `dropped.<reason>`."""

    name = "filter"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        raise NotImplementedError(f"{type(self).__name__} must implement filter(doc)")

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            verdict = self.filter(doc)
            if isinstance(verdict, tuple):
                keep, reason = verdict
            else:
                keep, reason = bool(verdict), self.name
            if keep:
                self.stats["kept"] += 1
                yield doc
            else:
                self.stats[f"dropped.{reason}"] += 1


def run_steps(steps: Iterable[PipelineStep], docs: Iterable[Document]) -> Iterator[Document]:
    """Chain steps lazily: documents stream through every step one at a time."""
    for step in steps:
        docs = step.run(docs)
    yield from docs


def as_dict(obj: Any) -> dict[str, Any]:
    """A frozen config dataclass as a JSON-ready dict (tuples become lists)."""
    import dataclasses

    return json_ready(dataclasses.asdict(obj))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def stable_int(*parts: object) -> int:
    """A 64-bit integer of `parts` (joined by NUL) that is the same in every process and run, unlike
    the salted `hash()`: blake2b, little-endian. Seeds per file and per repository, and the
    repository -> bucket partition, all come from here."""
    text = "\0".join(map(str, parts)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
