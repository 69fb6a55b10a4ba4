"""A markdown table of our runs next to the published CodeGemma numbers.

Published figures are the CodeGemma model card's and technical report's (arXiv 2406.11409). Their
timing column is total seconds for 128-token continuations with HF transformers, bf16, batch 1, on
one L4 GPU; ours is the measured generation time of the run (its batch size, device and
max_new_tokens are in its summary). A run that covered only part of its task set (`--limit`,
`--every`) shows how many tasks it covered beside its score, never a bare percentage.

BabelCode runs (`bc-humaneval-<lang>`, `bc-mbpp-<lang>`) get a table of their own in the card's
layout: a row per set and language, our runs beside the published 2B / 7B / 7B-IT pass@1.

lm-evaluation-harness runs (`codegemma eval lm-eval --out DIR`, whose DIR holds lm-eval's
results.json) get a table too: a row per benchmark and metric (the card's nine first), a column
per model; a run that evaluated fewer documents than a task has (`--limit`) says how many.

    codegemma eval report runs/single-line runs/multi-line runs/7b-card > table.md
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from codegemma.errors import EvalError
from codegemma.eval.lm_eval_cli import CARD_TASKS

SOURCE = "CodeGemma model card / technical report (arXiv 2406.11409)"
# Infilling pass@1 (%) and seconds for 128-token continuations (single-line, multi-line).
PUBLISHED_INFILLING = {
    "CodeGemma 2B": (78.41, 51.44, 543, 8479),
    "CodeGemma 2B 1.1": (79.28, 50.99, 771, 9372),
    "CodeGemma 7B": (76.09, 58.44, 1505, 22896),
    "CodeGemma 7B-IT": (68.25, 20.05, 8330, 49438),
    "DeepSeek Coder 1.3B": (79.96, 50.95, 990, 13138),
    "StarCoder2 3B": (77.44, 47.65, 3665, 20629),
    "DeepSeek Coder 6.7B": (85.87, 63.20, 1559, 22387),
    "StarCoder2 7B": (81.03, 53.21, 8080, 45459),
}
# Generation pass@1 (%): HumanEval, MBPP.
PUBLISHED_GENERATION = {
    "CodeGemma 2B": (31.1, 43.6),
    "CodeGemma 7B": (44.5, 56.2),
    "CodeGemma 7B-IT": (56.1, 54.2),
}
# BabelCode pass@1 (%), (2B, 7B, 7B-IT), by language: BC HumanEval and BC MBPP.
BABELCODE_MODELS = ("CodeGemma 2B", "CodeGemma 7B", "CodeGemma 7B-IT")
PUBLISHED_BABELCODE = {
    "humaneval": {
        "cpp": (24.2, 32.9, 42.2),
        "csharp": (10.6, 22.4, 26.7),
        "go": (20.5, 21.7, 28.6),
        "java": (29.2, 41.0, 48.4),
        "javascript": (21.7, 39.8, 46.0),
        "kotlin": (28.0, 39.8, 51.6),
        "python": (21.7, 42.2, 48.4),
        "rust": (26.7, 34.1, 36.0),
    },
    "mbpp": {
        "cpp": (47.1, 53.8, 56.7),
        "csharp": (28.7, 32.5, 41.2),
        "go": (45.6, 43.3, 46.2),
        "java": (41.8, 50.3, 57.3),
        "javascript": (45.3, 58.2, 61.4),
        "kotlin": (46.8, 54.7, 59.9),
        "python": (38.6, 59.1, 62.0),
        "rust": (45.3, 52.9, 53.5),
    },
}
COLUMNS = {  # task set -> (published value, published seconds) for one model's row
    "humaneval-single-line": lambda m: _inf(m, 0, 2),
    "humaneval-multi-line": lambda m: _inf(m, 1, 3),
    "humaneval": lambda m: (PUBLISHED_GENERATION.get(m, (None,))[0], None),
    "mbpp": lambda m: (PUBLISHED_GENERATION.get(m, (None, None))[1], None),
}


def _inf(model: str, value: int, seconds: int) -> tuple[float | None, float | None]:
    row = PUBLISHED_INFILLING.get(model)
    return (row[value], row[seconds]) if row else (None, None)


def load_summary(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished `codegemma eval run`?")
    return json.loads(path.read_text(encoding="utf-8"))


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}%"


def _secs(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _score(s: dict) -> str:
    """pass@1 of a run, with the share of its task set it covered when that is not all of it."""
    p1 = s["pass_at_k"].get("pass@1")
    text = _pct(None if p1 is None else 100 * p1)
    size = s.get("set_size")
    if size and s["num_tasks"] < size:
        text += f" ({s['num_tasks']} of {size} tasks)"
    return text


def render(summaries: list[dict]) -> str:
    if not summaries:
        raise EvalError("no runs to report", fix="pass one or more run directories")
    babel = [s for s in summaries if s["taskset"].startswith("bc-")]
    others = [s for s in summaries if not s["taskset"].startswith("bc-")]
    parts = [render_babelcode(babel)] if babel else []
    if others:
        parts.insert(0, _render_table(others))
    return "\n\n".join(parts) + "\n\n" + _notes(summaries) + "\n"


def render_babelcode(summaries: list[dict]) -> str:
    """The card's BabelCode table: a row per (BC HE | BC MBPP, language), our runs' pass@1 (one
    column per model) beside the published 2B / 7B / 7B-IT."""
    models = list(dict.fromkeys(s["model"] for s in summaries))
    runs = {(s["taskset"], s["model"]): s for s in summaries}
    head = ["set", "language", *(f"{m} (ours)" for m in models)]
    head += [f"{m} (published)" for m in BABELCODE_MODELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset, label in (("humaneval", "BC HE"), ("mbpp", "BC MBPP")):
        for lang, published in PUBLISHED_BABELCODE[dataset].items():
            name = f"bc-{dataset}-{lang}"
            ours = [_score(runs[name, m]) if (name, m) in runs else "—" for m in models]
            lines.append(
                "| " + " | ".join([label, lang, *ours, *(_pct(v) for v in published)]) + " |"
            )
    return "\n".join(lines)


def _render_table(summaries: list[dict]) -> str:
    tasksets = list(dict.fromkeys(s["taskset"] for s in summaries))
    head = ["model"]
    for t in tasksets:
        head += [f"{t} pass@1", f"{t} seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours: dict[str, dict[str, dict]] = {}
    for s in summaries:
        ours.setdefault(s["model"], {})[s["taskset"]] = s
    for model, runs in ours.items():
        cells = [f"{model} (ours)"]
        for t in tasksets:
            s = runs.get(t)
            cells += [
                _score(s) if s else "—",
                _secs(s.get("generation_seconds") or None) if s else "—",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    for model in dict.fromkeys([*PUBLISHED_INFILLING, *PUBLISHED_GENERATION]):
        cells, any_value = [f"{model} (published)"], False
        for t in tasksets:
            value, seconds = COLUMNS[t](model) if t in COLUMNS else (None, None)
            any_value |= value is not None
            cells += [_pct(value), _secs(seconds)]
        if any_value:
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(summaries: list[dict]) -> str:
    notes = [
        f"Published: {SOURCE}; seconds = total for 128-token continuations, HF transformers, "
        "bf16, batch 1, one L4 GPU. Ours: measured generation seconds of each run."
    ]
    for s in summaries:
        cfg = s.get("config", {})
        iso = (
            s["isolation"]
            if isinstance(s["isolation"], str)
            else "mixed: " + ", ".join(s["isolation"])
        )
        ks = ", ".join(f"{k} {100 * v:.2f}%" for k, v in s["pass_at_k"].items())
        how = (
            f"max_new_tokens {cfg['max_new_tokens']}, batch {cfg['batch_size']}, "
            f"temperature {cfg['temperature']}"
            if cfg
            else "scored from a samples file"
        )
        if cfg.get("every", 1) > 1:
            how += f"; a subset: every {cfg['every']}th task of the set"
        if s.get("set_size") and s["num_tasks"] < s["set_size"]:
            how += f"; PARTIAL: {s['num_tasks']} of the set's {s['set_size']} tasks"
        if s.get("truncated_prompts"):
            how += f"; {s['truncated_prompts']} prompt(s) cut from the left to fit the context"
        notes.append(
            f"- {s['model']} on {s['taskset']}: {s['num_tasks']} tasks, "
            f"{s['samples_per_task']} sample(s)/task ({ks}); {how}; "
            f"sandbox isolation {iso}."
        )
    return "\n".join(notes)


# -- lm-evaluation-harness runs ---------------------------------------------------------------

# metrics shown, as lm-eval names them; the first three are shares, shown as percentages
LM_EVAL_METRICS = (
    "acc",
    "acc_norm",
    "exact_match",
    "math_verify",
    "word_perplexity",
    "byte_perplexity",
    "bits_per_byte",
)
SHARES = {"acc", "acc_norm", "exact_match", "math_verify"}


def load_lm_eval(run_dir: str | os.PathLike) -> dict:
    """lm-eval's results.json of a `codegemma eval lm-eval --out` directory."""
    path = Path(run_dir) / "results.json"
    results = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(results, dict) or "results" not in results or "n-samples" not in results:
        raise EvalError(
            f"{path} is not lm-eval's results file (no 'results' / 'n-samples')",
            fix="pass a directory written by `codegemma eval lm-eval --out DIR`",
        )
    return results


def _lm_model(results: dict) -> str:
    path = (results.get("config") or {}).get("model_path")
    return Path(path).name if path and path != "None" else "codegemma"


def _leaf_docs(results: dict, task: str) -> tuple[int, int]:
    """(documents evaluated, documents the task has) of a task or, summed, a group's leaves."""
    if task in results["n-samples"]:
        n = results["n-samples"][task]
        return n["effective"], n["original"]
    done = total = 0
    for sub in results.get("group_subtasks", {}).get(task, []):
        d, t = _leaf_docs(results, sub)
        done, total = done + d, total + t
    return done, total


def _top_level(results: dict) -> list[str]:
    """Tasks and groups that are not a subtask of another group, the card's first."""
    inner = {s for subs in results.get("group_subtasks", {}).values() for s in subs}
    names = [n for n in results["results"] if n not in inner]
    card = list(CARD_TASKS)
    return sorted(names, key=lambda n: (card.index(n) if n in card else len(card), names.index(n)))


def _lm_cell(results: dict, task: str, key: str) -> str:
    value = results["results"].get(task, {}).get(key)
    if not isinstance(value, int | float):
        return "—"
    metric = key.split(",")[0]
    text = f"{100 * value:.2f}%" if metric in SHARES else f"{value:.4f}"
    done, total = _leaf_docs(results, task)
    return text + (f" ({done} of {total} docs)" if done < total else "")


def render_lm_eval(runs: list[dict]) -> str:
    """A row per (benchmark, metric[, filter]), a column per run's model; notes on shots and
    on every partial run."""
    models = [_lm_model(r) for r in runs]
    tasks = list(dict.fromkeys(t for r in runs for t in _top_level(r)))
    head = ["benchmark", "metric", *(f"{m} (ours)" for m in models)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        keys = [
            key
            for key in dict.fromkeys(k for r in runs for k in r["results"].get(task, {}))
            if "," in key and key.split(",")[0] in LM_EVAL_METRICS
        ]
        for key in keys:
            metric, filt = key.split(",", 1)
            label = metric if filt == "none" else f"{metric} ({filt})"
            cells = [task, label, *(_lm_cell(r, task, key) for r in runs)]
            lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for model, r in zip(models, runs, strict=True):
        shots = ", ".join(f"{t} {r.get('n-shot', {}).get(t, '?')}" for t in _top_level(r))
        partial = [f"{t} {d} of {n}" for t in _top_level(r) for d, n in [_leaf_docs(r, t)] if d < n]
        note = f"- {model}, lm-eval {r.get('lm_eval_version', '?')}: shots {shots}"
        if partial:
            note += f"; PARTIAL (--limit): {', '.join(partial)} documents"
        notes.append(note + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def report(run_dirs: list[str | os.PathLike]) -> str:
    """Coding runs (summary.json) and lm-eval runs (results.json), each kind in its tables."""
    coding, lm = [], []
    for d in run_dirs:
        if not (Path(d) / "summary.json").is_file() and (Path(d) / "results.json").is_file():
            lm.append(load_lm_eval(d))
        else:
            coding.append(load_summary(d))
    parts = [render(coding).rstrip("\n")] if coding else []
    if lm:
        parts.append(render_lm_eval(lm))
    if not parts:
        raise EvalError("no runs to report", fix="pass one or more run directories")
    return "\n\n".join(parts) + "\n"
