"""`codegemma eval report`: partial runs are marked, BabelCode gets the card's table; `doctor`."""

from __future__ import annotations

import json

from codegemma.cli import main
from codegemma.eval.report import render


def summary(taskset: str, passed: float, num_tasks: int, set_size: int, model: str = "m") -> dict:
    return {
        "taskset": taskset,
        "model": model,
        "num_tasks": num_tasks,
        "set_size": set_size,
        "samples_per_task": 1,
        "pass_at_k": {"pass@1": passed},
        "isolation": "full",
        "generation_seconds": 1.0,
        "config": {"max_new_tokens": 128, "batch_size": 8, "temperature": 0.0},
    }


def test_a_partial_run_says_how_much_of_its_set_it_covered():
    text = render([summary("humaneval-single-line", 0.0, 40, 1033)])
    assert "0.00% (40 of 1033 tasks)" in text
    assert "PARTIAL: 40 of the set's 1033 tasks" in text
    whole = render([summary("humaneval-single-line", 0.5, 1033, 1033)])
    assert "50.00% |" in whole and "of 1033 tasks" not in whole


def test_babelcode_runs_fill_the_cards_table():
    text = render(
        [
            summary("bc-humaneval-rust", 0.25, 161, 161),
            summary("bc-mbpp-cpp", 0.5, 10, 855),
        ]
    )
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in text.splitlines()}
    assert "25.00%" in rows["BC HE", "rust"] and "26.70%" in rows["BC HE", "rust"]
    assert "50.00% (10 of 855 tasks)" in rows["BC MBPP", "cpp"]
    assert "47.10%" in rows["BC MBPP", "cpp"] and "56.70%" in rows["BC MBPP", "cpp"]
    assert sum(1 for ln in text.splitlines() if ln.startswith("| BC ")) == 16


def test_report_of_run_directories(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary("humaneval", 0.1, 20, 164)))
    assert main(["eval", "report", str(run)]) == 0
    assert "(20 of 164 tasks)" in capsys.readouterr().out
    assert main(["eval", "report", str(tmp_path / "nowhere")]) == 2
    assert "codegemma eval: error:" in capsys.readouterr().err


def test_doctor_names_what_is_missing_and_how_to_install_it(monkeypatch, capsys):
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda t: None if t == "go" else real(t))
    code = main(["eval", "doctor"])
    out = capsys.readouterr().out
    go = next(ln for ln in out.splitlines() if ln.startswith("go "))
    assert code == 1 and "missing go" in go and "golang-go" in go
