"""`codegemma data prepare | inspect` (registered by codegemma/cli.py).

    codegemma data prepare repo_a repo_b=path/to/b corpus.jsonl --out data/ --tokenizer tok/ \\
        --seq-len 2048 [--fim-rate 0.8] [--fim-level context|document] [--engine local|ray]
    codegemma data inspect data/ --n 3

Every setting has one source: the flags of `prepare` that are fields of `PrepareConfig` are
generated from it (`codegemma.options`), and the others (`--shards`, the FIM rates, ...) take
their type, default and the default shown in `--help` from the config dataclass they set; an
unset flag leaves that dataclass's default in place. Errors are raised (`CodegemmaError`), and
`codegemma.cli.main` prints them in the one format.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from codegemma.errors import ShardError, UsageError

# FimConfig fields set by flags named otherwise: flag -> field (help from the field).
FIM_FLAGS = {"--fim-rate": "rate", "--spm-rate": "spm_rate", "--syntax-rate": "syntax_rate"}


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="training data: prepare token shards, inspect them")
    sub = data.add_subparsers(dest="data_command", required=True)
    _add_prepare(sub)
    i = sub.add_parser("inspect", help="decoded samples and statistics of a prepared directory")
    i.add_argument("dir")
    i.add_argument("--n", type=int, default=3, help="sample sequences to show (default: 3)")
    i.add_argument("--tokenizer", default=None, help="default: the path in the manifest")
    i.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    i.set_defaults(func=inspect_command)


def _add_prepare(sub: Any) -> None:
    from codegemma.data.document import LANGUAGES
    from codegemma.data.executors import ENGINES
    from codegemma.data.fim import FimConfig
    from codegemma.data.pipeline import PrepareConfig
    from codegemma.options import add_dataclass_options, add_field_option

    p = sub.add_parser("prepare", help="sources -> filtered, deduplicated, FIM'd token shards")
    p.add_argument(
        "specs",
        nargs="+",
        metavar="SRC",
        help="directory, git checkout, .tar/.zip archive or JSONL/Parquet of "
        "{repo, path, content}; NAME=PATH names a repository",
    )
    p.add_argument("--out", required=True, help="output directory (rerun the same to resume)")
    add_field_option(
        p,
        "--tokenizer",
        PrepareConfig,
        "tokenizer",
        dest="cfg_tokenizer",
        metavar="PATH",
        required=True,
    )
    add_dataclass_options(p, PrepareConfig, exclude=("tokenizer", "num_shards"), dest_prefix="cfg_")
    add_field_option(p, "--shards", PrepareConfig, "num_shards", dest="cfg_num_shards")
    for flag, name in FIM_FLAGS.items():
        add_field_option(p, flag, FimConfig, name, dest=f"fim_{name}")
    # --fim-level, --line-align-rate: the fields' own names, so generated (with their choices)
    own = ("fim_level", "line_align_rate")
    others = [f.name for f in dataclasses.fields(FimConfig) if f.name not in own]
    add_dataclass_options(p, FimConfig, exclude=others, dest_prefix="fim_")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=ENGINES[0],
        help="what runs the jobs: processes here, or Ray (default: %(default)s)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument(
        "--languages",
        default=None,
        help=f"comma-separated subset of {','.join(LANGUAGES)}, e.g. python,go (default: all)",
    )
    p.add_argument(
        "--mbpp",
        default=None,
        help="MBPP JSONL for decontamination (default: $CODEGEMMA_MBPP; skipped when unset)",
    )
    p.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    p.add_argument("--no-pii", action="store_true", help="no email, IP and secret redaction")
    p.add_argument("--no-decontam", action="store_true", help="keep benchmark-contaminated files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=prepare_command)


def build_config(args: argparse.Namespace):
    """The PrepareConfig the flags ask for: each config's defaults, changed only by what was
    given on the command line."""
    from codegemma.data.decontaminate import DecontamConfig
    from codegemma.data.dedup import DedupConfig
    from codegemma.data.fim import FimConfig
    from codegemma.data.pii import PiiConfig
    from codegemma.data.pipeline import PrepareConfig
    from codegemma.data.sources import SourceConfig
    from codegemma.options import dataclass_values

    sources = SourceConfig()
    if args.languages is not None:
        languages = tuple(x.strip() for x in args.languages.split(",") if x.strip())
        sources = dataclasses.replace(sources, languages=languages)
    dedup = DedupConfig(exact=False, near=False) if args.no_dedup else DedupConfig()
    pii = PiiConfig(emails=False, ips=False, secrets=False) if args.no_pii else PiiConfig()
    decontam = DecontamConfig()
    if args.no_decontam:
        decontam = dataclasses.replace(decontam, enabled=False)
    if args.mbpp is not None:
        decontam = dataclasses.replace(decontam, mbpp_path=args.mbpp)
    return PrepareConfig(
        **dataclass_values(args, PrepareConfig, dest_prefix="cfg_"),
        sources=sources,
        fim=FimConfig(**dataclass_values(args, FimConfig, dest_prefix="fim_")),
        dedup=dedup,
        pii=pii,
        decontam=decontam,
    )


def prepare_command(args: argparse.Namespace) -> int:
    import os

    from codegemma.data.pipeline import prepare
    from codegemma.data.report import summary

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quiet:
        os.environ["CODEGEMMA_QUIET"] = "1"
    config = build_config(args)
    manifest = prepare(args.specs, args.out, config, engine=args.engine, workers=args.workers)
    print("\n".join(summary(manifest)))
    print(f"\nwrote {args.out}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    from codegemma.data.report import render
    from codegemma.data.shards import open_shards
    from codegemma.tokenizer import Tokenizer

    if args.n < 0:
        raise UsageError(f"--n must be 0 or more sample sequences, got {args.n}")
    ds = open_shards(args.dir)
    made_with = ds.manifest["tokenizer"]
    path = args.tokenizer or made_with["path"]
    tok = Tokenizer.load(path)
    if tok.fingerprint != made_with["fingerprint"]:
        raise ShardError(
            f"tokenizer {path} (fingerprint {tok.fingerprint[:12]}) is not the one the shards "
            f"in {args.dir} were made with ({made_with['fingerprint'][:12]}, {made_with['path']})",
            fix="pass that tokenizer as --tokenizer, or leave --tokenizer out",
        )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(render(ds, tok, n=args.n, color=color))
    return 0
