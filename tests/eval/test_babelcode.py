"""BabelCode task sets: the bundled data against BabelCode's generator, prompts, post-processing,
assembly, run specs, verdicts and toolchains (test_babelcode_harness.py compares our sandboxed
harness with BabelCode's own on its validation predictions).

The recorded hashes come from running BabelCode's generator (google-research/babelcode at
d37a231) with scripts/babelcode_data.py. Programs run here are hand-written completions only.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from codegemma.errors import EvalError
from codegemma.eval.tasks import babelcode as bc

# sha256 of canonical_jsonl(rows) per set, computed by scripts/babelcode_data.py from the
# prompt_info.jsonl / testing_code.jsonl rows BabelCode's generator wrote.
RECORDED_SHA256 = {
    "humaneval-cpp": "de840b9346f2bbdf9501911a268c84d775202445121a02412cc8a321196435ff",
    "humaneval-csharp": "da111de3a39a39a4e5a9b9b520b4f66026030d4eb8a485ed1ad281923d076883",
    "humaneval-go": "ca5218a81231c889ea14b594779b697f23912b73b852c43c1896d6368e762760",
    "humaneval-java": "025deb4044a006d82793768aed6485a23558696384e3409219d8418cc61b4662",
    "humaneval-javascript": "44dded4f998c3e1a6aa2e589d0c00831ed11eb47ccaefa913be00c9de65960d9",
    "humaneval-kotlin": "db7ad94fdc89fa7bf7502a36e923b832cc4bad24e2e233aa440675ed8906ef0f",
    "humaneval-python": "e34691822315a4282d78a1fb723f30d8fe134c30d822f79c1dc131f01e227293",
    "humaneval-rust": "d65f0a8cd8067b8f4f0592e8c26dbe29eef1aaf647cfc4df7f5af59beef9ff8e",
    "mbpp-cpp": "8be6d0ff0b4f8ace4ed5b2ef802ad28bf5056816b9f8304fe85ad629f12dc8c0",
    "mbpp-csharp": "e3b564e4ad4734d40acc161d532a1f1e645fa784b9eccdc5b3e2b828ee01adc6",
    "mbpp-go": "a01f7ed77245a7a0a7c69efa951ed4bc71add6412f0264787b0a620fca0bb2d3",
    "mbpp-java": "4f34c740317ac2e4044c474770c79657dda7cb9012b342dabd874c9aff0624d4",
    "mbpp-javascript": "8e61b5e28d7afb4565a8e8cdba6c192677d8224e7c2006cf9d59058293e39f3c",
    "mbpp-kotlin": "e8195a026bd85dc0276e33b8b012eb0f527804b6eb1d1ce5b2d887a1f60ae561",
    "mbpp-python": "661e5927bc8309febd40e6cd085ba39a570c5dfa39cf59d9fd770650e3c5b5ce",
    "mbpp-rust": "255788fa79afa72f5cb1169b43e7eb8b56cebc543e082afeeddd07c0bcf23e63",
}
COUNTS = {"humaneval": 161, "mbpp": 855}

# BabelCode's data/language_stop_words.json at d37a231, for our eight languages.
STOP_WORDS = {
    "cpp": ["\n}"],
    "csharp": ["\n    }\n"],
    "go": ["\nfunc", "struct", "\n// "],
    "java": ["\n    }\n"],
    "javascript": ["\nfunction ", "\n/*", "\n//"],
    "kotlin": [],
    "python": ["\ndef", "\n#", "\nif", "\nclass"],
    "rust": ["\n}"],
}
# Its command_fn per language, for a program file __FILENAME__.<ext>, and the timeouts.
COMMANDS = {
    "cpp": ([["g++", "__FILENAME__.cpp", "-o", "main.exe"], ["./main.exe"]], [10, 10]),
    "csharp": (
        [
            [
                "mono-csc",
                "-r:System.Web.dll",
                "-r:System.Web.Extensions.dll",
                "__FILENAME__.cs",
                "-o",
                "main.exe",
            ],
            ["mono", "main.exe"],
        ],
        [10, 10],
    ),
    "go": ([["go", "build", "-o", "main.exe", "__FILENAME__.go"], ["./main.exe"]], [10, 10]),
    "java": ([["java", "__FILENAME__.java"]], [15]),
    "javascript": ([["node", "__FILENAME__.js"]], [10]),
    "kotlin": ([["kotlinc", "-script", "__FILENAME__.kts", "-no-reflect", "-nowarn"]], [30]),
    "python": ([["python", "__FILENAME__.py"]], [10]),
    "rust": (
        [["rustc", "__FILENAME__.rs", "-o", "./__FILENAME__.exe"], ["./__FILENAME__.exe"]],
        [10, 10],
    ),
}

# A loaded CI machine can need longer than BabelCode's 10 s to compile; a timeout would not be a
# verdict on the program, so the execution tests scale the limits.
TIMEOUT_SCALE = float(os.environ.get("CODEGEMMA_BABELCODE_TIMEOUT_SCALE", "6"))


def available(language: str) -> bool:
    return bc.toolchain_status([language])[0].available


def needs(language: str):
    status = bc.toolchain_status([language])[0]
    return pytest.mark.skipif(
        not status.available,
        reason=f"{language} toolchain missing ({', '.join(status.missing)}): {status.install}",
    )


def run_code(problem: bc.BabelCodeProblem, code: str, tmp_path: Path) -> bc.Verdict:
    program = bc.assemble(problem, code)
    result = bc.run_program_unsandboxed(
        problem.spec, program, tmp_path, timeout_scale=TIMEOUT_SCALE
    )
    return bc.verdict(result, problem.test_case_ids)


# -- the data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(COUNTS))
@pytest.mark.parametrize("language", bc.LANGUAGES)
def test_exported_sets_match_the_generator_output(dataset, language, tmp_path):
    problems = bc.load_babelcode(dataset, language)
    assert len(problems) == COUNTS[dataset]
    out = bc.export_jsonl(problems, tmp_path / "set.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert bc.rows_sha256(rows) == RECORDED_SHA256[f"{dataset}-{language}"]
    assert len({p.qid for p in problems}) == len(problems)
    assert {p.row["language"] for p in problems} == {bc.BABELCODE_NAMES[language]}


def test_manifest_records_the_same_counts_and_hashes():
    manifest = json.loads((bc.DATA_DIR / "manifest.json").read_text())
    assert manifest["source"] == "google-research/babelcode"
    assert manifest["commit"] == "d37a231"
    assert {k: v["sha256"] for k, v in manifest["sets"].items()} == RECORDED_SHA256
    assert {k: v["problems"] for k, v in manifest["sets"].items()} == {
        k: COUNTS[k.split("-")[0]] for k in RECORDED_SHA256
    }


def test_data_files_are_deterministic_gzip():
    for path in sorted(bc.DATA_DIR.glob("*.jsonl.gz")):
        head = path.read_bytes()[:10]
        assert head[4:8] == b"\0\0\0\0", f"{path.name}: gzip mtime is not 0"
        with gzip.open(path, "rt") as f:
            first = f.readline()
        assert first == bc.canonical_jsonl([json.loads(first)]), path.name


@pytest.mark.skipif(
    not os.environ.get("BABELCODE_PROBLEM_CODE"),
    reason="set BABELCODE_PROBLEM_CODE to BabelCode's data/problem_code directory to compare "
    "row by row with its generator's files",
)
@pytest.mark.parametrize("dataset", sorted(COUNTS))
def test_rows_equal_the_generator_files_key_by_key(dataset):
    root = Path(os.environ["BABELCODE_PROBLEM_CODE"]) / bc.DATASETS[dataset]
    read = lambda name: [json.loads(x) for x in (root / name).read_text().splitlines()]  # noqa: E731
    prompts = {(r["language"], r["qid"]): r for r in read("prompt_info.jsonl")}
    codes = {(r["language"], r["qid"]): r for r in read("testing_code.jsonl")}
    for language in bc.LANGUAGES:
        for p in bc.load_babelcode(dataset, language):
            key = (bc.BABELCODE_NAMES[language], p.qid)
            for k, v in p.row.items():
                assert v == (prompts[key][k] if k in prompts[key] else codes[key][k]), (key, k)
            assert set(p.row) == set(prompts[key]) | set(codes[key])


def test_tasksets_name_all_sixteen_sets():
    sets = bc.babelcode_tasksets()
    assert sorted(sets) == sorted(
        f"bc-{d}-{lang}" for d in ("humaneval", "mbpp") for lang in bc.LANGUAGES
    )
    rust = sets["bc-humaneval-rust"](None, 3)
    assert [p.task_id for p in rust] == [f"bc-humaneval-rust/{q}" for q in ("0", "1", "2")]
    assert len(sets["bc-mbpp-kotlin"](None, None)) == 855


def test_unknown_language_or_dataset_is_an_eval_error():
    with pytest.raises(EvalError, match="unknown BabelCode language"):
        bc.load_babelcode("humaneval", "cobol")
    with pytest.raises(EvalError, match="unknown BabelCode dataset"):
        bc.load_babelcode("apps", "cpp")


def test_a_set_of_another_language_is_refused(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(bc.set_path("humaneval", "go").read_bytes())
    with pytest.raises(EvalError, match="not Rust problems"):
        bc.load_babelcode("humaneval", "rust", data=path)


# -- prompts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", bc.LANGUAGES)
def test_prompt_is_the_signature_with_docstring_and_examples_go_in_the_docstring(language):
    problem = bc.by_qid(bc.load_babelcode("humaneval", language))["53"]  # add(x, y)
    assert problem.prompt() == problem.row["signature_with_docstring"]
    plain = problem.prompt().split("\n")
    extended = problem.prompt(with_examples=True).split("\n")
    assert len(extended) - len(plain) == 2 * len(problem.row["test_list"])
    assert f">>> {problem.entry_fn_name}(0, 1)" in "\n".join(extended)
    if language == "python":
        assert extended[-1].strip() == '"""' and extended[0] == plain[0]
    else:
        assert extended[-1] == plain[-1]  # the signature line still ends the prompt


def test_examples_use_the_argument_order_and_python_literals():
    problem = bc.by_qid(bc.load_babelcode("mbpp", "java"))["4"]
    lines = problem.example_lines()
    assert lines[:2] == [
        ">>> heapQueueLargest([25, 35, 22, 85, 14, 65, 75, 22, 58], 3)",
        "[85, 75, 65]",
    ]
    text = problem.prompt(with_examples=True)
    assert "     * >>> heapQueueLargest([25, 35, 22, 85, 14, 65, 75, 22, 58], 2)\n" in text


# -- post-processing, assembly, run specs --------------------------------------------------------


def test_stop_words_and_commands_are_babelcodes():
    specs = bc.language_specs()
    assert {k: list(s.stop_words) for k, s in specs.items()} == STOP_WORDS
    for lang, (commands, timeouts) in COMMANDS.items():
        assert [list(c) for c in specs[lang].commands] == commands, lang
        assert list(specs[lang].timeouts) == timeouts, lang
    assert specs["rust"].commands_for("p")[1].argv == ("./p.exe",)
    assert specs["java"].file_name() == "main.java"


@pytest.mark.parametrize(
    ("language", "completion", "expected"),
    [
        ("cpp", "\n  return x + y;\n}\n\nint main() {}", "\n  return x + y;\n}"),
        ("rust", "\n    x + y\n}\nfn main() {}\n", "\n    x + y\n}"),
        ("java", "\n        return x;\n    }\n}\nclass B {}", "\n        return x;\n    }\n}"),
        ("csharp", "\n        return x;\n    }\n\n    int F() {", "\n        return x;\n    }\n}"),
        ("go", "\n\treturn x + y\n}\n\nfunc main() {}", "\n\treturn x + y\n}\n"),
        ("go", "\n\ttype structure int\n", "\n\ttype "),  # BabelCode's bare "struct"
        ("javascript", "\n  return x;\n}\n// tests\n", "\n  return x;\n}"),
        ("python", "\n    return x\n\n\nif __name__ == '__main__':", "\n    return x\n\n"),
        ("kotlin", "\n    return x\n}\n\nfun main() {}\n", "\n    return x\n}\n\nfun main() {}\n"),
        ("cpp", "\n  return x + y;", "\n  return x + y;"),  # no stop word: left as it is
    ],
)
def test_postprocess_cuts_at_the_first_stop_word_and_closes(language, completion, expected):
    assert bc.postprocess(language, completion) == expected


def test_assembly_replaces_the_placeholders_as_babelcode_does():
    problem = bc.by_qid(bc.load_babelcode("humaneval", "java"))["53"]
    program = bc.program_for_completion(problem, "\n        return x + y;\n    }\n}\n")
    assert "PLACEHOLDER" not in program
    assert "Solution sol = new Solution();" in program
    assert "sol.add(x, y)" in program
    assert program.endswith(problem.prompt() + "\n        return x + y;\n    }\n}")


# -- verdicts ------------------------------------------------------------------------------------


def result(stdout: str, returncode: int | None = 0, timed_out: bool = False) -> bc.RunResult:
    return bc.RunResult(returncode, stdout, "", timed_out, 0, (0.1,))


@pytest.mark.parametrize(
    ("run", "outcome", "tests"),
    [
        (result("TEST-0...PASSED\nTEST-1...PASSED\n"), "Passed", ["PASSED", "PASSED"]),
        (result("TEST-0...PASSED\nTEST-1...FAILED\n"), "Failed Tests", ["PASSED", "FAILED"]),
        (
            result("TEST-0...PASSED\nTEST-1...IndexError\n"),
            "Had Runtime Error",
            ["PASSED", "IndexError"],
        ),
        (result("TEST-0...PASSED\n"), "Had Error", ["PASSED", "MISSING"]),
        (
            result("TEST-0...PASSED\nTEST-1...PASSED\n", returncode=1),
            "Had Error",
            ["PASSED", "PASSED"],
        ),
        (result(""), "Had Error", ["MISSING", "MISSING"]),
        (result("", returncode=None, timed_out=True), "Timed Out", ["MISSING", "MISSING"]),
        (
            result("noise TEST-0...PASSED\nTEST-1...PASSED\nTEST-0...FAILED\nTEST-7...PASSED\n"),
            "Failed Tests",
            ["FAILED", "PASSED"],
        ),
    ],
)
def test_verdict_follows_babelcodes_outcome_rule(run, outcome, tests):
    v = bc.verdict(run, ["0", "1"])
    assert v.outcome == outcome
    assert list(v.test_results.values()) == tests
    assert v.passed == (outcome == "Passed")


def test_parse_test_results_reads_the_templates_line_format():
    stdout = "TEST-0...PASSED\r\nTEST-10...System.IndexOutOfRangeException\nTEST-1...FAILED"
    assert bc.parse_test_results(stdout, ["0", "1", "10", "2"]) == {
        "0": "PASSED\r",  # as BabelCode's regex reads it: its harness would not pass this line
        "1": "FAILED",
        "10": "System.IndexOutOfRangeException",
        "2": "MISSING",
    }


# -- toolchains ----------------------------------------------------------------------------------


def test_toolchain_status_lists_every_language(monkeypatch):
    statuses = bc.toolchain_status()
    assert [s.language for s in statuses] == list(bc.LANGUAGES)
    assert {s.language: s.tools for s in statuses}["csharp"] == ("mono-csc", "mono")
    for s in statuses:
        assert bool(s.install) == (not s.available)
        assert bool(s.version) == s.available or s.language == "kotlin"
    monkeypatch.setenv("PATH", "")
    gone = bc.toolchain_status(["go", "kotlin"])
    assert [s.missing for s in gone] == [("go",), ("kotlinc",)]
    assert "golang-go" in gone[0].install and "kotlin-compiler@1.7.22" in gone[1].install
    with pytest.raises(EvalError, match="go needs go") as err:
        bc.require_toolchains(["go"])
    assert "apt-get install -y golang-go" in err.value.fix


# -- execution: hand-written completions and BabelCode's stubs -----------------------------------

ADD = {  # HumanEval/53, add(x, y): a right body and junk after the language's stop word
    "cpp": "\n    return x + y;\n}\n\nint main() { return 1; }\n",
    "csharp": "\n        return x + y;\n    }\n}\n\nclass Junk {}\n",
    "go": "\n\treturn x + y\n}\n\nfunc main() {}\n",
    "java": "\n        return x + y;\n    }\n}\nclass Junk {}\n",
    "javascript": "\n  return x + y;\n}\n\nfunction add(x, y) { return 0; }\n",
    "kotlin": "\n    return x + y\n}\n",
    "python": "\n    return x + y\n\n\ndef add(x, y):\n    return 0\n",
    "rust": "\n    x + y\n}\n\nfn main() {}\n",
}


# Every `kotlinc -script` run starts a JVM compiler (10-40 s on two cores): Kotlin's execution
# tests run with the slow suite.
EXECUTED = [pytest.param(x, marks=pytest.mark.slow) if x == "kotlin" else x for x in bc.LANGUAGES]


@pytest.mark.parametrize("language", EXECUTED)
def test_a_right_completion_passes_and_a_wrong_one_fails(language, tmp_path):
    if not available(language):
        pytest.skip(f"{language} toolchain missing: {bc.toolchain_status([language])[0].install}")
    problem = bc.by_qid(bc.load_babelcode("humaneval", language))["53"]
    for completion, outcome in (
        (ADD[language], "Passed"),
        (ADD[language].replace("+", "-", 1), "Failed Tests"),
    ):
        program = bc.program_for_completion(problem, completion)
        run = bc.run_program_unsandboxed(
            problem.spec, program, tmp_path / outcome[0], timeout_scale=TIMEOUT_SCALE
        )
        v = bc.verdict(run, problem.test_case_ids)
        assert v.outcome == outcome, (run.stdout[-500:], run.stderr[-1500:])


def test_a_program_that_does_not_compile_had_an_error(tmp_path):
    if not available("cpp"):
        pytest.skip("g++ missing")
    problem = bc.load_babelcode("humaneval", "cpp")[0]
    v = run_code(problem, problem.prompt() + "\n  return undefined_name;\n}", tmp_path)
    assert v.outcome == "Had Error" and set(v.test_results.values()) == {"MISSING"}


def test_a_hanging_program_times_out_and_is_killed(tmp_path):
    problem = bc.load_babelcode("humaneval", "python")[0]
    spec = bc.LanguageSpec(**{**problem.spec.__dict__, "timeouts": (0.5,)})
    code = problem.prompt() + "\n    import time\n    time.sleep(60)\n"
    run = bc.run_program_unsandboxed(spec, bc.assemble(problem, code), tmp_path)
    assert run.timed_out and bc.verdict(run, problem.test_case_ids).outcome == "Timed Out"
    assert run.durations_s[0] < 10
