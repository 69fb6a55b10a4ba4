"""HumanEval infilling (InCoder / FIM-paper benchmarks) derived from HumanEval's canonical solutions.

The rules, checked byte for byte against openai/human-eval-infilling's data files (fingerprints
in tests/eval/test_tasks.py):
- single-line (1033): each non-blank line i of `canonical_solution.split("\\n")` is the middle;
  prefix = prompt + "\\n".join(lines[:i]) + "\\n", middle = lines[i] + "\\n",
  suffix = "\\n".join(lines[i+1:]); id `SingleLineInfilling/HumanEval/{n}/L{i}`.
- multi-line (5815): every span of lines [i, j] whose first and last lines are non-blank, same
  joining; id `MultiLineInfilling/HumanEval/{n}/L{i}_L{j}`.
- random-span (1640): per problem in order, a single `numpy.random.RandomState(42)` draws
  `sorted(randint(0, len(solution) + 1, size=2))` until 10 distinct character spans are found;
  ids `RandomSpanInfilling/HumanEval/{n}/{1..10}`.
- random-span-light (164): the published set is one span per problem but was cut from a different
  text of the solutions (28 of them differ from the PyPI data), so it cannot be rebuilt exactly;
  here it is the first random-span task of each problem, id `RandomSpanInfillingLight/HumanEval/{n}/1`.
The quirk that the prefix of a span starting at line 0 gains one extra "\\n" is the benchmark's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from codegemma.eval.tasks import Task

VARIANTS = ("single-line", "multi-line", "random-span", "random-span-light")
RANDOM_SPAN_SEED = 42
SPANS_PER_PROBLEM = 10


def _task(p: Task, task_id: str, prefix: str, middle: str, suffix: str) -> Task:
    return Task(
        task_id=task_id,
        prompt=p.prompt + prefix,
        suffix=suffix,
        canonical_solution=middle,
        test=p.test,
        entry_point=p.entry_point,
        kind="infilling",
    )


def _line_span(p: Task, i: int, j: int, task_id: str) -> Task:
    lines = p.canonical_solution.split("\n")
    return _task(
        p,
        task_id,
        "\n".join(lines[:i]) + "\n",
        "\n".join(lines[i : j + 1]) + "\n",
        "\n".join(lines[j + 1 :]),
    )


def _nonblank(p: Task) -> list[int]:
    return [i for i, line in enumerate(p.canonical_solution.split("\n")) if line.strip()]


def single_line(problems: Sequence[Task]) -> Iterator[Task]:
    for p in problems:
        for i in _nonblank(p):
            yield _line_span(p, i, i, f"SingleLineInfilling/{p.task_id}/L{i}")


def multi_line(problems: Sequence[Task]) -> Iterator[Task]:
    for p in problems:
        rows = _nonblank(p)
        for a, i in enumerate(rows):
            for j in rows[a:]:
                yield _line_span(p, i, j, f"MultiLineInfilling/{p.task_id}/L{i}_L{j}")


def random_spans(problems: Sequence[Task]) -> Iterator[tuple[Task, int, int, int]]:
    """(problem, k, start, end) with k = 1..10, from one RNG over all problems in order."""
    rng = np.random.RandomState(RANDOM_SPAN_SEED)
    for p in problems:
        n = len(p.canonical_solution)
        seen: set[tuple[int, int]] = set()
        while len(seen) < min(SPANS_PER_PROBLEM, (n + 1) * (n + 2) // 2):
            start, end = sorted(int(x) for x in rng.randint(0, n + 1, size=2))
            if (start, end) not in seen:
                seen.add((start, end))
                yield p, len(seen), start, end


def random_span(problems: Sequence[Task], *, light: bool = False) -> Iterator[Task]:
    name = "RandomSpanInfillingLight" if light else "RandomSpanInfilling"
    for p, k, s, e in random_spans(problems):
        if light and k != 1:
            continue
        cs = p.canonical_solution
        yield _task(p, f"{name}/{p.task_id}/{k}", cs[:s], cs[s:e], cs[e:])


def build_infilling(variant: str, problems: Sequence[Task]) -> list[Task]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown infilling variant {variant!r}; choose one of {VARIANTS}")
    if variant == "single-line":
        return list(single_line(problems))
    if variant == "multi-line":
        return list(multi_line(problems))
    return list(random_span(problems, light=variant == "random-span-light"))
