"""Our BabelCode harness against BabelCode's own: the verdicts its evaluate_predictions.py gave on
its validation predictions (tests/eval/data/babelcode_verdicts.json.gz, written from its
pred_results.jsonl by scripts/babelcode_data.py record; see tests/eval/data/README.md) are
reproduced problem by problem and test case by test case by our sandboxed harness, as
`codegemma eval` runs a model's completions (BabelCodeSandbox, with what a run reuses between
programs); and that reuse (babelcode.REUSE) is really used. The default run takes a few problems
per language (CI installs the toolchains); the slow run takes every recorded problem.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

from codegemma.eval.execution import BabelCodeSandbox, babelcode_sandbox, judge_babelcode
from codegemma.eval.tasks import babelcode as bc

VERDICTS = Path(__file__).parent / "data" / "babelcode_verdicts.json.gz"
COUNTS = {"humaneval": 161, "mbpp": 855}
SETS = [f"{d}-{lang}" for d in COUNTS for lang in bc.LANGUAGES]
SCALE = float(os.environ.get("CODEGEMMA_BABELCODE_TIMEOUT_SCALE", "0"))  # 0: the recorded


@cache
def recorded() -> dict:
    return json.loads(gzip.decompress(VERDICTS.read_bytes()))["sets"]


def needs(language: str):
    status = bc.toolchain_status([language])[0]
    return pytest.mark.skipif(
        not status.available,
        reason=f"{language} toolchain missing ({', '.join(status.missing)}): {status.install}",
    )


def tally(verdicts: dict) -> Counter:
    c = Counter(outcome for outcome, _ in verdicts.values())
    for _, tests in verdicts.values():
        c["tests PASSED"] += sum(r == "PASSED" for r in tests.values())
        c["tests not PASSED"] += sum(r != "PASSED" for r in tests.values())
    return c


def test_recorded_verdicts_cover_the_sets_and_show_what_babelcode_reports():
    sets = recorded()
    assert sorted(sets) == sorted(SETS)
    for name in SETS:
        dataset, language = name.split("-")
        problems = bc.load_babelcode(dataset, language)
        order, by_qid = [p.qid for p in problems], bc.by_qid(problems)
        got = set(sets[name]["verdicts"])  # (the file's keys are sorted as strings)
        assert got == set(order), f"{name}: not every problem of the set"
        for qid, (outcome, tests) in sets[name]["verdicts"].items():
            assert outcome in {"Passed", "Failed Tests", "Had Error", "Had Runtime Error"}, qid
            problem_ids = by_qid[qid].test_case_ids
            assert sorted(tests) == sorted(problem_ids), (name, qid)
    # The numbers from BabelCode's harness: HumanEval stubs pass 336 test cases and fail
    # 807 in every language; the Python gold solutions pass 161/161 HumanEval and 788/855 MBPP.
    for language in bc.LANGUAGES:
        he = tally(sets[f"humaneval-{language}"]["verdicts"])
        if language == "python":
            assert he["Passed"] == 161
        else:
            assert (he["tests PASSED"], he["tests not PASSED"]) == (336, 807), language
    assert tally(sets["mbpp-python"]["verdicts"])["Passed"] == 788


def subset(name: str, per_set: int) -> list[str]:
    """The set's first recorded problem of each outcome (a stub that passes, fails, does not
    compile, raises), then its first problems, up to `per_set`."""
    verdicts = recorded()[name]["verdicts"]
    first: dict[str, str] = {}
    for qid, (outcome, _) in verdicts.items():
        first.setdefault(outcome, qid)
    picked = list(dict.fromkeys([*first.values(), *verdicts]))
    return picked[:per_set]


def judge_all(name: str, qids: list[str], sandbox) -> dict:
    dataset, language = name.split("-")
    problems = bc.by_qid(bc.load_babelcode(dataset, language))
    stubs = {s["qid"]: s["code"] for s in bc.load_validation_predictions(dataset, language)}

    def one(qid):
        verdict, _ = judge_babelcode(problems[qid], stubs[qid], sandbox=sandbox)
        return qid, [verdict.outcome, verdict.test_results]

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return dict(pool.map(one, qids))


def timeout_for(name: str) -> float:
    language = name.split("-")[1]
    scale = SCALE or recorded()[name]["timeout_scale"]
    return max(bc.language_spec(language).timeouts) * scale


def assert_same(name: str, ours: dict) -> None:
    want = recorded()[name]["verdicts"]
    differ = {q: (ours[q], want[q]) for q in ours if ours[q] != want[q]}
    assert not differ, f"{name}: {len(differ)} of {len(ours)} differ (ours, theirs): {differ}"


# Kotlin: one problem, without the archive (building it is a kotlinc run of its own); the slow
# run covers the rest with it.
FAST = {"kotlin": {"humaneval": 1, "mbpp": 0}}


@pytest.mark.parametrize("language", [pytest.param(x, marks=needs(x)) for x in bc.LANGUAGES])
def test_stub_verdicts_on_a_subset_equal_babelcodes_harness(language):
    per = FAST.get(language, {"humaneval": 2, "mbpp": 4})
    names = [f"{d}-{language}" for d in COUNTS if per[d]]
    timeout = max(timeout_for(n) for n in names)
    with babelcode_sandbox(language, timeout, reuse=language != "kotlin") as sandbox:
        for name in names:
            qids = subset(name, per[name.split("-")[0]])
            assert_same(name, judge_all(name, qids, sandbox))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=needs(n.split("-")[1])) for n in SETS], ids=SETS
)
def test_stub_verdicts_on_every_recorded_problem_equal_babelcodes_harness(name):
    with babelcode_sandbox(name.split("-")[1], timeout_for(name)) as sandbox:
        assert_same(name, judge_all(name, list(recorded()[name]["verdicts"]), sandbox))


# -- reuse: built once, bound read-only, really used --------------------------------------------


def run_with(sandbox: BabelCodeSandbox, argv: tuple, env: dict | None = None, then=()):
    """HumanEval/2's stub program run with the sandbox's toolchain, `argv` as its first command
    (and `then` after the toolchain's other commands)."""
    problem = bc.by_qid(bc.load_babelcode("humaneval", sandbox.language))["2"]
    stub = bc.load_validation_predictions("humaneval", sandbox.language)[2]
    assert stub["qid"] == "2"
    tc = sandbox.toolchain
    t = sandbox.limits.timeout_s
    return sandbox.run_commands(
        {problem.spec.file_name(): bc.assemble(problem, stub["code"])},
        [(argv, t), *[(c, t) for c in tc.commands[1:]], *[(c, t) for c in then]],
        env={**tc.env, **(env or {})},
        exec_only=tc.exec_only,
    )


# A JVM's class-loading log, written in the run's home and counted there: which classes came
# from the run's archive (the dynamic, "top" layer of class-data sharing).
LOG = "-Xlog:class+load:file={home}/classes.txt"
COUNT = ("/bin/sh", "-c", 'grep -c "source: shared objects file (top)" "$HOME/classes.txt"')


@needs("cpp")
def test_cpp_programs_load_the_precompiled_header_from_the_read_only_cache():
    with babelcode_sandbox("cpp", 120) as sb:
        tc = sb.toolchain
        assert tc.reused == (bc.REUSE["cpp"],) and sb.cache_dir in tc.read_only
        gch = Path(sb.cache_dir, "bits", "stdc++.h.gch")
        assert gch.is_file() and tc.commands[0][1:3] == ("-include", str(gch)[:-4])
        r = run_with(sb, (tc.commands[0][0], "-H", *tc.commands[0][1:]))
        assert r.exit_codes == (0, 0), r.stderr[-2000:]
        assert f"! {gch}" in r.stderr  # g++ -H: "!" marks a precompiled header it used
        probe = 'int main() { return !!fopen("' + str(gch) + '", "a"); }'
        w = sb.run_commands(
            {"main.cpp": "#include <cstdio>\n" + probe}, [(c, 120) for c in tc.commands]
        )
        assert w.exit_codes == (0, 0), "a program could open the shared cache for writing"
        cache = sb.cache_dir
    assert not os.path.exists(cache), "the run's cache outlived its sandbox"


@needs("java")
def test_java_programs_map_the_class_data_sharing_archive():
    with babelcode_sandbox("java", 120) as sb:
        tc = sb.toolchain
        archive = Path(sb.cache_dir, "java.jsa")
        assert archive.is_file() and f"-XX:SharedArchiveFile={archive}" in tc.commands[0]
        # the log flag goes in JDK_JAVA_OPTIONS: java reads it, and {home} is expanded there
        r = run_with(sb, tc.commands[0], env={"JDK_JAVA_OPTIONS": LOG}, then=[COUNT])
        assert r.exit_codes == (0, 0), r.stderr[-2000:]
        assert int(r.stdout) > 1000, "the archive's classes were not used"


@pytest.mark.slow
@needs("kotlin")
def test_kotlin_runs_with_its_archive_c1_and_the_scripts_own_heap_flags():
    with babelcode_sandbox("kotlin", 300) as sb:
        opts = sb.toolchain.env["JAVA_OPTS"]
        assert opts.split()[:2] == ["-Xmx256M", "-Xms32M"] and "-XX:TieredStopAtLevel=1" in opts
        r = run_with(sb, sb.toolchain.commands[0], env={"JAVA_OPTS": f"{opts} {LOG}"}, then=[COUNT])
        assert r.exit_codes == (0, 0), r.stderr[-2000:]
        assert int(r.stdout) > 1000, "the archive's classes were not used"


@needs("python")
def test_python_programs_start_in_an_empty_environment_over_the_same_interpreter():
    probe = (
        "import builtins, sys\n"
        "print(sys.prefix)\n"
        "print(sys.base_prefix)\n"
        "print(sum('site-packages' in p and not p.startswith(sys.prefix) for p in sys.path))\n"
        "print(hasattr(builtins, 'exit'))\n"  # site.py ran as usual (it adds exit and quit)
    )
    with babelcode_sandbox("python", 30) as sb:
        tc = sb.toolchain
        env = Path(sb.cache_dir, "python")
        assert tc.reused == (bc.REUSE["python"],) and tc.commands[0][0] == str(env / "bin/python3")
        assert os.path.realpath(tc.commands[0][0]) == os.path.realpath(sys.executable)
        r = run_with(sb, tc.commands[0])
        assert r.exit_codes == (0,) and "TEST-0..." in r.stdout, r.stderr[-2000:]
        r = sb.run_commands({"main.py": probe}, [(tc.commands[0], 30)], env=tc.env)
        assert r.exit_codes == (0,), r.stderr[-2000:]
        prefix, base, foreign, has_exit = r.stdout.split()
        assert prefix == str(env) and base == sys.base_prefix
        assert foreign == "0" and has_exit == "True"
    assert os.access(sys.executable, os.X_OK), "the interpreter lost its mode"


@needs("go")
def test_go_programs_link_without_symbol_table_and_still_pass():
    with babelcode_sandbox("go", 60) as sb:
        tc = sb.toolchain
        assert tc.reused == (bc.REUSE["go"],) and tc.commands[0][2] == bc.GO_LINK_FLAGS
        r = run_with(sb, tc.commands[0])
        assert r.exit_codes == (0, 0) and "TEST-0..." in r.stdout, r.stderr[-2000:]
        panic = 'package main\nfunc f() { panic("boom") }\nfunc main() { f() }\n'
        r = sb.run_commands(
            {"main.go": panic}, [(c, 60) for c in tc.commands], env=tc.env, exec_only=tc.exec_only
        )
        assert r.exit_codes == (0, 2), r.stderr[-2000:]
        assert "main.f(" in r.stderr and "main.go:2" in r.stderr  # the trace keeps names, lines


def test_a_reuse_that_cannot_be_built_falls_back_to_babelcodes_commands(monkeypatch, tmp_path):
    if not bc.toolchain_status(["cpp"])[0].available:
        pytest.skip("g++ missing")
    failed = lambda argv, cwd, **kw: bc.subprocess.CompletedProcess(argv, 1, "", "no")  # noqa: E731
    monkeypatch.setattr(bc, "_run_trusted", failed)
    tc = bc.prepare_toolchain("cpp", tmp_path)
    assert tc.reused == () and tc.commands == bc.sandbox_toolchain("cpp").commands
    assert bc.prepare_toolchain("rust", tmp_path) == bc.sandbox_toolchain("rust")  # none for it


def test_the_cache_of_a_killed_run_is_removed_by_the_next(tmp_path, monkeypatch):
    import subprocess
    import tempfile

    from codegemma.eval import execution

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process now
    stale = tmp_path / f"{execution.CACHE_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{execution.CACHE_PREFIX}{os.getpid()}-def"
    for d in (stale, live):
        (d / "bits").mkdir(parents=True)
        (d / "bits" / "stdc++.h.gch").write_bytes(b"x")
        (d / "bits" / "stdc++.h.gch").chmod(0o444)
    fresh = Path(execution._cache_dir())
    assert not stale.exists() and live.exists() and fresh.is_dir()
    assert fresh.name.startswith(f"{execution.CACHE_PREFIX}{os.getpid()}-")
