"""BabelCode's BC-HumanEval (161) and BC-MBPP (855) in C++, C#, Go, Java, JavaScript, Kotlin,
Python and Rust: problems, prompts, post-processing, program assembly, run specs and verdicts.

The problems are BabelCode's generated data (google-research/babelcode at d37a231, Apache-2.0;
Orlanski et al. 2023, "Measuring The Impact Of Programming Language Distribution",
arXiv:2302.01973), bundled under data/babelcode/ by scripts/babelcode_data.py; each row keeps
BabelCode's field names (`qid`, `signature`, `signature_with_docstring`, `text`, `test_code`,
`test_case_ids`, `entry_fn_name`, `entry_cls_name`, `test_list`, ...).

    from codegemma.eval.tasks.babelcode import load_babelcode, program_for_completion
    problems = load_babelcode("humaneval", "rust")       # 161 problems
    problems[0].prompt()                                 # signature_with_docstring
    program = program_for_completion(problems[0], completion)

How BabelCode scores a prediction (its drivers.setup_language_code_dirs, execution.py and
data_types/result_types.py), which this module reproduces:

- the prediction's code is the whole solution, signature included (prompt + completion here);
- the program is `test_code` with PLACEHOLDER_CODE_BODY replaced by that code, then
  PLACEHOLDER_FN_NAME and PLACEHOLDER_CLS_NAME by the entry names;
- the language's commands run in order in the program's directory, each under its timeout; a
  command that exits non-zero stops the run;
- the program prints `TEST-<id>...<result>` per test case, result `PASSED`, `FAILED` or an
  exception name; a problem passes when the last command exited 0, nothing timed out, the output
  is not empty and every test id printed PASSED.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from codegemma.errors import EvalError

DATA_DIR = Path(__file__).parent / "data" / "babelcode"
LANGUAGES = ("cpp", "csharp", "go", "java", "javascript", "kotlin", "python", "rust")
BABELCODE_NAMES = {
    "cpp": "C++",
    "csharp": "CSharp",
    "go": "Go",
    "java": "Java",
    "javascript": "Javascript",
    "kotlin": "Kotlin",
    "python": "Python",
    "rust": "Rust",
}
DATASETS = {"humaneval": "human_eval", "mbpp": "mbpp"}  # our name -> BabelCode's
SET_PREFIX = {"humaneval": "bc-humaneval", "mbpp": "bc-mbpp"}
FILENAME = "__FILENAME__"  # the stem placeholder in languages.json's command lines

# What closes a solution cut at the language's stop word: the prompts of C++ and Rust open a
# function, those of C# and Java a class and a method (`class Solution {` ... `{`). Go,
# JavaScript and Python stop words end at the next top-level item, after the model's own `}`.
CLOSERS = {"cpp": "\n}", "rust": "\n}", "csharp": "\n    }\n}", "java": "\n    }\n}"}

# Debian packages (and the npm Kotlin compiler BabelCode's harness ran on a JDK) per language;
# scripts/install_toolchains.sh installs the same.
INSTALL = {
    "cpp": "apt-get install -y g++",
    "csharp": "apt-get install -y mono-mcs mono-devel libmono-system-web-extensions4.0-cil",
    "go": "apt-get install -y golang-go",
    "java": "apt-get install -y openjdk-17-jdk-headless",
    "javascript": "apt-get install -y nodejs",
    "kotlin": (
        "apt-get install -y openjdk-17-jdk-headless npm && npm install -g kotlin-compiler@1.7.22"
        ' && ln -sf "$(npm root -g)/kotlin-compiler/bin/kotlinc" /usr/local/bin/kotlinc'
    ),
    "python": "apt-get install -y python-is-python3",
    "rust": "apt-get install -y rustc",
}
VERSION_ARGS = {
    "g++": ("--version",),
    "mono-csc": ("--version",),
    "mono": ("--version",),
    "go": ("version",),
    "java": ("-version",),
    "node": ("--version",),
    "python": ("--version",),
    "rustc": ("--version",),
}

TEST_LINE = re.compile(r"^TEST-(.+)\.\.\.(.+)$", flags=re.MULTILINE)  # result_types.GET_TC_REGEX
PASSED, FAILED, MISSING = "PASSED", "FAILED", "MISSING"
# BabelCode's PredictionOutcome values.
OUTCOME_PASSED = "Passed"
OUTCOME_TIMED_OUT = "Timed Out"
OUTCOME_ERROR = "Had Error"
OUTCOME_RUNTIME_ERROR = "Had Runtime Error"
OUTCOME_FAILED = "Failed Tests"


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class LanguageSpec:
    """How BabelCode builds and runs one language: file extension, commands with their timeouts
    (`__FILENAME__` stands for the program's stem), stop words, and our closer."""

    language: str
    babelcode_name: str
    file_ext: str
    commands: tuple[tuple[str, ...], ...]
    timeouts: tuple[float, ...]
    stop_words: tuple[str, ...]
    closer: str = ""

    def file_name(self, stem: str = "main") -> str:
        return f"{stem}.{self.file_ext}"

    def commands_for(self, stem: str = "main") -> list[Command]:
        return [
            Command(tuple(arg.replace(FILENAME, stem) for arg in argv), timeout)
            for argv, timeout in zip(self.commands, self.timeouts, strict=True)
        ]

    @property
    def tools(self) -> tuple[str, ...]:
        """The executables the commands need (the program's own binary excluded)."""
        return tuple(dict.fromkeys(a[0] for a in self.commands if not a[0].startswith("./")))


@cache
def language_specs() -> dict[str, LanguageSpec]:
    """The run spec of every language, from data/babelcode/languages.json."""
    raw = json.loads(_data_file("languages.json").read_text(encoding="utf-8"))
    return {
        lang: LanguageSpec(
            language=lang,
            babelcode_name=raw[lang]["babelcode_name"],
            file_ext=raw[lang]["file_ext"],
            commands=tuple(tuple(c) for c in raw[lang]["commands"]),
            timeouts=tuple(float(t) for t in raw[lang]["timeouts"]),
            stop_words=tuple(raw[lang]["stop_words"]),
            closer=CLOSERS.get(lang, ""),
        )
        for lang in LANGUAGES
    }


def language_spec(language: str) -> LanguageSpec:
    _check_language(language)
    return language_specs()[language]


@dataclass(frozen=True)
class BabelCodeProblem:
    """One BabelCode problem in one language; `row` is the exported row, BabelCode's keys."""

    dataset: str
    language: str
    row: dict = field(repr=False, compare=False, hash=False)

    kind = "babelcode"  # what the runner and execution dispatch on (Task.kind for the others)

    @property
    def qid(self) -> str:
        return self.row["qid"]

    @property
    def task_id(self) -> str:
        return f"{SET_PREFIX[self.dataset]}-{self.language}/{self.qid}"

    @property
    def signature(self) -> str:
        return self.row["signature"]

    @property
    def signature_with_docstring(self) -> str:
        return self.row["signature_with_docstring"] or self.row["signature"]

    @property
    def text(self) -> str:
        return self.row["text"]

    @property
    def test_code(self) -> str:
        return self.row["test_code"]

    @property
    def test_case_ids(self) -> list[str]:
        return self.row["test_case_ids"]

    @property
    def entry_fn_name(self) -> str:
        return self.row["entry_fn_name"]

    @property
    def entry_cls_name(self) -> str:
        return self.row["entry_cls_name"]

    @property
    def spec(self) -> LanguageSpec:
        return language_spec(self.language)

    def prompt(self, *, with_examples: bool = False) -> str:
        """`signature_with_docstring`; with_examples adds the test cases to the docstring as
        `>>> fn(args)` / result lines (Python literals, as HumanEval's docstrings write them)."""
        prompt = self.signature_with_docstring
        return add_examples(prompt, self.example_lines()) if with_examples else prompt

    def example_lines(self) -> list[str]:
        """The test cases as docstring lines, arguments in the signature's order."""
        lines = []
        for case in self.row["test_list"]:
            args = ", ".join(repr(case["inputs"][name]) for name in self.row["arguments"])
            lines += [f">>> {self.entry_fn_name}({args})", repr(case["outputs"])]
        return lines


def add_examples(prompt: str, lines: Sequence[str]) -> str:
    """Insert `lines` at the end of the prompt's docstring, in its comment style.

    Python's docstring follows the signature and ends with a `\"\"\"` line; every other language's
    precedes the last line (the signature) and is a `/** ... */` block or `//` / `///` lines.
    """
    rows = prompt.rstrip("\n").split("\n")
    trailing = prompt[len(prompt.rstrip("\n")) :]
    if rows[-1].strip() == '"""':
        at, prefix = len(rows) - 1, rows[-1][: rows[-1].index('"')]
    elif len(rows) >= 2 and rows[-2].strip() == "*/":
        at, prefix = len(rows) - 2, rows[-2][: rows[-2].index("*/")] + "* "
    elif len(rows) >= 2 and rows[-2].lstrip().startswith("//"):
        marker = re.match(r"\s*/+", rows[-2]).group(0)
        at, prefix = len(rows) - 1, marker + " "
    else:
        raise EvalError(f"no docstring to add examples to in prompt {prompt[:80]!r}")
    rows[at:at] = [prefix + line for line in lines]
    return "\n".join(rows) + trailing


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise EvalError(f"unknown BabelCode language {language!r}; choose one of {LANGUAGES}")


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise EvalError(f"unknown BabelCode dataset {dataset!r}; choose one of {list(DATASETS)}")


def _data_file(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise EvalError(
            f"BabelCode data file {path} is missing",
            fix="reinstall codegemma, or regenerate it with scripts/babelcode_data.py",
        )
    return path


def read_gzip_jsonl(path: str | os.PathLike) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def set_path(dataset: str, language: str, *, validation: bool = False) -> Path:
    _check_dataset(dataset)
    _check_language(language)
    suffix = ".validation.jsonl.gz" if validation else ".jsonl.gz"
    return _data_file(f"{dataset}-{language}{suffix}")


def load_babelcode(
    dataset: str, language: str, data: str | os.PathLike | None = None
) -> list[BabelCodeProblem]:
    """The problems of one set in BabelCode's order; `data` overrides the bundled file."""
    path = Path(data) if data else set_path(dataset, language)
    rows = read_gzip_jsonl(path)
    want = BABELCODE_NAMES[language]
    wrong = [r.get("qid") for r in rows if r.get("language") != want]
    if wrong:
        raise EvalError(f"{path}: rows {wrong[:5]} are not {want} problems")
    return [BabelCodeProblem(dataset=dataset, language=language, row=row) for row in rows]


def load_validation_predictions(dataset: str, language: str) -> list[dict]:
    """BabelCode's validation predictions (make_validation_preds.py): `qid`, `language`, `code`;
    a stub returning the first test's expected output, or for Python the gold solution."""
    return read_gzip_jsonl(set_path(dataset, language, validation=True))


def babelcode_tasksets() -> dict[str, Callable]:
    """`bc-humaneval-<lang>` / `bc-mbpp-<lang>` -> loader(data, limit), as TASKSETS holds them."""

    def loader(dataset: str, language: str) -> Callable:
        def load(data=None, limit=None):
            problems = load_babelcode(dataset, language, data)
            return problems[:limit] if limit is not None else problems

        return load

    return {f"{SET_PREFIX[d]}-{lang}": loader(d, lang) for d in DATASETS for lang in LANGUAGES}


def by_qid(problems: Iterable[BabelCodeProblem]) -> dict[str, BabelCodeProblem]:
    return {p.qid: p for p in problems}


def canonical_jsonl(rows: Iterable[dict]) -> str:
    """The canonical serialisation: one JSON object per line, sorted keys, ASCII, no spaces."""
    return "".join(
        json.dumps(r, sort_keys=True, ensure_ascii=True, separators=(",", ":")) + "\n" for r in rows
    )


def rows_sha256(rows: Iterable[dict]) -> str:
    return hashlib.sha256(canonical_jsonl(rows).encode("utf-8")).hexdigest()


def export_jsonl(problems: Iterable[BabelCodeProblem], out: str | os.PathLike) -> Path:
    """Write the problems' rows (BabelCode's keys) canonically, comparable with its generator's
    prompt_info.jsonl and testing_code.jsonl rows key by key."""
    from codegemma.fileio import write_text_atomic

    path = Path(out)
    write_text_atomic(path, canonical_jsonl(p.row for p in problems))
    return path


# -- post-processing and assembly ------------------------------------------------------------


def postprocess(language: str, completion: str) -> str:
    """Cut the completion at the first of the language's stop words (BabelCode's
    data/language_stop_words.json; none for Kotlin) and, when cut, close what the prompt opened."""
    spec = language_spec(language)
    cut = min((i for w in spec.stop_words if (i := completion.find(w)) >= 0), default=-1)
    if cut < 0:
        return completion
    return completion[:cut] + spec.closer


def assemble(problem: BabelCodeProblem, code: str) -> str:
    """The program BabelCode runs for a prediction whose full code is `code` (drivers.py:
    replace the code body first, then the entry names, every occurrence)."""
    program = problem.test_code.replace("PLACEHOLDER_CODE_BODY", code)
    program = program.replace("PLACEHOLDER_FN_NAME", problem.entry_fn_name)
    return program.replace("PLACEHOLDER_CLS_NAME", problem.entry_cls_name)


def program_for_completion(
    problem: BabelCodeProblem, completion: str, *, with_examples: bool = False
) -> str:
    """The program for a model's completion of `problem.prompt(with_examples=...)`."""
    code = problem.prompt(with_examples=with_examples) + postprocess(problem.language, completion)
    return assemble(problem, code)


# -- verdicts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """What running a program's commands gave: the last command's exit code and output."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    last_command: int  # index of the last command started
    durations_s: tuple[float, ...]


@dataclass(frozen=True)
class Verdict:
    outcome: str  # one of BabelCode's PredictionOutcome values
    test_results: dict[str, str]  # test id -> PASSED, FAILED, MISSING or an exception name

    @property
    def passed(self) -> bool:
        return self.outcome == OUTCOME_PASSED


def parse_test_results(stdout: str, test_ids: Sequence[str]) -> dict[str, str]:
    """Per test id, what the program printed on its `TEST-<id>...<result>` line (the last such
    line when repeated); MISSING for an id it never printed. Other ids are ignored."""
    wanted = set(test_ids)
    found = {tid: res for tid, res in TEST_LINE.findall(stdout) if tid in wanted}
    return {tid: found.get(tid, MISSING) for tid in test_ids}


def verdict(result: RunResult, test_ids: Sequence[str]) -> Verdict:
    """BabelCode's outcome rule (PredictionResult.from_execution_result)."""
    if result.timed_out:
        return Verdict(OUTCOME_TIMED_OUT, dict.fromkeys(test_ids, MISSING))
    tests = parse_test_results(result.stdout, test_ids)
    if result.returncode != 0 or not result.stdout:
        return Verdict(OUTCOME_ERROR, tests)
    values = set(tests.values())
    if MISSING in values:
        return Verdict(OUTCOME_ERROR, tests)
    if values - {PASSED, FAILED}:
        return Verdict(OUTCOME_RUNTIME_ERROR, tests)
    if FAILED in values:
        return Verdict(OUTCOME_FAILED, tests)
    return Verdict(OUTCOME_PASSED, tests)


def verdicts_sha256(outcomes: dict[str, str]) -> str:
    """A fingerprint of per-problem outcomes: `qid outcome` lines in qid order."""
    lines = "".join(f"{q} {outcomes[q]}\n" for q in sorted(outcomes, key=_qid_key))
    return hashlib.sha256(lines.encode()).hexdigest()


def _qid_key(qid: str) -> tuple:
    return (0, int(qid), "") if qid.isdigit() else (1, 0, qid)


# -- running (tests and validation of BabelCode's own stubs only) ------------------------------


def run_program_unsandboxed(
    spec: LanguageSpec,
    program: str,
    workdir: str | os.PathLike,
    *,
    stem: str = "main",
    timeout_scale: float = 1.0,
) -> RunResult:
    """Write `program` to workdir/<stem>.<ext> and run the language's commands there, as
    BabelCode's execution.py does. NO SANDBOX: only for tests and for validating BabelCode's own
    stubs and gold solutions; model output runs through codegemma.eval.sandbox.

    `timeout_scale` multiplies every command's timeout, for machines so loaded that a compiler
    alone outlives BabelCode's limits (a timed-out compile is not a verdict on the program)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / spec.file_name(stem)).write_text(program, encoding="utf-8")
    durations: list[float] = []
    proc = None
    for i, command in enumerate(spec.commands_for(stem)):
        start = time.monotonic()
        proc, timed_out = _run_one(command, workdir, command.timeout_s * timeout_scale)
        durations.append(time.monotonic() - start)
        if timed_out:
            return RunResult(None, "", "", True, i, tuple(durations))
        if proc.returncode != 0:
            break
    return RunResult(
        proc.returncode,
        proc.stdout.decode("utf-8", errors="ignore"),
        proc.stderr.decode("utf-8", errors="ignore"),
        False,
        i,
        tuple(durations),
    )


def _run_one(
    command: Command, cwd: Path, timeout_s: float
) -> tuple[subprocess.CompletedProcess, bool]:
    """One command in its own session, killed with its children when it outlives its timeout."""
    with subprocess.Popen(
        list(command.argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            p.communicate()
            return subprocess.CompletedProcess(p.args, -9, b"", b""), True
        finally:
            _kill_group(p)  # what it left running
        return subprocess.CompletedProcess(p.args, p.returncode, out, err), False


def _kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)


# -- toolchains --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolchainStatus:
    language: str
    tools: tuple[str, ...]
    missing: tuple[str, ...]
    version: str  # first line of the first tool's version output; "" when missing
    install: str  # the command that installs what is missing ("" when nothing is)

    @property
    def available(self) -> bool:
        return not self.missing


def toolchain_status(languages: Iterable[str] = LANGUAGES) -> list[ToolchainStatus]:
    """Each language's toolchain: the executables its commands need, which are missing, the
    version of the first, and the install command (scripts/install_toolchains.sh) when missing."""
    out = []
    for lang in languages:
        tools = language_spec(lang).tools
        missing = tuple(t for t in tools if shutil.which(t) is None)
        out.append(
            ToolchainStatus(
                language=lang,
                tools=tools,
                missing=missing,
                version="" if missing else _version(tools[0]),
                install=INSTALL[lang] if missing else "",
            )
        )
    return out


def require_toolchains(languages: Iterable[str]) -> None:
    """Raise EvalError naming every missing toolchain and its install command (before any
    generation: a missing compiler must never read as a 0% score)."""
    missing = [s for s in toolchain_status(languages) if not s.available]
    if missing:
        lines = "; ".join(f"{s.language} needs {', '.join(s.missing)}" for s in missing)
        fixes = " && ".join(s.install for s in missing)
        raise EvalError(f"missing toolchains: {lines}", fix=f"as root: {fixes}")


def _version(tool: str) -> str:
    if tool == "kotlinc":  # a JVM start is slow; the compiler ships its version in build.txt
        build = Path(os.path.realpath(shutil.which(tool) or "")).parent.parent / "build.txt"
        return f"kotlinc {build.read_text().strip()}" if build.is_file() else "kotlinc"
    try:
        p = subprocess.run(
            [tool, *VERSION_ARGS.get(tool, ("--version",))],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0] if text else ""


# -- sandboxed runs: toolchain paths, limits, result markers ------------------------------------

# Directories every sandbox root binds already; a toolchain elsewhere is bound read-only.
SYSTEM_PREFIXES = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/etc/")
# A JVM, Go, Node and Mono reserve far more address space than they use: RLIMIT_AS would stop
# them starting, so they run under RLIMIT_DATA instead; their threads count as processes.
RUNTIMES = ("csharp", "go", "java", "javascript", "kotlin")
NATIVE = ("cpp", "go", "rust")  # binaries that run without being readable (made execute-only)
RUN_ENV = {
    "HOME": "{home}",
    "TMPDIR": "{home}",
    "XDG_CACHE_HOME": "{home}/.cache",
    "GOCACHE": "{home}/.cache/go-build",
    "GOPATH": "{home}/go",
    "GO111MODULE": "off",
    "DOTNET_EnableDiagnostics": "0",
}


@dataclass(frozen=True)
class Toolchain:
    """What a sandbox needs to run one language: absolute commands, the host directories to bind
    read-only, the extra environment, and the binaries to make execute-only."""

    language: str
    commands: tuple[tuple[str, ...], ...]
    read_only: tuple[str, ...]
    env: dict = field(hash=False, compare=False)
    exec_only: tuple[str, ...]
    reused: tuple[str, ...] = ()  # what the run built once for all its programs (REUSE)


def sandbox_toolchain(language: str, stem: str = "main") -> Toolchain:
    """The language's commands with every tool as an absolute path that exists inside the
    sandbox's root (Python: the harness's own interpreter; rustup's proxy: the toolchain's rustc),
    and the directories outside the system trees those tools live in."""
    require_toolchains([language])
    spec = language_spec(language)
    tools: dict[str, str] = {}
    read_only: list[str] = []
    for tool in spec.tools:
        path, root = _resolve_tool(tool)
        tools[tool] = path
        if root:
            read_only.append(root)
    commands = tuple(
        (tools.get(c.argv[0], c.argv[0]), *c.argv[1:]) for c in spec.commands_for(stem)
    )
    binaries = {c[0][2:] for c in commands if c[0].startswith("./")}
    return Toolchain(
        language=language,
        commands=commands,
        read_only=tuple(dict.fromkeys(read_only)),
        env=dict(RUN_ENV),
        exec_only=tuple(sorted(binaries)) if language in NATIVE else (),
    )


# -- reuse between the programs of one run -------------------------------------------------------
# What a run builds or sets once, before any program runs, into its cache directory, which every
# program's sandbox then binds read-only. Each is built from the toolchain itself (Java and
# Kotlin: by running BabelCode's own stub of HumanEval/0 once, outside the sandbox: our bundled
# data, never model output). None changes what a program computes:
REUSE = {
    # every C++ test harness includes bits/stdc++.h; `-include` of its precompiled state before
    # the program's first line makes the program's own #includes no-ops (their guards are set)
    "cpp": "precompiled bits/stdc++.h",
    # Go 1.19 ships the standard library precompiled, so a build cache holds only the program's
    # own package (a warm per-run copy of one was no faster); what a build spends is the link,
    # which skips the symbol table and DWARF (-s -w): the code is the same, and a panic's stack
    # trace too (that comes from the pclntab, which stays)
    "go": "linked without symbol table and DWARF",
    # the classes javac (the source launcher) and kotlinc load, mapped from a class-data-sharing
    # archive instead of parsed from the jars; the serial collector (one thread, small heaps)
    "java": "class-data-sharing archive, serial GC",
    # the same, and only the C1 JIT: kotlinc is short-lived and C2's compile threads cost more
    # than they give on two cores; the kotlinc script's own -Xmx256M -Xms32M is kept
    "kotlin": "class-data-sharing archive, serial GC, C1 only",
    # the same interpreter as a virtual environment with no packages (BabelCode's programs use
    # the standard library only), so the .pth files of the harness's own site-packages, which
    # run code at every start (17 ms of a 42 ms program on one machine), run at none of theirs
    "python": "an empty virtual environment over the interpreter",
}
GO_LINK_FLAGS = "-ldflags=-s -w"
KOTLIN_JAVA_OPTS = ("-Xmx256M", "-Xms32M")  # what the kotlinc script uses when JAVA_OPTS is unset
JVM_FLAGS = ("-XX:+UseSerialGC",)
KOTLIN_JVM_FLAGS = (*KOTLIN_JAVA_OPTS, "-XX:TieredStopAtLevel=1", *JVM_FLAGS)
WARMUP_QID = "0"  # the HumanEval problem whose BabelCode stub warms the JVM archives
PREPARE_TIMEOUT_S = 600.0


def prepare_toolchain(language: str, cache_dir: str | os.PathLike, stem: str = "main") -> Toolchain:
    """`sandbox_toolchain` with what a run reuses between its programs (REUSE) built once into
    `cache_dir` (bound read-only into every run). When an artifact cannot be built, the language
    runs as BabelCode runs it; `reused` says what was built."""
    tc = sandbox_toolchain(language, stem)
    cache = Path(cache_dir).resolve()
    builders = {
        "cpp": _with_pch,
        "go": _with_stripped_link,
        "java": _with_java_archive,
        "kotlin": _with_kotlin_archive,
        "python": _with_empty_environment,
    }
    if language not in builders:
        return tc
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)  # the sandbox uid reads it
    return builders[language](tc, cache)


def _with_pch(tc: Toolchain, cache: Path) -> Toolchain:
    """`g++ -include <cache>/bits/stdc++.h ...`, with <cache>/bits/stdc++.h.gch built by the same
    compiler with the same (default) options, so g++ loads it instead of parsing the header."""
    gxx = tc.commands[0][0]
    found = _run_trusted([gxx, "-x", "c++", "-M", "-"], cache, stdin="#include <bits/stdc++.h>\n")
    deps = found.stdout.replace("\\\n", " ").split() if found.returncode == 0 else []
    header = next((d for d in deps if d.endswith("/bits/stdc++.h")), None)
    if header is None:
        return tc
    bits = cache / "bits"
    bits.mkdir(mode=0o755, exist_ok=True)
    local = bits / "stdc++.h"
    shutil.copyfile(header, local)
    built = _run_trusted([gxx, "-x", "c++-header", str(local), "-o", f"{local}.gch"], cache)
    if built.returncode != 0 or not Path(f"{local}.gch").is_file():
        return tc
    _readable(cache)
    first = (tc.commands[0][0], "-include", str(local), *tc.commands[0][1:])
    return _reusing(tc, (first, *tc.commands[1:]), cache)


def _with_stripped_link(tc: Toolchain, cache: Path) -> Toolchain:
    """`go build -ldflags=-s -w -o main.exe main.go`, once built on the warm-up stub."""
    go, build, *rest = tc.commands[0]
    first = (go, build, GO_LINK_FLAGS, *rest)
    if not _warm_up("go", first, {}, cache, runs=False):
        return tc
    _readable(cache)
    return _reusing(tc, (first, *tc.commands[1:]), cache)


def _with_empty_environment(tc: Toolchain, cache: Path) -> Toolchain:
    """`<cache>/python/bin/python3 main.py`: a link to the same interpreter beside a pyvenv.cfg
    that names no packages, so each program starts as in a fresh `python -m venv`."""
    import platform

    interpreter, *rest = tc.commands[0]  # this process's own (`_resolve_tool`)
    env = cache / "python"
    (env / "bin").mkdir(parents=True, exist_ok=True)
    (env / "pyvenv.cfg").write_text(
        f"home = {os.path.dirname(interpreter)}\ninclude-system-site-packages = false\n"
        f"version = {platform.python_version()}\n",
        encoding="utf-8",
    )
    link = env / "bin" / "python3"
    link.unlink(missing_ok=True)
    link.symlink_to(interpreter)
    first = (str(link), *rest)
    if not _warm_up("python", first, {}, cache):
        return tc
    _readable(cache)
    return _reusing(tc, (first, *tc.commands[1:]), cache)


def _with_java_archive(tc: Toolchain, cache: Path) -> Toolchain:
    """`java -XX:+UseSerialGC -XX:SharedArchiveFile=<cache>/java.jsa main.java`: the archive is
    dumped at the exit of one run of the warm-up program with the same flags."""
    java, *rest = tc.commands[0]
    archive = cache / "java.jsa"
    dump = (java, *JVM_FLAGS, f"-XX:ArchiveClassesAtExit={archive}", *rest)
    if not _warm_up("java", dump, {}, cache) or not archive.is_file():
        return tc
    _readable(cache)
    run = (java, *JVM_FLAGS, f"-XX:SharedArchiveFile={archive}", *rest)
    return _reusing(tc, (run,), cache)


def _with_kotlin_archive(tc: Toolchain, cache: Path) -> Toolchain:
    """The kotlinc script's JVM gets JAVA_OPTS: its default heap flags, C1 only, serial GC and a
    class-data-sharing archive dumped at the exit of one warm-up run with the same flags."""
    archive = cache / "kotlin.jsa"
    dump = {"JAVA_OPTS": " ".join((*KOTLIN_JVM_FLAGS, f"-XX:ArchiveClassesAtExit={archive}"))}
    if not _warm_up("kotlin", tc.commands[0], dump, cache) or not archive.is_file():
        return tc
    _readable(cache)
    env = {"JAVA_OPTS": " ".join((*KOTLIN_JVM_FLAGS, f"-XX:SharedArchiveFile={archive}"))}
    return _reusing(tc, tc.commands, cache, env=env)


def _reusing(tc: Toolchain, commands: tuple, cache: Path, *, env: dict | None = None) -> Toolchain:
    return Toolchain(
        language=tc.language,
        commands=tuple(tuple(c) for c in commands),
        read_only=tuple(dict.fromkeys((*tc.read_only, str(cache)))),
        env={**tc.env, **(env or {})},
        exec_only=tc.exec_only,
        reused=(REUSE[tc.language],),
    )


def _warm_up(
    language: str, argv: Sequence[str], env: dict, cache: Path, *, runs: bool = True
) -> bool:
    """Run `argv` (the program's own run, or with `runs=False` its compile step) on BabelCode's
    stub of HumanEval/WARMUP_QID in a scratch directory; True when it worked."""
    problem = by_qid(load_babelcode("humaneval", language))[WARMUP_QID]
    stub = {s["qid"]: s["code"] for s in load_validation_predictions("humaneval", language)}
    work = cache / "warm-up"
    work.mkdir(exist_ok=True)
    try:
        (work / problem.spec.file_name()).write_text(
            assemble(problem, stub[WARMUP_QID]), encoding="utf-8"
        )
        done = _run_trusted(list(argv), work, env=env)
        return done.returncode == 0 and (not runs or "TEST-0..." in done.stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_trusted(
    argv: list[str], cwd: Path, *, stdin: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """A toolchain command on trusted input (no sandbox), with the sandbox's environment."""
    from codegemma.eval.sandbox import scrubbed_env

    run_env = {
        **scrubbed_env(),
        **{k: v.replace("{home}", str(cwd)) for k, v in RUN_ENV.items()},
        **(env or {}),
    }
    try:
        return subprocess.run(
            argv,
            cwd=cwd,
            input=stdin,
            capture_output=True,
            text=True,
            env=run_env,
            timeout=PREPARE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(argv, -1, "", str(e))


def _readable(root: Path) -> None:
    """Directories 0755 and files 0444 below `root`: the sandbox uid reads, nobody writes.
    Links are left alone (chmod would change what they point to)."""
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            if not os.path.islink(path := os.path.join(d, f)):
                os.chmod(path, 0o444)


def _resolve_tool(tool: str) -> tuple[str, str]:
    """(absolute path to run, host directory to bind or "")."""
    import sys

    if tool == "python":
        return os.path.realpath(sys.executable), ""  # the sandbox binds its interpreter already
    found = shutil.which(tool)
    real = os.path.realpath(found)
    if os.path.basename(real) == "rustup":  # a proxy: run the toolchain's compiler itself
        sysroot = subprocess.run(
            [found, "--print", "sysroot"], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        return os.path.join(sysroot, "bin", tool), sysroot
    if real.startswith(SYSTEM_PREFIXES):
        return found if found.startswith(SYSTEM_PREFIXES) else real, ""
    root = os.path.dirname(os.path.dirname(real))  # <root>/bin/<tool>
    return real, root


def sandbox_limits(language: str, timeout_s: float):
    """Per-language sandbox limits (see docs/eval.md): runtimes get RLIMIT_DATA instead of an
    address-space limit, and room for their threads and open files."""
    from codegemma.eval.sandbox import Limits

    runtime = language in RUNTIMES
    return Limits(
        timeout_s=timeout_s,
        memory_bytes=None if runtime else 2 << 30,
        data_bytes=4 << 30 if runtime else None,
        max_processes=512,
        max_open_files=1024,
        max_file_bytes=128 << 20,
        max_output_bytes=256 << 10,
        tmpfs_bytes=512 << 20,
    )


def tag_markers(test_code: str, nonce: str) -> str:
    """The test code with every `TEST-` result marker made `TEST-<nonce>-`: done before the
    completion is put in, so the completion's own text never carries the nonce."""
    return test_code.replace("TEST-", f"TEST-{nonce}-")


def untag_output(stdout: str, nonce: str) -> str:
    """Only the tagged markers, as plain `TEST-<id>...` lines; any other line that looks like a
    marker (the program printing its own) is dropped."""
    tag = f"TEST-{nonce}-"
    lines = []
    for line in stdout.splitlines():
        if line.startswith(tag):
            lines.append("TEST-" + line[len(tag) :])
        elif "TEST-" not in line:
            lines.append(line)
    return "\n".join(lines) + ("\n" if lines else "")


def sandboxed_program(problem: BabelCodeProblem, code: str, nonce: str) -> str:
    """`assemble` with the markers tagged by `nonce` before the code is put in."""
    tagged = BabelCodeProblem(
        dataset=problem.dataset,
        language=problem.language,
        row=dict(problem.row, test_code=tag_markers(problem.test_code, nonce)),
    )
    return assemble(tagged, code)
