"""The `codegemma` command line. Thin: parse, call the library, print.

    codegemma complete --prefix 'def add(a, b):\\n    return ' --suffix '\\n'
    codegemma complete --file app.py --line 12 --column 9
    codegemma chat --model path/to/codegemma-7b-it
    codegemma info --model path/to/model

Subsystems add their own commands (`eval`, `data`, `tokenizer`, ...) through a `register(subparsers)`
function in their package; those modules import their heavy dependencies only when run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from codegemma.engine.sampling import SamplingParams
from codegemma.errors import CodegemmaError, UsageError
from codegemma.middle import MODES
from codegemma.options import (
    add_dataclass_options,
    add_model_options,
    dataclass_values,
    load_options,
)
from codegemma.prompts import FimMode

SUBSYSTEMS = (
    "codegemma.train.tokenizer_trainer",
    "codegemma.data.cli",
    "codegemma.eval.cli",
    "codegemma.train.cli",
    "codegemma.server.cli",
    "codegemma.export",
)


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    add_dataclass_options(
        p,
        SamplingParams,
        exclude=("repetition_penalty", "presence_penalty", "frequency_penalty"),
        defaults={"max_new_tokens": max_new_tokens},
    )


def _sampling_options(args: argparse.Namespace) -> dict:
    return dataclass_values(args, SamplingParams)


def _load(args: argparse.Namespace):
    import codegemma

    return codegemma.load(args.model, **load_options(args))


def split_at_cursor(text: str, line: int, column: int) -> tuple[str, str]:
    """(prefix, suffix) of `text` at a 1-based line and column, as editors count them."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise UsageError(f"--line {line} is outside the file (1..{len(lines)})")
    if not 1 <= column <= len(lines[line - 1]) + 1:
        raise UsageError(
            f"--column {column} is outside line {line} (1..{len(lines[line - 1]) + 1})"
        )
    offset = sum(len(ln) + 1 for ln in lines[: line - 1]) + column - 1
    return text[:offset], text[offset:]


def cmd_complete(args: argparse.Namespace) -> int:
    from codegemma.prompts import ContextFile

    path = args.path
    if args.file:
        if args.line is None or args.column is None:
            raise UsageError("--file needs --line and --column (1-based) to place the cursor")
        prefix, suffix = split_at_cursor(
            Path(args.file).read_text(encoding="utf-8"), args.line, args.column
        )
        path = path or args.file
    elif args.prefix is not None:
        prefix, suffix = _unescape(args.prefix), _unescape(args.suffix or "")
    else:
        raise UsageError("give --prefix [--suffix], or --file with --line and --column")
    files = [ContextFile(path=f, text=Path(f).read_text(encoding="utf-8")) for f in args.context]
    cg = _load(args)
    middle = cg.complete(
        prefix,
        suffix,
        path=path,
        files=files,
        mode=args.mode,
        fim_mode=args.fim_mode,
        **_sampling_options(args),
    )
    if args.show:
        bold, reset = ("\033[1;32m", "\033[0m") if sys.stdout.isatty() else ("", "")
        print(f"{prefix}{bold}{middle}{reset}{suffix}")
    else:
        sys.stdout.write(middle + ("\n" if not middle.endswith("\n") else ""))
    return 0


def _unescape(text: str) -> str:
    """Shell-friendly escapes in --prefix/--suffix: \\n, \\t and \\\\."""
    return text.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


def cmd_chat(args: argparse.Namespace) -> int:
    if not args.force:
        _check_chat_model(args.model)
    cg = _load(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = args.message is None
    while True:
        if interactive:
            try:
                text = input("you> ")
            except EOFError:
                return 0
            if not text.strip():
                continue
        else:
            text = args.message
        messages.append({"role": "user", "content": text})
        reply = cg.chat(messages, **_sampling_options(args))
        messages.append({"role": "model", "content": reply})
        print(reply if not interactive else f"model> {reply}")
        if not interactive:
            return 0


def _check_chat_model(model: str | None) -> None:
    """Refuse, before loading anything, a model that was not instruction-tuned for chat."""
    from codegemma.checkpoint import CHAT_MODEL, not_a_chat_model

    problem = not_a_chat_model(model or "the bundled model", _model_path(model))
    if problem:
        raise UsageError(
            f"{problem}; it would continue your message as code, not answer it",
            fix=f"chat with the instruction-tuned model: codegemma chat --model {CHAT_MODEL} "
            "(or pass --force to chat with this one anyway; use `codegemma complete` for code)",
        )


def _model_path(model: str | None) -> Path:
    from codegemma.checkpoint import resolve_model

    return resolve_model(model) if model else _bundled_path()


def cmd_info(args: argparse.Namespace) -> int:
    """What `complete` would load, checked the same way (config against the weights, the
    tokenizer and its FIM tokens, tokenizer against the embedding); a Hugging Face directory
    without reading a weight."""
    from codegemma.checkpoint import (
        check_tokenizer_fits,
        describe,
        load_checkpoint,
        not_a_chat_model,
        validate_model_dir,
    )
    from codegemma.gguf import describe_gguf, is_gguf
    from codegemma.tokenizer import Tokenizer

    path = _model_path(args.model)
    if is_gguf(path):  # tensors are views of the mapped file: building the model reads little
        _, config, tokenizer = load_checkpoint(path, device="cpu")
        checkpoint = describe_gguf(path)
    else:
        config = validate_model_dir(path)
        tokenizer = Tokenizer.load(path)
        check_tokenizer_fits(tokenizer, config, path)
        checkpoint = describe(path)
    info = {
        "path": str(path),
        "attention": config.attention_kind,
        "parameters": config.num_parameters,
        "non_embedding_parameters": config.num_non_embedding_parameters,
        "config": config.to_hf_dict(),
        "checkpoint": checkpoint,
        "tokenizer": {
            "file": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "special_ids": {
                k: v for k, v in dataclasses.asdict(tokenizer.special).items() if v is not None
            },
            "turn_tokens": tokenizer.special.start_of_turn is not None,
        },
    }
    not_chat = not_a_chat_model(args.model or "the bundled model", path)
    info["chat"] = not_chat is None  # an instruction-tuned model (what `codegemma chat` needs)
    if not_chat:
        info["not_chat"] = not_chat
    print(json.dumps(info, indent=2, default=str))
    return 0


def _bundled_path() -> Path:
    from codegemma.api import BUNDLED_MODEL

    return BUNDLED_MODEL


class ArgumentParser(argparse.ArgumentParser):
    """argparse with codegemma's one error format: `<prog>: error: <message>` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  fix: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="codegemma", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (or CODEGEMMA_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("complete", help="fill in the middle between a prefix and a suffix")
    add_model_options(p)
    p.add_argument("--prefix", help="text before the cursor (\\n escapes allowed)")
    p.add_argument("--suffix", help="text after the cursor")
    p.add_argument("--file", help="a source file; the cursor is at --line/--column (1-based)")
    p.add_argument("--line", type=int)
    p.add_argument("--column", type=int)
    p.add_argument("--path", help="the file's path for the prompt header (default: --file)")
    p.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="FILE",
        help="another file of the repository to show the model (repeatable)",
    )
    p.add_argument("--mode", choices=MODES, default="auto", help="auto: line mid-line, else block")
    p.add_argument(
        "--fim-mode",
        choices=[m.value for m in FimMode],
        default=FimMode.PSM.value,
        help="prompt layout: prefix-suffix-middle (CodeGemma's documented) or suffix-prefix-middle",
    )
    p.add_argument("--show", action="store_true", help="print prefix + middle + suffix")
    _sampling_args(p, max_new_tokens=128)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("chat", help="chat with an instruction-tuned model")
    add_model_options(p)
    p.add_argument("--message", help="one message, answered, then exit (default: interactive)")
    p.add_argument("--system", help="folded into the first user turn (Gemma has no system role)")
    p.add_argument(
        "--force",
        action="store_true",
        help="chat even with a model that has no chat template (a pretrained model)",
    )
    _sampling_args(p, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="check a model and show its config, tokenizer and files")
    p.add_argument("--model", "-m", default=None, help="model directory or HF-cache id")
    p.set_defaults(func=cmd_info)

    for name in SUBSYSTEMS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # that subsystem is not part of this installation
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CodegemmaError, OSError) as e:
        if args.debug or os.environ.get("CODEGEMMA_DEBUG"):
            raise
        return report_error(f"codegemma {args.command}", e)


def report_error(prog: str, error: BaseException) -> int:
    """Print an error in the one format (`<prog>: error: <message>`, then `fix: ...` when the
    error carries one) and return the exit code 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    fix = getattr(error, "fix", None)
    if fix:
        print(f"  fix: {fix}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
