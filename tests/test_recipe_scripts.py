"""scripts/model_card.py's sweep and ablation sections, from the JSON that scripts/scaling_sweep.py
and scripts/recipe_ablation.py write: every run appears, the chosen shape is marked, and a
missing result says which make target writes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

pytest.importorskip("torch")
import model_card  # noqa: E402

from codegemma.config import ModelConfig  # noqa: E402


def _run(vocab: int, layers: int, hidden: int, loss: float) -> dict:
    return {
        "name": f"v{vocab}-{layers}x{hidden}",
        "vocab": vocab,
        "layers": layers,
        "hidden": hidden,
        "parameters": 1_000_000 * layers,
        "non_embedding_parameters": 500_000 * layers,
        "steps": 80,
        "tokens": 655_360,
        "eval_loss": loss,
        "tokens_per_s": 3_000.0,
        "wall_s": 240.0,
        "bytes_per_token": 3.5,
        "bits_per_byte": loss / 0.693 / 3.5,
    }


def test_sweep_section_lists_runs_and_marks_the_chosen_shape(tmp_path) -> None:
    runs = [_run(8192, 6, 256, 4.1), _run(8192, 4, 192, 4.3), _run(4096, 6, 256, 3.9)]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"steps": 80, "runs": runs}))
    config = ModelConfig.preset("mini", vocab_size=8192, num_hidden_layers=6, hidden_size=256)
    table = model_card.sweep_section(path, config)
    assert "for 80 steps" in table
    assert table.count("(chosen)") == 1
    assert "| 8,192 | 6 x 256 (chosen) |" in table
    assert "| 4,096 | 6 x 256 |" in table and "| 8,192 | 4 x 192 |" in table
    assert f"{runs[1]['bits_per_byte']:.3f}" in table


def test_ablation_section_names_each_arm(tmp_path) -> None:
    arms = [
        {"arm": a, "tokens": 983_040, "eval_loss": loss, "single_line_pass@1": p,
         "single_line_tasks": 207}
        for a, loss, p in [("recipe", 3.2, 0.05), ("document-fim", 3.3, 0.01),
                           ("no-repo-mask", 3.25, 0.04), ("stdlib-only", 3.6, 0.03)]
    ]  # fmt: skip
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps({"steps": 120, "every": 5, "arms": arms}))
    table = model_card.ablation_section(path)
    assert (
        "| document-fim | stdlib + packages | document | on | 3.300 | 1.00% (207 tasks) |" in table
    )
    assert "| no-repo-mask | stdlib + packages | context | off |" in table
    assert "| stdlib-only | stdlib | context | on |" in table
    assert "120 steps (983,040 tokens" in table


def test_missing_results_name_the_target(tmp_path) -> None:
    assert "make model-sweep" in model_card.sweep_section(None, ModelConfig.preset("mini"))
    assert "make model-ablation" in model_card.ablation_section(tmp_path / "absent.json")
