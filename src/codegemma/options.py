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
        add_field_option(
            parser,
            "--" + f.name.replace("_", "-"),
            cls,
            f.name,
            dest=dest_prefix + f.name,
            help=describe(f) if describe else None,
            default=defaults.get(f.name, _UNSET),
        )


def dataclass_values(args: argparse.Namespace, cls: type, *, dest_prefix: str = "") -> dict:
    """The values of `cls`'s flags that were given on the command line, by field name."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in vars(args).items():
        if key.startswith(dest_prefix) and key.removeprefix(dest_prefix) in names:
            out[key.removeprefix(dest_prefix)] = value
    return out


_UNSET = object()  # add_field_option: no default of the command's own


def add_field_option(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    cls: type,
    name: str,
    *,
    dest: str,
    help: str | None = None,
    metavar: str | None = None,
    required: bool = False,
    default: Any = _UNSET,
) -> None:
    """A flag for field `name` of `cls`, named `flag` (`--shards` for `num_shards`): its type
    (`--x/--no-x` for a bool), choices, default (shown in the help, never restated) and, unless
    given, its help come from the field. Unset, it stays out of the namespace, so the field's
    default applies, unless `default` gives this command its own."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = base_type(cls, name)
    text = help if help is not None else field.metadata.get("help", "")
    shown = field.default if default is _UNSET else default
    if shown is not dataclasses.MISSING and kind is not bool:
        text = f"{text} (default: {shown})".lstrip()
    kwargs: dict[str, Any] = dict(
        dest=dest,
        default=argparse.SUPPRESS if default is _UNSET else default,
        help=text or None,
    )
    if kind is bool:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if choices := field.metadata.get("choices"):
        kwargs["choices"] = choices
    else:
        kwargs["metavar"] = metavar or kind.__name__.upper()
    p.add_argument(flag, type=_parse(kind, _optional(field)), required=required, **kwargs)
