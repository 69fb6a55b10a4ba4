"""`codegemma train`: run a training job from a TOML config and flags, or plot a run's loss curve.

    codegemma train --config configs/tiny.toml --max-steps 200
    codegemma train --config run.toml --print-config           # the resolved config, as TOML
    codegemma train plot runs/tiny [--out curve.png]
    torchrun --nproc-per-node 8 -m codegemma.train --config run.toml --parallel fsdp

Key choice: `train` is one command whose default action is to train; `plot` is an optional
sub-action (an argparse sub-parser that is not required). So `codegemma train --config x.toml`
trains and `codegemma train plot RUN_DIR` plots, and nothing else is a positional argument:
every setting is a `--flag` generated from TrainConfig (see train/config.py).

Errors are not handled here: `codegemma.cli.main` (which `python -m codegemma.train` runs too, also
under torchrun) prints every CodegemmaError or OSError as `codegemma train: error: ...` and exits
with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from codegemma.errors import CodegemmaError


def register(subparsers: argparse._SubParsersAction) -> None:
    from codegemma.train.config import add_override_flags

    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a model (pretraining on token shards, SFT on chat JSONL)",
        description="Train from a TOML config; every setting can also be given as a flag, which "
        "overrides the file. Launch with torchrun for DDP/FSDP2. `codegemma train plot RUN_DIR` "
        "writes the loss curve of a run.",
    )
    p.add_argument("--config", "-c", help="TOML file of settings (see docs/training.md)")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved settings as TOML and exit"
    )
    add_override_flags(p)
    actions = p.add_subparsers(dest="train_action", metavar="{plot}")
    plot = actions.add_parser("plot", help="write the loss curve of a run as a PNG")
    plot.add_argument("run_dir", help="the run directory (holds metrics.jsonl)")
    plot.add_argument("--out", help="PNG path (default: RUN_DIR/loss.png)")
    p.set_defaults(func=handle, train_action=None)


def handle(args: argparse.Namespace) -> int:
    if args.train_action == "plot":
        return _plot(args)
    from codegemma.train.config import load_train_config, overrides_from_args

    cfg = load_train_config(args.config, overrides_from_args(args))
    if args.print_config:
        sys.stdout.write(cfg.to_toml())
        return 0
    from codegemma.train.trainer import train

    result = train(cfg)
    if result.checkpoint is not None and _is_main():
        summary = {
            "step": result.step,
            "loss": result.loss,
            "eval_loss": result.eval_loss,
            "checkpoint": str(result.checkpoint),
            "resumed_from": result.resumed_from,
        }
        print(json.dumps(summary))
    return 0


def _plot(args: argparse.Namespace) -> int:
    """Errors (no metrics, no matplotlib) go up to `codegemma.cli.main`, which prints them."""
    from codegemma.train.metrics import plot_run

    try:
        print(plot_run(args.run_dir, args.out))
    except ImportError as e:
        raise CodegemmaError(
            f"plotting a run needs matplotlib ({e})", fix="pip install matplotlib"
        ) from e
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
