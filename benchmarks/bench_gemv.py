"""Decode-shaped matmuls: codegemma's CPU kernel vs torch's F.linear, same weights, one run.

Each case is the weight shapes of one decoder layer of a config (q, k, v, o, gate, up, down) plus
the output head, times as many layers as the config has: copies enough that the whole set is larger
than the last-level cache, so every call reads its weights from memory, as a decode step does.
A "step" multiplies x [M, K] by every matrix once; we report weight GB/s (bytes of weights read per
second) and the ratio to F.linear, for M = 1 (one sequence) and more rows (batched decoding).

With --formats, the same shapes held in ggml's block formats (quant.py; random blocks with finite
scales) through `kernels.qgemv`: weight GB/s of the blocks, the share of the memory bandwidth,
and the time against F.linear over bf16 matrices of the same shapes (the unquantized model's
step), plus the dequantize-to-bf16-then-F.linear path that quantized prefill takes (quant.py).

    python benchmarks/bench_gemv.py                       # small (fp32), 2b (bf16), M = 1, 4, 8, 16
    python benchmarks/bench_gemv.py --configs 2b --rows 1 2 4 8 16
    python benchmarks/bench_gemv.py --shapes 2048x16384 16384x2048 --dtype bfloat16 --rows 1
                                                          # single shapes (here 2B's down and up)
    python benchmarks/bench_gemv.py --configs 2b --formats q8_0 q4_0 q4_k q6_k --rows 1 4 8 16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bench_generate import CONFIGS, memory_bandwidth_gbs

from codegemma import kernels, quant
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


def time_step(fn, ws: list[torch.Tensor], xs: dict, repeats: int, fmt=None) -> float:
    """Best seconds per pass over all of ws (each with its input xs[K], K its row length; from
    its row bytes for blocks of format `fmt`)."""

    def k(w):
        return w.shape[1] if fmt is None else w.shape[1] // fmt.type_size * fmt.block_size

    for w in ws:  # warm-up: page in, build the kernel
        fn(xs[k(w)], w)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w in ws:
            fn(xs[k(w)], w)
        best = min(best, time.perf_counter() - t)
    return best


def random_blocks(n: int, k: int, fmt: quant.BlockFormat, gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, row bytes]: random codes, every fp16 scale field a finite value in [2^-10, 2^-6)
    (Q4_K: d and dmin; Q6_K's int8 sub-scales random)."""
    blocks = torch.randint(0, 256, (n, fmt.row_bytes(k)), dtype=torch.uint8, generator=gen)
    view = blocks.view(n, -1, fmt.type_size)
    for offset in {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}[fmt.name]:
        scales = (torch.rand(view.shape[:2], generator=gen) * 2**-6 + 2**-10).half()
        view[..., offset : offset + 2] = scales.view(torch.uint8).view(n, -1, 2)
    return blocks


def quant_table(name: str, fmt_name: str, args) -> None:
    """Per row count: qgemv over one format's blocks of a config's layer shapes (as many layers
    as pass the last-level cache) against F.linear over bf16 matrices of the same shapes, and the
    prefill path (dequantize to bf16, then F.linear)."""
    fmt = quant.block_format(fmt_name)
    spec = CONFIGS[name]
    config = ModelConfig.preset(spec["preset"], **spec["overrides"])
    shapes = layer_shapes(config)
    layer_bytes = sum(fmt.row_bytes(k) * n for n, k in shapes)
    shapes = shapes * max(1, -(-MIN_BYTES // layer_bytes))
    g = torch.Generator().manual_seed(0)
    qs = [random_blocks(n, k, fmt, g) for n, k in shapes]
    total = sum(q.numel() for q in qs)
    for m in args.rows:
        xs = {k: torch.randn(m, k, generator=g).bfloat16() for k in {k for _, k in shapes}}
        bandwidth = memory_bandwidth_gbs()
        with torch.inference_mode():
            ours = time_step(lambda x, q: kernels.qgemv(x, q, fmt), qs, xs, args.repeats, fmt)
            deq = time_step(
                lambda x, q: F.linear(x, kernels.dequantize(q, fmt, torch.bfloat16)),
                qs,
                xs,
                1,
                fmt,
            )
            bf16 = [torch.randn(n, k, generator=g).bfloat16() for n, k in shapes[: len(shapes)]]
            ref = time_step(F.linear, bf16, xs, args.repeats)
            del bf16
        print(
            f"| {name} | {fmt.name} | {m} | {total / ours / 1e9:.1f} | "
            f"{total / ours / 1e9 / bandwidth:.0%} | {bandwidth:.1f} | {ref / ours:.2f}x | "
            f"{deq / ours:.2f}x |"
        )


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
    parser.add_argument(
        "--formats", nargs="+", default=[], help="block formats (q8_0 q4_0 q4_k q6_k) instead"
    )
    args = parser.parse_args()
    if kernels.isa() is None:
        raise SystemExit("the kernels are not available on this machine (see codegemma.kernels)")
    print(f"- {torch.get_num_threads()} threads, kernel ISA {kernels.isa()}\n")
    if args.formats:
        print(
            "| config | format | rows | kernel GB/s | kernel % of memory | memory GB/s | "
            "vs bf16 F.linear | vs dequantize + F.linear |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name in args.configs:
            for fmt in args.formats:
                quant_table(name, fmt, args)
        return
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
