"""The recipe's ablation at one small budget: FIM level, repository mask, and the extra packages.

Four arms, each trained from scratch by `codegemma train` with the bundled model's config and
shape for the same number of steps, then scored the same way: held-out loss on one held-out set
(the full recipe's: standard library and packages, context-level FIM) and single-line infilling
pass@1 (`codegemma eval run humaneval-single-line`, PSM, greedy).

| arm | data | FIM | repository mask |
|---|---|---|---|
| recipe | stdlib + packages | context level | on |
| document-level FIM | stdlib + packages | document level | on |
| no repository mask | stdlib + packages | context level | off |
| stdlib only | stdlib | context level | on |

    python scripts/recipe_ablation.py --out build/ablation/result.json --steps 120 \
        --data build/model/data --document-data build/ablation/data-document \
        --stdlib-data build/ablation/data-stdlib --heldout build/model/heldout --every 5

The data directories are prepared beforehand by `codegemma data prepare` (`make model-ablation`
shows the commands). `--every 5` scores every fifth of the 1033 single-line tasks (207), which
keeps the four evaluations to minutes; the result records it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from codegemma.fileio import write_text_atomic
from codegemma.train.run_checkpoint import resume_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "codegemma-tiny.toml"
CG = str(ROOT / ".venv" / "bin" / "codegemma")


def run_arm(name: str, data: Path, heldout: Path, mask: bool, out: Path, args) -> dict:
    run = out / "runs" / name
    cmd = [
        CG, "train", "--config", str(CONFIG), "--run-dir", str(run),
        "--data", str(data), "--eval-data", str(heldout),
        "--max-steps", str(args.steps), "--warmup-steps", str(max(1, args.steps // 20)),
        "--eval-every", str(args.steps), "--eval-batches", str(args.eval_batches),
        "--ckpt-every", str(args.steps), "--keep-checkpoints", "1",
        "--repo-mask" if mask else "--no-repo-mask",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    trains = [r for r in records if "tokens_per_s" in r]
    found = resume_checkpoint(run, set_aside=False)
    if found is None:
        raise SystemExit(f"{run} wrote no checkpoint")
    eval_out = out / "eval" / name
    subprocess.run(
        [CG, "eval", "run", "humaneval-single-line", "--model", str(found.path / "model"),
         "--every", str(args.every), "--batch-size", "32", "--quiet", "--out", str(eval_out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    summary = json.loads((eval_out / "summary.json").read_text())
    return {
        "arm": name,
        "data": str(data),
        "repo_mask": mask,
        "steps": args.steps,
        "tokens": trains[-1]["tokens"],
        "train_loss": trains[-1]["loss"],
        "eval_loss": evals[-1]["eval_loss"],
        "single_line_pass@1": summary["pass_at_k"]["pass@1"],
        "single_line_tasks": summary["num_tasks"],
        "train_s": round(train_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the recipe's prepared shards")
    ap.add_argument("--document-data", type=Path, required=True)
    ap.add_argument("--stdlib-data", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--every", type=int, default=5, help="score every N-th single-line task")
    ap.add_argument("--out", type=Path, required=True, help="result JSON (runs beside it)")
    args = ap.parse_args()

    arms = [
        ("recipe", args.data, True),
        ("document-fim", args.document_data, True),
        ("no-repo-mask", args.data, False),
        ("stdlib-only", args.stdlib_data, True),
    ]
    results = []
    for name, data, mask in arms:
        res = run_arm(name, data, args.heldout, mask, args.out.parent, args)
        results.append(res)
        print(
            f"{name:>20}  eval loss {res['eval_loss']:.3f}  single-line pass@1 "
            f"{res['single_line_pass@1']:.2%} of {res['single_line_tasks']}  {res['train_s']:.0f} s",
            flush=True,
        )
        write_text_atomic(
            args.out,
            json.dumps({"steps": args.steps, "every": args.every, "arms": results}, indent=2)
            + "\n",
        )


if __name__ == "__main__":
    main()
