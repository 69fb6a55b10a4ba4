"""Quantized CPU inference: decode, batched decode and prefill per weight format, against the
memory-bandwidth limit and against the plain-torch reference path measured in the same run.

One random-weight checkpoint of the 2B config (bench_generate.make_checkpoint, bf16, with the
bundled model's tokenizer) is built once into --cache and exported once by `codegemma export gguf`
to Q8_0 and Q4_0 (bench_files.py: the same files as bench_llamacpp.py's). We have no K-quant
writer (llama-quantize has: bench_llamacpp.py runs its files), so the Q4_K_M and Q6_K models are built in the worker from random blocks: Q4_K_M
as llama.cpp lays it out (Q4_K matrices; Q6_K for attn_v and ffn_down in the layers its
`use_more_bits` picks, and for the tied embedding), Q6_K everywhere; the same shapes and bytes as
real files, so the same work. The float norms are the checkpoint's in every type.

Each type runs in its own subprocess (peak RSS is its own, VmHWM), `torch.set_num_threads
(--threads)`, activations and KV cache in --compute (bf16 by default; a quantized GGUF loads
fp32 unless told), the Engine (no prefix cache, no speculation):
- decode: one sequence, --gen one-token steps after a 16-token prompt;
- batched: --batch sequences of such prompts decoded together (tok/s counts every row's tokens);
- prefill: a --prompt-token prompt in one step (quantized matrices: dequantized in tiles for
  torch's bf16 GEMM, quant.py).
Each is the median over --reps timed runs after a warm-up. The anchor ("reference") is the same
worker with CODEGEMMA_KERNELS=0: model.py's modules in plain torch, quantized matrices
dequantized whole for every matmul (quant.py's reference path); it decodes --anchor-gen tokens.

The decode limit: one step reads every tensor once (the tied head the whole embedding table), so
limit tok/s = rows x memory bandwidth / tensor bytes. The bandwidth (bench_generate's
memory_bandwidth_gbs) is measured before and after each timed run; the higher is that run's.
A quiet machine matters: on a shared one the bandwidth moves by 2x within seconds.

    python benchmarks/bench_quant.py                       # bf16 q8_0 q4_0 q4_k_m q6_k, 2 threads
    python benchmarks/bench_quant.py --types q4_0 --reps 5
    python benchmarks/bench_quant.py --quick               # tg8, pp64, one rep: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_files

TYPES = ("bf16", "q8_0", "q4_0", "q4_k_m", "q6_k")
EXPORTED = {"q8_0", "q4_0"}  # written by `codegemma export gguf`
RANDOM_BLOCKS = {"q4_k_m", "q6_k"}  # built in the worker
BANDWIDTH_TARGET = 0.9
MATRICES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# -- the files ------------------------------------------------------------------------------------
def model_file(cache: Path, type_name: str) -> Path:
    """What the worker loads for `type_name`: the checkpoint, or its GGUF export (made once)."""
    if type_name not in EXPORTED:
        return bench_files.checkpoint(cache)
    return bench_files.exported_gguf(cache, type_name)


# -- the models ------------------------------------------------------------------------------------
def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v and ffn_down Q4_K_M stores as Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def random_block_model(model, type_name: str, seed: int = 0):
    """Replace every matrix and the embedding by random blocks laid out as `type_name` is."""
    import torch
    from bench_gemv import random_blocks

    from codegemma import quant

    g = torch.Generator().manual_seed(seed)
    layers = len(model.model.layers)

    def install(parent, name: str, fmt: str, cls) -> None:
        old = getattr(parent, name)
        rows, cols = old.weight.shape
        blocks = random_blocks(rows, cols, quant.block_format(fmt), g)
        setattr(parent, name, cls(rows, cols, fmt, blocks))

    for i, layer in enumerate(model.model.layers):
        for path in MATRICES:
            parent_path, _, name = path.rpartition(".")
            fmt = "Q6_K"
            if type_name == "q4_k_m":
                more = name in ("v_proj", "down_proj") and use_more_bits(i, layers)
                fmt = "Q6_K" if more else "Q4_K"
            install(layer.get_submodule(parent_path), name, fmt, quant.QuantizedLinear)
    install(model.model, "embed_tokens", "Q6_K", quant.QuantizedEmbedding)
    return model


def load(path: str, type_name: str, compute: str):
    import torch

    import codegemma

    dtype = getattr(torch, compute)
    if type_name in RANDOM_BLOCKS:
        from codegemma.checkpoint import load_model

        model, config = load_model(path, dtype=dtype, device="cpu")
        return random_block_model(model, type_name), config
    cg = codegemma.load(path, dtype=dtype, device="cpu")
    return cg.model, cg.config


def tensor_bytes(model) -> int:
    """Bytes of every weight (parameters, and quantized blocks held as buffers; not the rotary
    frequencies): what one decode step reads."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sum(t.numel() * t.element_size() for n, t in tensors if not n.startswith("rotary."))


# -- the worker -----------------------------------------------------------------------------------
def worker(path: str, type_name: str, args) -> dict:
    import torch
    from bench_generate import memory_bandwidth_gbs, peak_rss_bytes

    from codegemma import kernels
    from codegemma.engine import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, config = load(path, type_name, args.compute)
    engine = Engine(
        model,
        max_batch_size=args.batch,
        prefix_cache=False,
        speculative=False,
        prefill_tokens=args.batch * args.prompt,
    )
    vocab = config.vocab_size
    buffer = None

    def probe() -> float:
        return memory_bandwidth_gbs(repeats=1, buffer=buffer) if buffer is not None else 0.0

    def timed(fn):
        before = probe()
        rate = fn()
        return {"tok_s": rate, "gbs": max(before, probe())}

    def prefill() -> float:
        engine.submit(
            torch.randint(3, vocab, (args.prompt,)).tolist(), SamplingParams(max_new_tokens=1)
        )
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        return args.prompt / (time.perf_counter() - t)

    def decode(rows: int, n: int) -> float:
        for _ in range(rows):
            ids = torch.randint(3, vocab, (16,)).tolist()
            engine.submit(ids, SamplingParams(max_new_tokens=n + 1, stop_token_ids=()))
        engine.step()  # the prefill of every row
        t, steps = time.perf_counter(), 0
        while engine.has_work():
            engine.step()
            steps += 1
        assert steps == n, (steps, n)
        return rows * n / (time.perf_counter() - t)

    gen = args.anchor_gen if args.reference else args.gen
    prefill(), decode(1, 1), decode(args.batch, 1)  # warm-up: the cache, the kernels' build
    peak = peak_rss_bytes()  # before the bandwidth probe's 1 GiB
    buffer = torch.ones(2**30 // 4)
    runs = {"decode": [], "batched": [], "prefill": []}
    for _ in range(args.reps):
        runs["decode"].append(timed(lambda: decode(1, gen)))
        runs["batched"].append(timed(lambda: decode(args.batch, gen)))
        runs["prefill"].append(timed(prefill))
    return {
        "runs": runs,
        "bytes": tensor_bytes(model),
        "peak_rss": peak,
        "kernels": kernels.isa() or "off",
        "step": engine._step is not None,
    }


def run_worker(path: Path, type_name: str, args, reference: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(path), "--types", type_name]
    for flag in ("threads", "gen", "anchor_gen", "batch", "prompt", "reps", "compute"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "CODEGEMMA_KERNELS": "0"} if reference else None
    if reference:
        cmd.append("--reference")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"worker {type_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the table ------------------------------------------------------------------------------------
def summary(runs: list[dict], rows: int, nbytes: int) -> tuple[float, float]:
    """(median tok/s, median fraction of the bandwidth limit) over runs."""
    rates = [r["tok_s"] for r in runs]
    shares = [r["tok_s"] / rows * nbytes / (r["gbs"] * 1e9) for r in runs]
    return statistics.median(rates), statistics.median(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--cache", type=Path, default=bench_files.default_cache())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen", type=int, default=64, help="decoded tokens per run")
    parser.add_argument("--anchor-gen", type=int, default=3, help="decoded tokens, reference")
    parser.add_argument("--batch", type=int, default=4, help="sequences in the batched run")
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--compute", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-anchor", action="store_true", help="skip the reference path")
    parser.add_argument("--quick", action="store_true", help="tg8, pp64, one rep")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.gen, args.prompt, args.reps = 8, 64, 1
    types = args.types.split(",")
    if args.worker:
        print(json.dumps(worker(args.worker, types[0], args)))
        return
    unknown = sorted(set(types) - set(TYPES))
    if unknown:
        raise SystemExit(f"unknown --types {unknown}; choose from {', '.join(TYPES)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    print(
        f"# 2B random weights, {args.threads} threads, compute {args.compute}; decode tg{args.gen} "
        f"(reference tg{args.anchor_gen}), batched {args.batch} x tg{args.gen}, prefill "
        f"pp{args.prompt}; median of {args.reps}\n"
    )
    print(
        "| type | impl | weights GB | decode tok/s | % of limit | batched tok/s | % of limit | "
        "prefill tok/s | vs reference (decode / prefill) | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for t in types:
        path = model_file(args.cache, t)
        results = {"ours": run_worker(path, t, args, reference=False)}
        if not args.no_anchor:
            results["reference"] = run_worker(path, t, args, reference=True)
        cells = {}
        for impl, r in results.items():
            decode, d_share = summary(r["runs"]["decode"], 1, r["bytes"])
            batched, b_share = summary(r["runs"]["batched"], args.batch, r["bytes"])
            prefill = statistics.median(x["tok_s"] for x in r["runs"]["prefill"])
            cells[impl] = (decode, prefill)
            ratio = ""
            if impl == "ours" and "reference" in results:
                ref = results["reference"]["runs"]
                ref_d = statistics.median(x["tok_s"] for x in ref["decode"])
                ref_p = statistics.median(x["tok_s"] for x in ref["prefill"])
                ratio = f"{decode / ref_d:.1f}x / {prefill / ref_p:.1f}x"
            print(
                f"| {t} | {impl} | {r['bytes'] / 1e9:.2f} | {decode:.2f} | {d_share:.0%} | "
                f"{batched:.2f} | {b_share:.0%} | {prefill:.1f} | {ratio} | "
                f"{r['peak_rss'] / 2**30:.2f} |",
                flush=True,
            )
            if impl == "ours":
                met = "met" if d_share >= BANDWIDTH_TARGET else "NOT met"
                gbs = [x["gbs"] for x in r["runs"]["decode"]]
                notes.append(
                    f"- {t}: decode {d_share:.0%} of the bandwidth limit ({met}: target "
                    f"{BANDWIDTH_TARGET:.0%}); bandwidth {min(gbs):.1f}-{max(gbs):.1f} GB/s; "
                    f"kernels {r['kernels']}, decode step {'on' if r['step'] else 'OFF'}"
                )
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
