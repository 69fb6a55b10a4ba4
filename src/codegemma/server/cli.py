"""`codegemma serve`: load a model and serve it with uvicorn (127.0.0.1 unless told otherwise).

    codegemma serve --model path/to/codegemma-2b --port 8000
    CODEGEMMA_API_KEY=secret codegemma serve --model ... --host 0.0.0.0

Registered into the main CLI through `register(subparsers)`; clients: docs/serving.md.
"""

from __future__ import annotations

import argparse
import os

from codegemma.server.settings import API_KEY_ENV, ServerSettings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI- and llama.cpp-compatible completion server (docs/serving.md)"
    )
    p.add_argument("--model", "-m", default=None, help="model directory or HF-cache id")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV} if set)",
    )
    p.add_argument("--served-model-name", default=None, help="model id (default: directory name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="engine slots decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting sequences before 503")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens allowed")
    p.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument(
        "--fim-mode",
        choices=["psm", "spm"],
        default="psm",
        help="FIM prompt layout; spm (suffix first) lets the prefix cache reuse nearly the whole "
        "prompt from one keystroke to the next",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace, default_name: str) -> ServerSettings:
    return ServerSettings(
        served_model_name=args.served_model_name or default_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
        fim_mode=args.fim_mode,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    import codegemma
    from codegemma.server.app import create_app

    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    cg = codegemma.load(
        args.model, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size
    )
    settings = settings_from_args(args, cg.path.name if cg.path else "codegemma")
    app = create_app(cg, settings)
    print(f"serving {settings.served_model_name} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
