"""Write MODEL_CARD.md of the bundled model from the files its recipe produced: measured facts only.

Reads the corpus record (scripts/stdlib_corpus.py: SOURCES.json, and LICENSES.json when
packages were staged too, whose table of packages, versions and licences the card includes), the data manifest (`codegemma data prepare`),
the training run (metrics.jsonl, run config), the exported model directory and the evaluation run
directories (`codegemma eval run`), and renders the card. Nothing in the card is typed by hand
except prose, so rerunning `make model` rewrites every number.

    python scripts/model_card.py --corpus build/corpus --data build/model/data \
        --run build/model/run --model src/codegemma/assets/codegemma-tiny \
        --eval build/model/eval/* --out src/codegemma/assets/codegemma-tiny/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from codegemma.config import ModelConfig
from codegemma.eval.report import report
from codegemma.fileio import write_text_atomic
from codegemma.train.metrics import read_metrics


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items()))


def model_section(config: ModelConfig) -> str:
    return _table(
        [
            ("architecture", f"Gemma 1 decoder (CodeGemma), {config.attention_kind}"),
            (
                "layers / hidden / GeGLU width",
                f"{config.num_hidden_layers} / {config.hidden_size} / {config.intermediate_size}",
            ),
            (
                "attention heads / kv heads / head dim",
                f"{config.num_attention_heads} / {config.num_key_value_heads} / {config.head_dim}",
            ),
            ("vocabulary", f"{config.vocab_size:,} (byte-fallback BPE, Gemma's special-token ids)"),
            ("context", f"{config.max_position_embeddings:,} positions"),
            (
                "parameters",
                f"{config.num_parameters:,} ({config.num_non_embedding_parameters:,} "
                "non-embedding; embeddings tied)",
            ),
            ("weights", config.torch_dtype),
        ]
    )


def fim_row(manifest: dict) -> str:
    """The FIM line of the data table, in the unit FIM was applied to (rows or files)."""
    s = manifest["stats"]
    fim = s["fim"]
    splits = (
        f"splits: syntax {fim.get('split_syntax', 0):,}, character {fim.get('split_char', 0):,}"
    )
    if manifest.get("fim_level", "document") == "context":
        head = (
            f"context level: {fim['fim'] / fim['rows']:.1%} of rows FIM'd (PSM {fim['psm']:,}, "
            f"SPM {fim['spm']:,}, plain {fim['plain']:,})"
        )
    else:
        head = (
            f"document level: {fim['fim'] / fim['files']:.1%} of files FIM'd (PSM "
            f"{fim['psm']:,}, SPM {fim['spm']:,}, plain {fim['plain']:,})"
        )
    rows = s.get("rows", {})
    whole = ""
    if rows:
        per_million = 1e6 * rows.get("fim_examples", 0) / manifest["num_tokens"]
        whole = (
            f"; {rows.get('fim_examples', 0):,} whole FIM examples in rows "
            f"({per_million:,.0f} per million tokens)"
        )
    return f"{head}; {splits}{whole}"


def sources_row(corpus: dict, licences: dict | None) -> str:
    text = f"{corpus['source']}, CPython {corpus['python']}"
    if licences:
        t = licences["totals"]
        text += (
            f"; and {t['packages']} permissively licensed packages installed with it "
            f"({t['files']['train']:,} training files, {t['bytes']['train'] / 1e6:.1f} MB; "
            "see Package licences)"
        )
    return text


def licence_section(licences: dict | None) -> str:
    """Every package in the corpus with its version and licence, then what was left out."""
    if not licences:
        return "Only the CPython standard library (PSF licence) was used."
    rows = [
        "| package | version | licence (as declared) | files | bytes |",
        "|---|---|---|---:|---:|",
    ]
    for p in licences["packages"]:
        files = p["files"]["train"] + p["files"]["heldout"]
        size = p["bytes"]["train"] + p["bytes"]["heldout"]
        declared = p["licence"].replace("|", "/").replace("\n", " ")[:60]
        rows.append(f"| {p['name']} | {p['version']} | {declared} | {files:,} | {size:,} |")
    left_out = ", ".join(f"{x['name']} ({x['reason']})" for x in licences["excluded"])
    return (
        "Packages whose metadata declares only MIT, BSD, Apache-2.0, PSF or ISC licences "
        "(scripts/package_corpus.py; tests and vendored code left out). Recorded in "
        "`LICENSES.json` beside the corpus.\n\n"
        + "\n".join(rows)
        + f"\n\nLeft out: {left_out or 'none'}."
    )


def data_section(corpus: dict, manifest: dict, licences: dict | None = None) -> str:
    s = manifest["stats"]
    return _table(
        [
            ("source", sources_row(corpus, licences)),
            ("licence", corpus["licence"] + ("; packages: see below" if licences else "")),
            (
                "files",
                f"{corpus['files']['train']:,} training ({corpus['bytes']['train'] / 1e6:.1f} MB), "
                f"{corpus['files']['heldout']:,} held out ({corpus['bytes']['heldout'] / 1e6:.1f} MB); "
                f"file list sha256 {corpus['file_list_sha256'][:16]}…",
            ),
            ("read", _counts(s["sources"])),
            ("quality filters", _counts(s["filters"])),
            ("deduplication", _counts(s["dedup"])),
            ("PII redacted", _counts(s["pii"])),
            ("decontamination (HumanEval)", _counts(s["decontaminate"])),
            ("repository packing", _counts(s["packing"])),
            ("FIM", fim_row(manifest)),
            (
                "tokens",
                f"{manifest['num_tokens']:,} in {manifest['num_sequences']:,} rows of "
                f"{manifest['seq_len']}",
            ),
        ]
    )


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def training_section(runs: list[Path]) -> str:
    """One table per training stage (each a `codegemma train` run, the later ones continuing from
    the model the one before exported), then the total wall time."""
    if len(runs) == 1:
        return stage_table(runs[0])
    parts = [f"### Stage {k} (`{run}`)\n\n{stage_table(run)}" for k, run in enumerate(runs, 1)]
    minutes = (
        sum(
            [m for m in read_metrics(r / "metrics.jsonl") if "elapsed_s" in m][-1]["elapsed_s"]
            for r in runs
        )
        / 60
    )
    return "\n\n".join(parts) + f"\n\nBoth stages together: {minutes:.1f} min of training."


def stage_table(run: Path) -> str:
    metrics = read_metrics(run / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    cfg = next((m["config"] for m in metrics if "config" in m), {})
    last = train[-1]
    rows = [
        (
            "hardware",
            f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        ),
        (
            "recipe",
            f"batch {cfg.get('micro_batch_size')} x {cfg.get('grad_accum')} rows, AdamW lr "
            f"{cfg.get('lr')} (warmup {cfg.get('warmup_steps')}, cosine to "
            f"{cfg.get('min_lr_ratio')} of it), weight decay {cfg.get('weight_decay')}, "
            f"clip {cfg.get('grad_clip')}, {cfg.get('precision')}, seed {cfg.get('seed')}",
        ),
        ("data", f"`{cfg.get('data')}`, from {cfg.get('init_from') or 'a random init'}"),
        ("optimizer steps", f"{last['step']:,}"),
        ("tokens trained", f"{last['tokens']:,}"),
        ("wall time", f"{last['elapsed_s'] / 60:.1f} min"),
        (
            "throughput",
            f"{last['tokens_per_s']:,.0f} tokens/s (last interval), MFU {last['mfu']:.1%}",
        ),
        ("training loss (first → last logged)", f"{train[0]['loss']:.3f} → {last['loss']:.3f}"),
    ]
    if evals:
        rows.append(
            (
                "held-out loss (first → last)",
                f"{evals[0]['eval_loss']:.3f} → {evals[-1]['eval_loss']:.3f}",
            )
        )
    return _table(rows)


def docstring_share(eval_dirs: list[Path]) -> str:
    """Share of single-line infilling middles that open a docstring (a measured symptom)."""
    for d in eval_dirs:
        path = Path(d) / "summary.json"  # (lm-eval's directories hold results.json instead)
        if path.is_file() and json.loads(path.read_text())["taskset"] == "humaneval-single-line":
            rows = [json.loads(ln) for ln in (Path(d) / "samples.jsonl").read_text().splitlines()]
            share = sum(r["raw"].lstrip().startswith('"""') for r in rows) / len(rows)
            return f" ({share:.0%} of its {len(rows):,} single-line infilling middles do)"
    return ""


def limitations_section(manifest: dict, eval_dirs: list[Path]) -> str:
    fim = manifest["stats"]["fim"]
    if manifest.get("fim_level", "document") == "context":
        rows = manifest["stats"].get("rows", {})
        share = docstring_share(eval_dirs)
        measured = f" Middles may still open a docstring{share}." if share else ""
        return f"""FIM is applied per training row (context level, as in the FIM paper), so the
{manifest["num_tokens"]:,} tokens hold {rows.get("fim_examples", fim["fim"]):,} whole FIM examples ({fim["psm"]:,} PSM, {fim["spm"]:,} SPM),
each with its prefix, suffix and middle in one row.{measured} The model is tiny and trained briefly:
more tokens and a larger model are what it lacks; official CodeGemma weights need none of this."""
    return f"""FIM is applied once per file, as the recipe says, so this small corpus gives only
{fim["fim"]:,} FIM examples ({fim["psm"]:,} PSM, {fim["spm"]:,} SPM) among {manifest["num_tokens"]:,}
tokens: far too few for an 8M-parameter model to learn the sentinels well. Given a PSM prompt it
tends to start a docstring{docstring_share(eval_dirs)}, while SPM prompts, whose middle continues the
prefix, give code-shaped single lines (`codegemma complete --fim-mode spm --mode line`, which
`make demo` uses). More FIM (e.g. context-level FIM on packed rows, as in the FIM paper), more
tokens and a larger model are what it lacks; official CodeGemma weights need none of this."""


def sweep_section(path: Path | None, config: ModelConfig) -> str:
    """The scaling sweep (scripts/scaling_sweep.py) that chose the model's shape and vocabulary."""
    if path is None or not path.is_file():
        return "(no sweep result given: `make model-sweep`)"
    result = json.loads(path.read_text())
    rows = [
        "| vocabulary | layers x width | parameters (non-embedding) | tokens | held-out loss "
        "| bits per byte | tokens/s | wall |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        chosen = (
            r["vocab"] == config.vocab_size
            and r["layers"] == config.num_hidden_layers
            and r["hidden"] == config.hidden_size
        )
        mark = " (chosen)" if chosen else ""
        rows.append(
            f"| {r['vocab']:,} | {r['layers']} x {r['hidden']}{mark} | {r['parameters']:,} "
            f"({r['non_embedding_parameters']:,}) | {r['tokens']:,} | {r['eval_loss']:.3f} "
            f"| {r['bits_per_byte']:.3f} | {r['tokens_per_s']:,.0f} | {r['wall_s'] / 60:.1f} min |"
        )
    return (
        f"Each candidate trained from scratch for {result['steps']} steps on the standard "
        "library alone (`make model-sweep`, scripts/scaling_sweep.py), scored in bits per byte "
        "of held-out text so that vocabularies compare.\n\n" + "\n".join(rows)
    )


ARM_TEXT = {
    "recipe": ("stdlib + packages", "context", "on"),
    "document-fim": ("stdlib + packages", "document", "on"),
    "no-repo-mask": ("stdlib + packages", "context", "off"),
    "stdlib-only": ("stdlib", "context", "on"),
}


def ablation_section(path: Path | None) -> str:
    """The recipe's ablation (scripts/recipe_ablation.py) at one small budget."""
    if path is None or not path.is_file():
        return "(no ablation result given: `make model-ablation`)"
    result = json.loads(path.read_text())
    rows = [
        "| arm | data | FIM level | repository mask | held-out loss | single-line pass@1 |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in result["arms"]:
        data, level, mask = ARM_TEXT.get(r["arm"], ("?", "?", "?"))
        rows.append(
            f"| {r['arm']} | {data} | {level} | {mask} | {r['eval_loss']:.3f} "
            f"| {r['single_line_pass@1']:.2%} ({r['single_line_tasks']} tasks) |"
        )
    steps = result["steps"]
    tokens = result["arms"][0]["tokens"]
    return (
        f"Each arm trained from scratch with this model's shape for {steps} steps ({tokens:,} "
        "tokens; `make model-ablation`, scripts/recipe_ablation.py); held-out loss on the "
        "recipe's held-out set; single-line infilling on every "
        f"{result['every']}th task of the 1033 (PSM, greedy).\n\n" + "\n".join(rows)
    )


def render(args: argparse.Namespace) -> str:
    corpus = json.loads((args.corpus / "SOURCES.json").read_text())
    licence_file = args.corpus / "LICENSES.json"
    licences = json.loads(licence_file.read_text()) if licence_file.is_file() else None
    manifest = json.loads((args.data / "manifest.json").read_text())
    config = ModelConfig.load(args.model)
    evals = report(args.eval) if args.eval else "(no evaluation runs given)"
    sweep = sweep_section(args.sweep, config)
    ablation = ablation_section(args.ablation)
    return f"""# codegemma-tiny: the bundled model

A small model of the CodeGemma architecture, trained by this repository's own pipeline
(`make model`): tokenizer training, `codegemma data prepare` (FIM rate 0.8, PSM/SPM 50-50,
syntax-aware splits, repository-level packing, PII redaction, deduplication, decontamination),
then `codegemma train`. It exists so that every command works on a fresh machine with no download.
It is tiny and trained briefly on one small corpus: expect Python-shaped text, not correct
programs. Every number below was written by `scripts/model_card.py` from the run's own files.

## Model

{model_section(config)}

## Data

{data_section(corpus, manifest, licences)}

### Package licences

{licence_section(licences)}

## Size: a short scaling sweep

{sweep}

## Training

{training_section(args.run)}

The loss curve is `loss.png` beside this card (`codegemma train plot`).

## Ablation

{ablation}

## Limitations

{limitations_section(manifest, args.eval)}

## Evaluation

Our runs of `codegemma eval run` on this model, next to the published CodeGemma numbers
(execution-based, pass@1, greedy).

{evals}

## Reproduce

```bash
make model    # stages the corpus, trains the tokenizer, prepares data, trains, evaluates, writes this card
```
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", type=Path, nargs="+", required=True, help="the training stages' runs")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--eval", nargs="*", default=[])
    p.add_argument("--sweep", type=Path, help="scripts/scaling_sweep.py's result JSON")
    p.add_argument("--ablation", type=Path, help="scripts/recipe_ablation.py's result JSON")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    write_text_atomic(args.out, render(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
