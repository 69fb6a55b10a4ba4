"""MBPP (Austin et al. 2021) from the official files, with Google's 3-shot prompt or 0-shot.

The official `mbpp.jsonl` (974 rows, CC BY 4.0) ships in data/mbpp/ and is the default; `--data
PATH` or CODEGEMMA_MBPP picks another file. Accepted: the official `mbpp.jsonl`
(fields text, code, task_id, test_setup_code, test_list, challenge_test_list) and the sanitized
`sanitized-mbpp.json` (a JSON list with prompt, code, task_id, test_imports, test_list).
Split: test tasks 11-510 (those present in the file); shots are tasks 2, 3, 4.
Prompt (the format of the MBPP paper and bigcode-evaluation-harness), per example:

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

    {test_list, one per line}
    [BEGIN]
    {code}
    [DONE]

The query is the same block ending after "[BEGIN]\\n"; generation stops at "[DONE]". The scored
program is the completion, then test_setup_code (tasks 367 and 927 build their inputs from a class
the solution defines), then the asserts of test_list (challenge_test_list is not used, as in the
published practice). The sanitized file is not bundled: pass it with --data.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from codegemma.errors import EvalError
from codegemma.eval.tasks import Task

ENV_VAR = "CODEGEMMA_MBPP"
BUNDLED = Path(__file__).parent / "data" / "mbpp" / "mbpp.jsonl"
SHOT_IDS = (2, 3, 4)
TEST_IDS = range(11, 511)
STOP = ("[DONE]",)
WHERE = (
    "download mbpp.jsonl (or sanitized-mbpp.json) from "
    "https://github.com/google-research/google-research/tree/master/mbpp "
    "and pass --data PATH or set CODEGEMMA_MBPP=PATH"
)


def resolve_path(data: str | os.PathLike | None, *, sanitized: bool = False) -> Path:
    """`data`, else $CODEGEMMA_MBPP, else the bundled mbpp.jsonl (not for the sanitized sets)."""
    raw = data or os.environ.get(ENV_VAR)
    if not raw and not sanitized:
        return BUNDLED
    if not raw:
        raise FileNotFoundError(f"sanitized-mbpp.json is not bundled: {WHERE}")
    path = Path(raw).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MBPP file {path} not found: {WHERE}")
    return path


def read_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise EvalError(f"{path} is neither MBPP JSONL nor a JSON list: {e}") from e
    return [_normalize(row, path) for row in rows]


def _normalize(row: dict, path: Path) -> dict:
    """One schema for both variants: text, code, task_id, setup, tests."""
    text = row.get("text", row.get("prompt"))
    missing = [
        k
        for k, v in (
            ("text/prompt", text),
            ("code", row.get("code")),
            ("task_id", row.get("task_id")),
            ("test_list", row.get("test_list")),
        )
        if v is None
    ]
    if missing:
        raise EvalError(f"{path}: a row lacks {missing}; is this an MBPP file?")
    setup = row.get("test_setup_code")
    if setup is None:
        setup = "\n".join(row.get("test_imports") or [])
    return {
        "task_id": int(row["task_id"]),
        "text": text.strip(),
        "code": row["code"],
        "setup": setup,
        "tests": list(row["test_list"]),
    }


def example_block(row: dict) -> str:
    tests = "\n".join(row["tests"])
    return (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def build_prompt(row: dict, shots: list[dict]) -> str:
    head = "".join(example_block(s) + s["code"].strip() + "\n[DONE]\n" for s in shots)
    return head + example_block(row)


def entry_point(row: dict) -> str:
    """The function the asserts call: the first `def` of the reference code named in them."""
    names = re.findall(r"^def\s+(\w+)", row["code"], flags=re.M)
    tests = "\n".join(row["tests"])
    return next((n for n in names if re.search(rf"\b{n}\s*\(", tests)), names[0] if names else "")


def load_mbpp(
    data: str | os.PathLike | None = None, *, shots: int = 3, sanitized: bool = False
) -> list[Task]:
    if shots not in (0, 3):
        raise ValueError(f"MBPP prompts are 0-shot or 3-shot, got shots={shots}")
    path = resolve_path(data, sanitized=sanitized)
    rows = {r["task_id"]: r for r in read_rows(path)}
    examples = []
    if shots:
        absent = [i for i in SHOT_IDS if i not in rows]
        if absent:
            raise EvalError(
                f"{path} lacks the 3-shot example tasks {absent}; use the full "
                "mbpp.jsonl (or a 0-shot task set)"
            )
        examples = [rows[i] for i in SHOT_IDS]
    test_rows = [rows[i] for i in sorted(rows) if i in TEST_IDS]
    if not test_rows:
        raise EvalError(f"{path} has no task in the MBPP test split (ids 11-510)")
    name = "mbpp-sanitized" if sanitized else "mbpp"
    return [make_task(r, examples, name) for r in test_rows]


def make_task(row: dict, examples: list[dict], name: str = "mbpp") -> Task:
    """The Task of one normalized row (read_rows), with `examples` as its shots."""
    return Task(
        task_id=f"{name}/{row['task_id']}",
        prompt=build_prompt(row, examples),
        canonical_solution=row["code"],
        test="\n".join(row["tests"]) + "\n",
        setup=row["setup"],
        entry_point=entry_point(row),
        kind="mbpp",
    )
