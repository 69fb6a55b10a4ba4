"""`codegemma data prepare | inspect` (registered by codegemma/cli.py).

    codegemma data prepare repo_a repo_b=path/to/b corpus.jsonl --out data/ --tokenizer tok/ \\
        --seq-len 2048 [--fim-rate 0.8] [--engine local|ray] [--workers 8]
    codegemma data inspect data/ --n 3
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="training data: prepare token shards, inspect them")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("prepare", help="sources -> filtered, deduplicated, FIM'd token shards")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="directory, git checkout, .tar/.zip archive or JSONL/Parquet of "
        "{repo, path, content}; NAME=PATH names a repository",
    )
    p.add_argument("--out", required=True, help="output directory (rerun the same to resume)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--fim-rate", type=float, default=None, help="share of files FIM'd (0.8)")
    p.add_argument("--spm-rate", type=float, default=None, help="share of FIM'd files in SPM (0.5)")
    p.add_argument("--syntax-rate", type=float, default=None, help="syntax-aware splits (0.9)")
    p.add_argument("--shards", type=int, default=8, help="output shards (parallel shard jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument("--languages", default=None, help="comma-separated subset, e.g. python,go")
    p.add_argument("--mbpp", default=None, help="MBPP JSONL for decontamination ($CODEGEMMA_MBPP)")
    p.add_argument("--no-dedup", action="store_true")
    p.add_argument("--no-pii", action="store_true")
    p.add_argument("--no-decontam", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=prepare_command)
    i = sub.add_parser("inspect", help="decoded samples and statistics of a prepared directory")
    i.add_argument("dir")
    i.add_argument("--n", type=int, default=3, help="sample sequences to show")
    i.add_argument("--tokenizer", default=None, help="default: the path in the manifest")
    i.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    i.set_defaults(func=inspect_command)


def build_config(args: argparse.Namespace):
    from codegemma.data.decontaminate import DecontamConfig
    from codegemma.data.dedup import DedupConfig
    from codegemma.data.fim import FimConfig
    from codegemma.data.pii import PiiConfig
    from codegemma.data.pipeline import PrepareConfig
    from codegemma.data.sources import SourceConfig

    fim = {
        k: v
        for k, v in (
            ("rate", args.fim_rate),
            ("spm_rate", args.spm_rate),
            ("syntax_rate", args.syntax_rate),
        )
        if v is not None
    }
    sources = SourceConfig()
    if args.languages:
        sources = dataclasses.replace(sources, languages=tuple(args.languages.split(",")))
    return PrepareConfig(
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        num_shards=args.shards,
        seed=args.seed,
        sources=sources,
        fim=FimConfig(**fim),
        dedup=DedupConfig(exact=not args.no_dedup, near=not args.no_dedup),
        pii=PiiConfig(emails=not args.no_pii, ips=not args.no_pii, secrets=not args.no_pii),
        decontam=DecontamConfig(enabled=not args.no_decontam, mbpp_path=args.mbpp),
    )


def prepare_command(args: argparse.Namespace) -> int:
    import os

    from codegemma.data.pipeline import prepare
    from codegemma.data.report import summary

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quiet:
        os.environ["CODEGEMMA_QUIET"] = "1"
    try:
        config = build_config(args)
        manifest = prepare(args.sources, args.out, config, engine=args.engine, workers=args.workers)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary(manifest)))
    print(f"\nwrote {args.out}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    from codegemma.data.report import render
    from codegemma.data.shards import open_shards
    from codegemma.tokenizer import Tokenizer

    try:
        ds = open_shards(args.dir)
        tok = Tokenizer.load(args.tokenizer or ds.manifest["tokenizer"]["path"])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tok.fingerprint != ds.manifest["tokenizer"]["fingerprint"]:
        print(
            "error: this tokenizer is not the one the shards were made with "
            f"({ds.manifest['tokenizer']['fingerprint'][:12]})",
            file=sys.stderr,
        )
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(render(ds, tok, n=args.n, color=color))
    return 0
