"""Generation speed and memory: our engine vs transformers' `generate`, same checkpoint, one run.

For each config (tiny: weights in cache, the step is all per-token overhead; small: 19 MB of fp32
weights, overhead plus memory traffic; the CodeGemma 2B shape: reading the weights dominates) a
random-weight checkpoint is written once, then each implementation runs in its own subprocess (so
peak RSS is its own): greedy, batch 1, a fixed prompt, no early stop. Every token's arrival is
timestamped (our engine's steps; transformers' streamer), so
  prefill tok/s = prompt tokens / time to the first new token
  decode tok/s  = (N - 1) / (time from the first new token to the last)
and the run is repeated in --rounds rounds, each of which first measures the machine's memory
bandwidth (the fastest of several streaming reads of 1 GiB, see memory_bandwidth_gbs) and then
generates: on a shared machine the bandwidth moves by 2x from one minute to the next, so a decode
is compared only with the bandwidth measured seconds before it. Per round, the decode limit is
that bandwidth / bytes of weights read per token; the table gives the medians over the rounds of
decode tok/s, bandwidth, and each round's decode / limit.

    python benchmarks/bench_generate.py                  # tiny, small and 2b (bf16)
    python benchmarks/bench_generate.py --configs 2b --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_train import CONFIGS as TRAIN_CONFIGS  # one "small" model for both benchmarks

CONFIGS = {
    "small": dict(preset="tiny", overrides=TRAIN_CONFIGS["small"], dtype="float32"),
    # the test preset: weights fit in cache, so the step is all per-token overhead
    "tiny": dict(preset="tiny", overrides={}, dtype="float32"),
    "2b": dict(preset="2b", overrides={}, dtype="bfloat16"),
}


def make_checkpoint(name: str, out: Path) -> Path:
    from codegemma.checkpoint import save_model
    from codegemma.config import ModelConfig
    from codegemma.model import GemmaForCausalLM

    spec = CONFIGS[name]
    config = ModelConfig.preset(spec["preset"], **spec["overrides"], torch_dtype=spec["dtype"])
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, spec["dtype"]))
    model.init_weights(seed=0)
    save_model(model, config, out)
    return out


def memory_bandwidth_gbs(
    size_gib: float = 1.0, repeats: int = 3, buffer: torch.Tensor | None = None
) -> float:
    """The fastest streaming read of `size_gib` we can measure: the best over repeats of torch's
    sum and dot of an fp32 tensor, and (where available) our GEMV over a bf16 matrix of that size.
    Any of them is a lower bound on what the memory delivers; the best is the tightest, so a
    decode's "% of limit" against it is, if anything, understated. (On this machine torch's
    reductions read at ~31-35 GB/s while the GEMV reads at up to ~60.) `buffer`: a float32
    tensor of that size to reuse (else one is allocated, ordinary memory: 4 KB pages here)."""
    from codegemma import kernels

    x = buffer if buffer is not None else torch.ones(int(size_gib * 2**30 / 4))
    probes = [lambda: x.sum(), lambda: torch.dot(x, x)]
    if kernels.isa():
        w = x.view(torch.bfloat16).view(-1, 2048)  # the same bytes as a [N, 2048] bf16 matrix
        v = torch.ones(1, 2048, dtype=torch.bfloat16)
        probes.append(lambda: kernels.gemv(v, w))
    best = float("inf")
    for probe in probes:
        probe()  # touch
        best = min([best] + [_time(probe) for _ in range(repeats)])
    return x.numel() * 4 / best / 1e9


def gemv_bandwidth_gbs(
    dtype: torch.dtype, fn=torch.nn.functional.linear, repeats: int = 20
) -> float:
    """Weight bytes per second that one decode-shaped matmul (x[1, 2048] @ W[16384, 2048]^T, the
    2B's MLP up-projection) streams through `fn` (torch's F.linear, or our kernel)."""
    w = torch.randn(16384, 2048).to(dtype)
    x = torch.randn(1, 2048).to(dtype)
    fn(x, w)
    best = min(_time(lambda: fn(x, w)) for _ in range(repeats))
    return w.numel() * w.element_size() / best / 1e9


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across
    fork/exec, so a worker would report the parent's peak (the checkpoint-making one)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worker(
    impl: str, model_dir: str, prompt_len: int, new_tokens: int, dtype: str, rounds: int
) -> dict:
    torch.manual_seed(0)
    if impl == "ours":
        from codegemma.checkpoint import load_model
        from codegemma.engine import Engine, SamplingParams

        model, config = load_model(model_dir, dtype=getattr(torch, dtype), device="cpu")
        # token ids only (random weights, no tokenizer); no prefix cache: every generation
        # prefills its prompt again, as transformers' generate does
        engine = Engine(model, max_batch_size=1, prefix_cache=False)
        prompt = torch.randint(200, config.vocab_size, (prompt_len,)).tolist()

        def run(n: int) -> list[float]:
            engine.submit(prompt, SamplingParams(max_new_tokens=n))
            times = [time.perf_counter()]
            while engine.has_work():
                engine.step()  # the first step prefills, each later one decodes a token
                times.append(time.perf_counter())
            assert len(times) == n + 1
            return times
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)
        )
        model.eval()
        vocab = model.config.vocab_size
        ids = torch.randint(200, vocab, (1, prompt_len))

        class Clock:  # a streamer: put() gets the prompt, then each new token as it is made
            def __init__(self) -> None:
                self.times = [time.perf_counter()]

            def put(self, value) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        def run(n: int) -> list[float]:
            clock = Clock()
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                    streamer=clock,
                )
            assert out.shape[1] == prompt_len + n and len(clock.times) == n + 2
            return [clock.times[0], *clock.times[2:]]  # the start, then each new token

    run(2)  # warm-up
    run(new_tokens)  # the peak memory of a whole generation...
    peak = peak_rss_bytes()  # ...read before the bandwidth probe allocates its 1 GiB
    buffer = torch.ones(2**30 // 4)
    results = []
    for _ in range(rounds):
        gbs = memory_bandwidth_gbs(repeats=1, buffer=buffer)
        times = run(new_tokens)
        results.append(
            {
                "gbs": gbs,
                "prefill_tok_s": prompt_len / (times[1] - times[0]),
                "decode_tok_s": (new_tokens - 1) / (times[-1] - times[1]),
            }
        )
    return {"rounds": results, "peak_rss_gib": peak / 2**30}


def run_worker(impl: str, model_dir: Path, args, dtype: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--model-dir",
        str(model_dir),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--dtype",
        dtype,
        "--rounds",
        str(args.rounds),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,small,2b")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--worker", choices=["ours", "transformers"])
    parser.add_argument("--model-dir")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of (bandwidth probe, timed generation)"
    )
    args = parser.parse_args()
    if args.worker:
        result = worker(
            args.worker, args.model_dir, args.prompt_len, args.new_tokens, args.dtype, args.rounds
        )
        print(json.dumps(result))
        return

    from codegemma import kernels
    from codegemma.config import ModelConfig

    print(
        f"# machine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, codegemma kernels: {kernels.isa() or 'off'}"
    )
    for dtype in (torch.bfloat16, torch.float32):
        line = (
            f"# one decode-shaped {str(dtype)[6:]} matmul (W [16384, 2048], repeated: partly cached) "
            f"streams F.linear {gemv_bandwidth_gbs(dtype):.1f} GB/s"
        )
        if kernels.isa():
            line += f", codegemma kernel {gemv_bandwidth_gbs(dtype, kernels.gemv):.1f} GB/s"
        print(line)
    print(
        f"# prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, batch 1; "
        f"medians over {args.rounds} rounds of (bandwidth probe, generation)\n"
    )
    print(
        "| config | dtype | impl | prefill tok/s | decode tok/s | decode vs transformers | "
        "memory GB/s | bandwidth limit tok/s | % of limit | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    notes: list[str] = []
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            model_dir = make_checkpoint(name, Path(tmp) / name)
            config = ModelConfig.load(model_dir)
            bytes_per_token = (
                config.num_parameters * torch.finfo(getattr(torch, spec["dtype"])).bits / 8
            )
            rows = {}
            for impl in ("transformers", "ours"):
                r = run_worker(impl, model_dir, args, spec["dtype"])
                per_round = r["rounds"]
                rows[impl] = {
                    key: statistics.median(x[key] for x in per_round)
                    for key in ("gbs", "prefill_tok_s", "decode_tok_s")
                }
                rows[impl]["of_limit"] = statistics.median(
                    x["decode_tok_s"] * bytes_per_token / (x["gbs"] * 1e9) for x in per_round
                )
                rows[impl]["peak_rss_gib"] = r["peak_rss_gib"]
                notes.append(
                    f"- {name} {impl}, each round's probe -> decode: "
                    + ", ".join(
                        f"{x['gbs']:.1f} GB/s -> {x['decode_tok_s']:.2f} tok/s "
                        f"({x['decode_tok_s'] * bytes_per_token / (x['gbs'] * 1e9):.0%})"
                        for x in per_round
                    )
                )
        anchor = rows["transformers"]["decode_tok_s"]
        for impl, r in rows.items():
            limit = r["gbs"] * 1e9 / bytes_per_token
            print(
                f"| {name} | {spec['dtype']} | {impl} | {r['prefill_tok_s']:.1f} | "
                f"{r['decode_tok_s']:.2f} | {r['decode_tok_s'] / anchor:.2f}x | {r['gbs']:.1f} | "
                f"{limit:.2f} | {r['of_limit']:.0%} | {r['peak_rss_gib']:.2f} |"
            )
    print("\n" + "\n".join(notes))

if __name__ == "__main__":
    main()
