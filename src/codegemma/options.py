"""Command-line options from one source: the options every command shares, and flags generated
from a settings dataclass so its fields, their defaults and their checks live in one place.

    add_model_options(p)                              # --model/-m, --dtype, --device
    add_dataclass_options(p, ServerSettings)          # --max-queue, --fim-mode, ...
    settings = ServerSettings(**dataclass_values(args, ServerSettings))

A generated flag has the field's name (`max_queue` -> `--max-queue`), its type (`int | None` takes
an int, or "none" to unset), `choices` and `help` from the field's metadata (`option(...)`), and
booleans get `--x/--no-x`. Unset flags stay out of the namespace (argparse.SUPPRESS), so the
dataclass's default applies and is never restated; the dataclass's `__post_init__` is the one
place a value is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

from codegemma.config import DTYPES
from codegemma.quant import QUANTIZERS

QUANTIZE = tuple(q.lower() for q in QUANTIZERS)  # what `--quantize` offers


def add_model_options(
    p: argparse.ArgumentParser, *, device: bool = True, dtype: str | None = None
) -> None:
    """--model/-m, --dtype, --quantize and --device, as every command that loads a model takes
    them; `load_options(args)` turns them into `codegemma.load` keywords."""
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="model directory, HF-cache id, GGUF file or ollama:NAME[:TAG] (default: the "
        "bundled model)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=dtype,
        help=f"compute dtype (default: {dtype or 'the checkpoint'})",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default=None,
        help="quantize the weights at load, in ggml's block format (a GGUF's stay as stored)",
    )
    if device:
        p.add_argument(
            "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
        )


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`codegemma.load` keywords from the flags of `add_model_options`."""
    return dict(dtype=args.dtype, device=getattr(args, "device", None), quantize=args.quantize)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Collection[str] | None = None,
    cli: bool = True,
    **metadata: Any,
) -> Any:
    """A dataclass field that carries its command-line help (and choices); `cli=False` keeps it
    off the command line."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "cli": cli, **metadata}
    return dataclasses.field(default=default, metadata=meta)


def base_type(cls: type, name: str) -> type:
    """int / float / str / bool of a field, looking through `X | None`."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _optional(f: dataclasses.Field) -> bool:
    return f.default is None


def _parse(kind: type, optional: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def add_dataclass_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: Collection[str] = (),
    dest_prefix: str = "",
    describe: Callable[[dataclasses.Field], str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per field of `cls` (those with `cli` metadata not False, minus `exclude`);
    `defaults` gives this command its own default for some fields (passed to `cls` when unset)."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        kind = base_type(cls, f.name)
        text = describe(f) if describe else f.metadata.get("help", "")
        default = defaults.get(f.name, f.default)
        if default is not dataclasses.MISSING and kind is not bool:
            text = f"{text} (default: {default})".lstrip()
        kwargs: dict[str, Any] = dict(
            dest=dest_prefix + f.name,
            default=defaults.get(f.name, argparse.SUPPRESS),
            help=text or None,
        )
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        choices = f.metadata.get("choices")
        if choices:
            kwargs["choices"] = choices
        else:
            kwargs["metavar"] = kind.__name__.upper()
        parser.add_argument(flag, type=_parse(kind, _optional(f)), **kwargs)


def dataclass_values(args: argparse.Namespace, cls: type, *, dest_prefix: str = "") -> dict:
    """The values of `cls`'s flags that were given on the command line, by field name."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in vars(args).items():
        if key.startswith(dest_prefix) and key.removeprefix(dest_prefix) in names:
            out[key.removeprefix(dest_prefix)] = value
    return out


def add_field_option(
    p: argparse.ArgumentParser,
    flag: str,
    cls: type,
    name: str,
    *,
    dest: str,
    help: str | None = None,
    metavar: str | None = None,
    required: bool = False,
) -> None:
    """A flag for field `name` of `cls` under another name than the field's (`--shards` for
    `num_shards`): its type, its default (shown in the help, never restated) and, unless given,
    its help come from the field. Unset, it stays out of the namespace, so the default applies."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = base_type(cls, name)
    text = help or field.metadata.get("help", "")
    if field.default is not dataclasses.MISSING:
        text = f"{text} (default: {field.default})"
    p.add_argument(
        flag,
        dest=dest,
        type=_parse(kind, _optional(field)),
        metavar=metavar or kind.__name__.upper(),
        required=required,
        default=argparse.SUPPRESS,
        help=text,
    )
