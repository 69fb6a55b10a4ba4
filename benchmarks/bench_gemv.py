"""Decode-shaped matmuls: codegemma's CPU kernel vs torch's F.linear, same weights, one run.

Each case is the weight shapes of one decoder layer of a config (q, k, v, o, gate, up, down) plus
the output head, times as many layers as the config has: copies enough that the whole set is larger
than the last-level cache, so every call reads its weights from memory, as a decode step does.
A "step" multiplies x [M, K] by every matrix once; we report weight GB/s (bytes of weights read per
second) and the ratio to F.linear, for M = 1 (one sequence) and more rows (batched decoding).

    python benchmarks/bench_gemv.py                       # small (fp32), 2b (bf16), M = 1, 4, 8, 16
    python benchmarks/bench_gemv.py --configs 2b --rows 1 2 4 8 16
    python benchmarks/bench_gemv.py --shapes 2048x16384 16384x2048 --dtype bfloat16 --rows 1
                                                          # single shapes (here 2B's down and up)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bench_generate import CONFIGS, memory_bandwidth_gbs

from codegemma import kernels
from codegemma.config import ModelConfig

MIN_BYTES = 256 << 20  # well past any last-level cache


def layer_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    d, f = config.hidden_size, config.intermediate_size
    q, kv = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    return [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]


def weights(name: str) -> tuple[list[torch.Tensor], torch.dtype]:
    spec = CONFIGS[name]
    config = ModelConfig.preset(spec["preset"], **spec["overrides"])
    dtype = getattr(torch, spec["dtype"])
    shapes = layer_shapes(config) * config.num_hidden_layers + [
        (config.vocab_size, config.hidden_size)
    ]
    step_bytes = sum(n * k for n, k in shapes) * dtype.itemsize
    copies = max(1, -(-MIN_BYTES // step_bytes))
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g).to(dtype) for _ in range(copies) for n, k in shapes]
    return ws, dtype


def shape_weights(shape: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies of one [N, K] matrix ("NxK"), enough to pass the last-level cache."""
    n, k = (int(v) for v in shape.lower().split("x"))
    copies = max(1, -(-MIN_BYTES // (n * k * dtype.itemsize)))
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, k, generator=g).to(dtype) for _ in range(copies)]


def time_step(fn, ws: list[torch.Tensor], xs: dict[int, torch.Tensor], repeats: int) -> float:
    """Best seconds per pass over all of ws, divided by the number of passes' steps."""
    for w in ws:  # warm-up: page in, build the kernel
        fn(xs[w.shape[1]], w)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w in ws:
            fn(xs[w.shape[1]], w)
        best = min(best, time.perf_counter() - t)
    return best


def raw_kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernel for any number of rows (kernels.linear hands it only up to MAX_ROWS[dtype]:
    the rows this table shows it winning)."""
    return kernels._gemv(kernels.library(), x, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["small", "2b"], choices=sorted(CONFIGS))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--shapes", nargs="+", default=[], help="NxK matrices instead of configs")
    parser.add_argument("--dtype", default="bfloat16", help="for --shapes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if kernels.isa() is None:
        raise SystemExit("the kernels are not available on this machine (see codegemma.kernels)")
    print(f"- {torch.get_num_threads()} threads, kernel ISA {kernels.isa()}\n")
    print(
        "| config | dtype | rows | F.linear GB/s | kernel GB/s | kernel vs F.linear | "
        "memory GB/s | kernel % of memory |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.shapes or args.configs:
        if args.shapes:
            dtype = getattr(torch, args.dtype)
            ws = shape_weights(name, dtype)
        else:
            ws, dtype = weights(name)
        total = sum(w.numel() * w.element_size() for w in ws)
        for m in args.rows:
            xs = {k: torch.randn(m, k).to(dtype) for k in {w.shape[1] for w in ws}}
            bandwidth = memory_bandwidth_gbs()  # now: on a shared machine it moves by minutes
            with torch.inference_mode():
                ref = time_step(F.linear, ws, xs, args.repeats)
                ours = time_step(raw_kernel, ws, xs, args.repeats)
            print(
                f"| {name} | {str(dtype).removeprefix('torch.')} | {m} | {total / ref / 1e9:.1f} | "
                f"{total / ours / 1e9:.1f} | {ref / ours:.2f}x | {bandwidth:.1f} | "
                f"{total / ours / 1e9 / bandwidth:.0%} |"
            )
        del ws


if __name__ == "__main__":
    main()
