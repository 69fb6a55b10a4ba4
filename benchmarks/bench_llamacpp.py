"""Decode, prefill and peak memory on GGUF files: our engine against llama.cpp's llama-bench.

One random-weight checkpoint of the 2B config (bench_generate.make_checkpoint, bf16) with the
bundled model's tokenizer (8,192 pieces; the GGUF pads it to the 256,000 embedding rows) is built
once into a cache directory and exported once by us (`codegemma export gguf`) to bf16, Q8_0 and
Q4_0, and quantized by llama.cpp's `llama-quantize` from our bf16 file to Q4_K_M. Both
implementations then run the same file:
- llama.cpp: `llama-bench -t THREADS -p PROMPT -n GEN -r REPS` (its defaults otherwise: batch
  2048, ubatch 512, flash attention auto, mmap); its mean tok/s of pp and tg.
- ours: `codegemma.load(file)` and our `Engine` (one slot, no prefix cache, no speculation) in a
  subprocess with `torch.set_num_threads(THREADS)`: prefill = PROMPT random tokens (BOS first) in
  one step; decode = GEN one-token steps after a one-token prompt, as llama-bench's tg does; the
  mean tok/s over REPS timed runs after a warm-up.
Peak RSS is each process's VmHWM (llamacpp.run_measured). Runs alternate between the two, in
interleaved rounds (llama.cpp first in even rounds, ours first in odd), one model in memory at a
time; a cell is the median over rounds, with the range when there are several.

The decode limit is the memory bandwidth / the bytes of tensor data the file holds (one decode
step reads every matrix once; the tied head reads the whole embedding table). The bandwidth is
measured right before and after each run (bench_generate.memory_bandwidth_gbs) and the higher of
the two is that run's; "% of limit" is the median over rounds of decode tok/s x bytes / bandwidth.

    python benchmarks/bench_llamacpp.py                    # bf16, q8_0, q4_0, q4_k_m; 2 rounds
    python benchmarks/bench_llamacpp.py --types q4_0 --rounds 3 --reps 5
    python benchmarks/bench_llamacpp.py --quick            # pp64 tg16, 1 repetition, 1 round
    python benchmarks/bench_llamacpp.py --types q4_0 --dtype float32   # ours in fp32 (see --dtype)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import bench_files
import llamacpp

TYPES = ("bf16", "q8_0", "q4_0", "q4_k_m")
OURS_EXPORT = {"bf16", "q8_0", "q4_0"}  # written by `codegemma export gguf`
LLAMA_QUANTIZE = {"q4_k_m": "Q4_K_M"}  # from our bf16 file by llama-quantize
DECODE_TARGET = {"q4_k_m": 0.9}  # decode vs llama.cpp; every other type 1.0
BANDWIDTH_TARGET, PREFILL_TARGET, RSS_SLACK = 0.9, 2.0, 1.1


def gguf_file(cache: Path, type_name: str) -> Path:
    """The GGUF of `type_name`: our export, or llama-quantize's of our bf16 file (made once)."""
    if type_name in OURS_EXPORT:
        return bench_files.exported_gguf(cache, type_name)
    out = bench_files.cached_gguf(cache, type_name)
    if not out.is_file():
        start = time.time()
        llamacpp.llama_quantize(gguf_file(cache, "bf16"), out, LLAMA_QUANTIZE[type_name])
        print(f"# wrote {out.name} in {time.time() - start:.0f} s", file=sys.stderr)
    return out


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF: what one decode step reads."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


# -- ours, in a subprocess ------------------------------------------------------------------------
def worker(model: str, threads: int, prompt: int, gen: int, reps: int, dtype: str | None) -> dict:
    import torch

    import codegemma
    from codegemma.engine import Engine, SamplingParams

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cg = codegemma.load(model, dtype=dtype, device="cpu")
    bos, vocab = cg.tokenizer.special.bos, cg.config.vocab_size
    engine = Engine(
        cg.model, max_batch_size=1, prefix_cache=False, speculative=False, prefill_tokens=prompt
    )

    def prefill() -> float:
        ids = [bos] + torch.randint(0, vocab, (prompt - 1,)).tolist()
        engine.submit(ids, SamplingParams(max_new_tokens=1))
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        return prompt / (time.perf_counter() - t)

    def decode(n: int) -> float:
        engine.submit([bos], SamplingParams(max_new_tokens=n + 1, stop_token_ids=()))
        engine.step()  # the one-token prompt
        t = time.perf_counter()
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        assert steps == n, (steps, n)
        return n / (time.perf_counter() - t)

    prefill(), decode(min(gen, 4))  # warm-up, as llama-bench's
    rates = [(prefill(), decode(gen)) for _ in range(reps)]
    return {
        "prefill": statistics.mean(p for p, _ in rates),
        "decode": statistics.mean(d for _, d in rates),
    }


def run_ours(model: Path, args) -> tuple[dict, int]:
    cmd = [sys.executable, __file__, "--worker", str(model), "--threads", str(args.threads)]
    cmd += ["--prompt", str(args.prompt), "--gen", str(args.gen), "--reps", str(args.reps)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    out, rss = llamacpp.run_measured(cmd)
    return json.loads(out.strip().splitlines()[-1]), rss


def run_llama(model: Path, args) -> tuple[dict, int]:
    return llamacpp.llama_bench(
        model, threads=args.threads, prompt=args.prompt, gen=args.gen, repetitions=args.reps
    )


# -- the table ------------------------------------------------------------------------------------
def measure(types: list[str], files: dict[str, Path], args) -> dict:
    """{(type, impl): [run, ...]}, each run {"prefill", "decode", "rss", "gbs"}."""
    import torch
    from bench_generate import memory_bandwidth_gbs

    buffer = torch.ones(2**30 // 4)  # the bandwidth probe's 1 GiB, allocated once

    def probe() -> float:
        return memory_bandwidth_gbs(repeats=3, buffer=buffer)

    runs: dict[tuple[str, str], list[dict]] = {}
    impls = {"llama.cpp": run_llama, "ours": run_ours}
    for r in range(args.rounds):
        for t in types:
            order = list(impls) if r % 2 == 0 else list(reversed(impls))
            for impl in order:
                before = probe()
                start = time.time()
                rates, rss = impls[impl](files[t], args)
                gbs = max(before, probe())
                runs.setdefault((t, impl), []).append({**rates, "rss": rss, "gbs": gbs})
                print(
                    f"# round {r + 1} {t} {impl}: prefill {rates['prefill']:.1f} decode "
                    f"{rates['decode']:.2f} tok/s, peak RSS {rss / 2**30:.2f} GiB, "
                    f"{gbs:.1f} GB/s ({time.time() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def cell(values: list[float], fmt: str) -> str:
    mid = format(statistics.median(values), fmt)
    if len(values) < 2:
        return mid
    return f"{mid} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def verdict(ok: bool, value: str) -> str:
    return f"{'met' if ok else 'NOT met'} ({value})"


def report(types: list[str], files: dict[str, Path], runs: dict, args) -> None:
    print(
        f"| type | file GiB | impl | prefill tok/s (pp{args.prompt}) | decode tok/s "
        f"(tg{args.gen}) | prefill vs llama.cpp | decode vs llama.cpp | GB/s | % of limit | "
        "peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    targets = []
    for t in types:
        size = tensor_bytes(files[t])
        stats = {}
        for impl in ("llama.cpp", "ours"):
            rs = runs[(t, impl)]
            stats[impl] = {
                "prefill": statistics.median(x["prefill"] for x in rs),
                "decode": statistics.median(x["decode"] for x in rs),
                "limit": statistics.median(x["decode"] * size / (x["gbs"] * 1e9) for x in rs),
                "rss": max(x["rss"] for x in rs),
            }
        anchor = stats["llama.cpp"]
        for impl, s in stats.items():
            rs = runs[(t, impl)]
            print(
                f"| {t} | {size / 2**30:.2f} | {impl} | {cell([x['prefill'] for x in rs], '.1f')} | "
                f"{cell([x['decode'] for x in rs], '.2f')} | "
                f"{s['prefill'] / anchor['prefill']:.2f}x | {s['decode'] / anchor['decode']:.2f}x | "
                f"{statistics.median(x['gbs'] for x in rs):.1f} | {s['limit']:.0%} | "
                f"{s['rss'] / 2**30:.2f} |"
            )
        ours = stats["ours"]
        decode_x, prefill_x = ours["decode"] / anchor["decode"], ours["prefill"] / anchor["prefill"]
        need = DECODE_TARGET.get(t, 1.0)
        rss_x, limit = ours["rss"] / anchor["rss"], ours["limit"]
        targets.append(
            f"| {t} | {verdict(decode_x >= need, f'{decode_x:.2f}x, need {need:.1f}x')} | "
            f"{verdict(limit >= BANDWIDTH_TARGET, f'{limit:.0%}')} | "
            f"{verdict(prefill_x >= PREFILL_TARGET, f'{prefill_x:.2f}x')} | "
            f"{verdict(rss_x <= RSS_SLACK, f'{rss_x:.2f}x')} |"
        )
    print(
        "\n| type | decode vs llama.cpp | decode >= 90% of limit | prefill >= 2x llama.cpp | "
        "peak RSS <= llama.cpp + 10% |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(targets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default=",".join(TYPES), help=f"of {', '.join(TYPES)}")
    parser.add_argument("--threads", type=int, default=2, help="both implementations (2)")
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens (pp, 256)")
    parser.add_argument("--gen", type=int, default=64, help="decoded tokens (tg, 64)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per process (-r, 3)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    parser.add_argument("--quick", action="store_true", help="pp64 tg16, 1 repetition, 1 round")
    parser.add_argument("--cache", type=Path, default=None, help="checkpoint and GGUF directory")
    parser.add_argument(
        "--dtype", default=None, help="our compute dtype (default: codegemma.load's for the file)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(
                worker(args.worker, args.threads, args.prompt, args.gen, args.reps, args.dtype)
            )
        )
        return
    if args.quick:
        args.prompt, args.gen, args.reps, args.rounds = 64, 16, 1, 1
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        sys.exit(f"--types: unknown {', '.join(unknown)}; choose from {', '.join(TYPES)}")
    llamacpp.require_tools("llama-bench", "llama-quantize")
    cache = (args.cache or bench_files.default_cache()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    start = time.time()
    files = {t: gguf_file(cache, t) for t in types}
    prepared = time.time()
    runs = measure(types, files, args)
    print(
        f"# {llamacpp.version()}; {os.cpu_count()} cores, {args.threads} threads each; "
        f"pp{args.prompt} tg{args.gen}, {args.reps} repetitions per process, {args.rounds} "
        f"interleaved rounds; files in {cache}"
    )
    print(
        f"# files ready in {prepared - start:.0f} s, measured in {time.time() - prepared:.0f} s\n"
    )
    report(types, files, runs, args)


if __name__ == "__main__":
    main()
