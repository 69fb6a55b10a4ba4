"""Serving throughput: continuous batching vs one request at a time, same engine, one run.

A real uvicorn server on loopback serves a random-weight checkpoint (the "small" shape of
bench_generate.py unless --model is given). For 1, 4 and 16 concurrent clients, each client sends
`--requests` non-streaming /v1/completions requests (greedy, `--max-tokens` each; a request that
samples eos ends early, its tokens are counted as generated) and aggregate tokens/s and p50/p95 are
measured twice: with the engine's batch size = `--batch` (decode steps of different requests share
one forward pass) and with batch size 1 (requests queue and run one at a time). The ratio is the
gain from batching.

    python benchmarks/bench_serve.py                       # small random model, CPU or GPU
    python benchmarks/bench_serve.py --model path/to/codegemma-2b --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_small_model(out: Path) -> Path:
    """The small random checkpoint of bench_generate.py plus a byte-level trained tokenizer."""
    import shutil

    from bench_generate import make_checkpoint

    from codegemma.train.tokenizer_trainer import train_tokenizer

    make_checkpoint("small", out / "model")
    corpus = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 50
    tok = train_tokenizer(corpus, 4096, out / "tok")
    for f in tok.iterdir():
        shutil.copy(f, out / "model" / f.name)
    return out / "model"


async def client_loop(url: str, requests: int, max_tokens: int, latencies: list, tokens: list):
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(requests):
            body = {"prompt": f"def function_{i}(x):\n", "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens.append(r.json()["usage"]["completion_tokens"])


def measure(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens: list[int] = []

    async def main():
        await asyncio.gather(
            *(client_loop(url, requests, max_tokens, latencies, tokens) for _ in range(clients))
        )

    started = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "tok_s": sum(tokens) / elapsed,
        "p50": statistics.median(latencies),
        "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)],
    }


def run(model_dir: Path, batch: int, args) -> dict[int, dict]:
    from conftest import run_server  # tests/server/conftest.py: uvicorn in a thread

    import codegemma
    from codegemma.engine import Engine
    from codegemma.server import ServerSettings, create_app

    cg = codegemma.load(model_dir, device=args.device)
    # one token per decode step: random weights repeat tokens, which would flatter speculation
    engine = Engine(cg.model, cg.tokenizer, max_batch_size=batch, speculative=False)
    settings = ServerSettings(served_model_name="bench", max_queue=256, max_tokens=args.max_tokens)
    out = {}
    with run_server(create_app(engine, settings)) as url:
        measure(url, 1, 2, 4)  # warm-up
        for clients in args.clients:
            out[clients] = measure(url, clients, args.requests, args.max_tokens)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: a small random model)")
    p.add_argument("--device", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="engine slots with batching")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_small_model(Path(tmp))
        batched = run(model_dir, args.batch, args)
        serial = run(model_dir, 1, args)
    print(f"\nbench_serve: {args.requests} requests/client, {args.max_tokens} tokens each, greedy")
    print("| clients | batched tok/s | p50 / p95 s | one-at-a-time tok/s | p50 / p95 s | gain |")
    print("|---|---|---|---|---|---|")
    for c in args.clients:
        b, s = batched[c], serial[c]
        print(
            f"| {c} | {b['tok_s']:.0f} | {b['p50']:.2f} / {b['p95']:.2f} | {s['tok_s']:.0f} | "
            f"{s['p50']:.2f} / {s['p95']:.2f} | {b['tok_s'] / s['tok_s']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
