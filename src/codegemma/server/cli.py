"""`codegemma serve`: load a model and serve it with uvicorn (127.0.0.1 unless told otherwise).

    codegemma serve --model path/to/codegemma-2b --port 8000
    CODEGEMMA_API_KEY=secret codegemma serve --model ... --host 0.0.0.0

The flags for `ServerSettings` are generated from its fields (their defaults, help and checks live
in settings.py); --model/--dtype/--device are every command's model options. The few flags that
are not settings (where to listen, the engine's batch size) and the two settings whose command-line
default differs from the library's (the model id is the directory's name, the key may come from
$CODEGEMMA_API_KEY) are declared here. Registered into the main CLI through `register(subparsers)`;
clients: docs/serving.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from codegemma.options import (
    add_dataclass_options,
    add_model_options,
    dataclass_values,
    load_options,
)
from codegemma.server.settings import API_KEY_ENV, ServerSettings

DEFAULT_MAX_BATCH_SIZE = 8


def _help(name: str) -> str:
    """A settings field's help text, for the flags declared here."""
    return next(f for f in dataclasses.fields(ServerSettings) if f.name == name).metadata["help"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI- and llama.cpp-compatible completion server (docs/serving.md)"
    )
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"engine slots decoded together (default: {DEFAULT_MAX_BATCH_SIZE})",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help=_help("served_model_name") + " (default: the model directory's name)",
    )
    p.add_argument("--api-key", default=None, help=_help("api_key"))
    add_dataclass_options(p, ServerSettings)
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace, default_name: str) -> ServerSettings:
    """The settings the flags ask for; unset flags keep ServerSettings' defaults."""
    values = dataclass_values(args, ServerSettings)  # also the two declared here, maybe None
    values["served_model_name"] = args.served_model_name or default_name
    values["api_key"] = args.api_key or os.environ.get(API_KEY_ENV) or None
    return ServerSettings(**values)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    import codegemma
    from codegemma.server.app import create_app
    from codegemma.server.transport import uvicorn_config

    settings = settings_from_args(args, "codegemma")  # checked before the (slow) model load
    cg = codegemma.load(args.model, **load_options(args), max_batch_size=args.max_batch_size)
    if args.served_model_name is None and cg.path is not None:
        settings = dataclasses.replace(settings, served_model_name=cg.path.name)
    app = create_app(cg.engine, settings)
    print(f"serving {settings.served_model_name} on http://{args.host}:{args.port}", flush=True)
    config = uvicorn_config(app, settings, host=args.host, port=args.port, log_level=args.log_level)
    uvicorn.Server(config).run()
    return 0
