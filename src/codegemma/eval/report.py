"""A markdown table of our runs next to the published CodeGemma numbers.

Published figures are copied from shared/reference/codegemma-facts.md, which quotes the CodeGemma
model card and technical report (arXiv 2406.11409). Their timing column is total seconds for
128-token continuations with HF transformers, bf16, batch 1, on one L4 GPU; ours is the measured
generation time of the run (its batch size, device and max_new_tokens are in its summary).

    codegemma eval report runs/single-line runs/multi-line > table.md
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def render(summaries: list[dict]) -> str:
    if not summaries:
        raise ValueError("no runs to report: pass one or more run directories")
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
            p1 = s["pass_at_k"].get("pass@1") if s else None
            cells += [
                _pct(None if p1 is None else 100 * p1),
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
    return "\n".join(lines) + "\n\n" + _notes(summaries) + "\n"


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
        notes.append(
            f"- {s['model']} on {s['taskset']}: {s['num_tasks']} tasks, "
            f"{s['samples_per_task']} sample(s)/task ({ks}); {how}; "
            f"sandbox isolation {iso}."
        )
    return "\n".join(notes)


def report(run_dirs: list[str | os.PathLike]) -> str:
    return render([load_summary(d) for d in run_dirs])
