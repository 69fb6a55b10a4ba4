"""fp32 matmuls of prefill and verify steps: torch's MKL GEMM (F.linear) vs its oneDNN one, one run.

`kernels.linear` sends fp32 CPU products of at least ONEDNN_MIN_MACS multiply-adds to oneDNN where
`kernels.onednn_fp32()` says so (an AVX-512 CPU not made by Intel, whose MKL sgemm keeps to its
AVX2 code). This script times both GEMMs on the weight shapes of a config (q, k, v, o, gate, up,
down and the output head) at a few token counts, interleaved, the best of --repeats each, and
prints GFLOP/s, the ratio, each one's largest error against a float64 product of the same inputs,
and what kernels.linear picks on this machine. The smallest products
show where ONEDNN_MIN_MACS lies: below it oneDNN's fixed cost per call loses.

    python benchmarks/bench_linear.py                        # mini and 2b, 1..512 tokens
    python benchmarks/bench_linear.py --configs 2b --tokens 16 256 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bench_gemv import layer_shapes

from codegemma import kernels
from codegemma.config import ModelConfig

CONFIGS = ("mini", "2b")  # ModelConfig presets


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def best_seconds(fn, repeats: int) -> float:
    fn()
    once = time.perf_counter()
    fn()
    once = time.perf_counter() - once
    calls = max(1, int(0.05 / max(once, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["mini", "2b"], choices=CONFIGS)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch has no oneDNN: nothing to compare")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; kernels.linear uses "
        f"oneDNN here: {kernels.onednn_fp32()} (for products >= {kernels.ONEDNN_MIN_MACS:,} MACs)"
    )
    print(
        "| config | tokens | matrix N x K | MKL GFLOP/s | oneDNN GFLOP/s | oneDNN / MKL | "
        "max error vs float64, MKL / oneDNN |"
    )
    print("|---|---:|---|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for name in args.configs:
        config = ModelConfig.preset(name)
        shapes = dict.fromkeys(layer_shapes(config) + [(config.vocab_size, config.hidden_size)])
        for tokens in args.tokens:
            for n, k in shapes:
                w, x = torch.randn(n, k, generator=g), torch.randn(tokens, k, generator=g)
                flops = 2 * tokens * n * k
                with torch.inference_mode():
                    mkl = best_seconds(lambda x=x, w=w: F.linear(x, w), args.repeats)
                    dnn = best_seconds(lambda x=x, w=w: onednn(x, w), args.repeats)
                    exact = F.linear(x.double(), w.double())
                    errors = [
                        (out.double() - exact).abs().max().item()
                        for out in (F.linear(x, w), onednn(x, w))
                    ]
                print(
                    f"| {name} | {tokens} | {n} x {k} | {flops / mkl / 1e9:.1f} | "
                    f"{flops / dnn / 1e9:.1f} | {mkl / dnn:.2f}x | "
                    f"{errors[0]:.1e} / {errors[1]:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
