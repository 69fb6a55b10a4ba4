"""`codegemma eval lm-eval`: the card's natural-language and math benchmarks through
lm-evaluation-harness on our engine (eval/lm_harness.py; guide: docs/lm_eval.md).

Kept apart from lm_harness.py so that building the command line never imports lm-eval (slow, an
optional extra, and it switches the Hugging Face libraries offline): the adapter is imported when
the command runs.
"""

from __future__ import annotations

import argparse

from codegemma.errors import EvalError
from codegemma.options import add_model_options, load_options

# The card's nine benchmarks as lm-eval names them, with the shots of the Gemma report's
# evaluation (CodeGemma reports them the same way). MATH is `minerva_math`: the 4-shot Minerva
# prompt and answer normalisation (`hendrycks_math` is the 0-shot original).
CARD_TASKS: dict[str, int] = {
    "boolq": 0,
    "piqa": 0,
    "triviaqa": 5,
    "arc_challenge": 25,
    "hellaswag": 0,
    "mmlu": 5,
    "winogrande": 0,
    "gsm8k": 5,
    "minerva_math": 4,
}
PRESETS: dict[str, dict[str, int]] = {"card": CARD_TASKS}


def register_lm_eval(eval_subparsers) -> None:
    """`codegemma eval lm-eval --model M --tasks card|boolq,piqa,... --out DIR`."""
    p = eval_subparsers.add_parser(
        "lm-eval", help="lm-evaluation-harness tasks (the card's: --tasks card), offline"
    )
    add_model_options(p, dtype="float32")
    p.add_argument(
        "--tasks",
        required=True,
        help=f"comma-separated lm-eval task names, or a preset ({', '.join(PRESETS)}: "
        f"{', '.join(CARD_TASKS)})",
    )
    p.add_argument("--include-path", default=None, help="directory of extra task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots for every task")
    p.add_argument(
        "--limit", type=_limit, default=None, help="first N documents per task (< 1: a share)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default: 8)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_lm_eval)


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from codegemma.eval.lm_harness import run_lm_eval
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        raise EvalError(
            "codegemma eval lm-eval needs lm-evaluation-harness",
            fix="pip install 'codegemma[lm-eval]' (lm-eval[math]==0.4.13)",
        ) from e

    model = args.model
    if args.quantize:  # otherwise the adapter loads it, after checking the tasks' data
        import codegemma

        model = codegemma.load(args.model, **load_options(args))
    run = run_lm_eval(
        model,
        args.tasks,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        out_dir=args.out,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
    )
    print(run.table, end="")
    print(f"-> {run.out_dir}")
    return 0
