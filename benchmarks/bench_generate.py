"""Generation speed and memory: our engine vs transformers' `generate`, same checkpoint, one run.

For each config (tiny: weights in cache, the step is all per-token overhead; small: 19 MB of fp32
weights, overhead plus memory traffic; the CodeGemma 2B shape: reading the weights dominates) a
random-weight checkpoint is written once, then each implementation runs in its own subprocess (so
peak RSS is its own): greedy, batch 1 (see --batch), a fixed prompt, no early stop, --rounds
generations. Every token is timed on its own (our engine's steps; transformers' streamer), so
  prefill tok/s = prompt tokens / time to the first new token (median over the generations)
  decode tok/s  = tokens decoded / time spent decoding them (all generations)
The decode limit is the machine's memory bandwidth / bytes of weights read per token. On a shared
machine the bandwidth moves by 2x within seconds, so it is measured (the fastest of several
streaming reads of 1 GiB, see memory_bandwidth_gbs) before each generation, after it, and for the
2B every 8 decoded tokens (untimed); each stretch of decoding between two probes is compared with
the higher of the two, and "% of limit" is the median over the stretches (their spread is printed
below the table). A config whose weights fit in the last-level cache has no such limit ("in cache").

With --batch B, B prompts of one length are decoded together (one step reads the weights once
for all of them): tok/s count every row's tokens, and the limit is B x bandwidth / bytes per step.

    python benchmarks/bench_generate.py                  # tiny, small and 2b (bf16)
    python benchmarks/bench_generate.py --configs 2b --rounds 9
    python benchmarks/bench_generate.py --configs 2b --batch 8 --prompt-len 32 --new-tokens 32
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

# probe_every: decoded tokens between bandwidth probes; 0 where the weights fit in the last-level
# cache, which a probe would flush in the middle of the generation
CONFIGS = {
    "small": dict(preset="tiny", overrides=TRAIN_CONFIGS["small"], dtype="float32", probe_every=0),
    # the test preset: weights fit in cache, so the step is all per-token overhead
    "tiny": dict(preset="tiny", overrides={}, dtype="float32", probe_every=0),
    "2b": dict(preset="2b", overrides={}, dtype="bfloat16", probe_every=8),
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


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), 0 where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


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


class Clock:
    """Times each token of one generation (`tick` after each; the first is the prefill) and measures
    the memory bandwidth (`probe`) before the first token, after every `probe_every` decoded
    tokens (0: none in between) and after the last, outside the timed intervals, so that each
    segment of decoding between two probes is compared with the bandwidth of those seconds.
    Also a transformers streamer: `put` gets the prompt, then each new token."""

    def __init__(self, probe, probe_every: int, started: bool = True) -> None:
        self.probe, self.every, self.started = probe, probe_every, started
        self.durations: list[float] = []
        self.marks = [(0, probe())]  # (tokens decoded so far, GB/s measured then)
        self.last = time.perf_counter()

    def tick(self) -> None:
        self.durations.append(time.perf_counter() - self.last)
        decoded = len(self.durations) - 1
        if self.every and decoded and decoded % self.every == 0:
            self.marks.append((decoded, self.probe()))
        self.last = time.perf_counter()

    def put(self, value) -> None:
        if self.started:
            self.tick()
        else:  # the prompt, as generate() begins
            self.started, self.last = True, time.perf_counter()

    def end(self) -> None:
        pass

    def segments(self) -> list[dict]:
        """Per stretch between two probes: tokens, seconds, and the higher of the two probes."""
        decoded = len(self.durations) - 1
        if self.marks[-1][0] != decoded:
            self.marks.append((decoded, self.probe()))
        return [
            {"tokens": c1 - c0, "seconds": sum(self.durations[1 + c0 : 1 + c1]), "gbs": max(g0, g1)}
            for (c0, g0), (c1, g1) in zip(self.marks, self.marks[1:], strict=False)
        ]


def worker(
    impl: str,
    model_dir: str,
    prompt_len: int,
    new_tokens: int,
    dtype: str,
    rounds: int,
    probe_every: int,
    batch: int,
) -> dict:
    torch.manual_seed(0)
    buffer = None

    def probe() -> float:
        return memory_bandwidth_gbs(repeats=1, buffer=buffer) if buffer is not None else 0.0

    if impl == "ours":
        from codegemma.checkpoint import load_model
        from codegemma.engine import Engine, SamplingParams

        model, config = load_model(model_dir, dtype=getattr(torch, dtype), device="cpu")
        # token ids only (random weights, no tokenizer); no prefix cache: every generation
        # prefills its prompt again, as transformers' generate does; no speculation: every step
        # decodes one token, which is what the bandwidth limit and the per-token clock measure
        # (random weights repeat tokens, so prompt lookup would flatter them: bench_speculative.py)
        engine = Engine(
            model,
            max_batch_size=batch,
            prefix_cache=False,
            prefill_tokens=batch * prompt_len,
            speculative=False,
        )
        prompts = torch.randint(200, config.vocab_size, (batch, prompt_len)).tolist()

        def run(n: int) -> Clock:
            for prompt in prompts:
                engine.submit(prompt, SamplingParams(max_new_tokens=n))
            clock = Clock(probe, probe_every)
            while engine.has_work():
                engine.step()  # the first step prefills (all rows), each later one decodes a token
                clock.tick()
            assert len(clock.durations) == n
            return clock
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)
        )
        model.eval()
        vocab = model.config.vocab_size
        ids = torch.randint(200, vocab, (batch, prompt_len))

        def run(n: int) -> Clock:
            clock = Clock(probe, probe_every, started=False)
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
            assert out.shape[1] == prompt_len + n and len(clock.durations) == n
            return clock

    run(2)  # warm-up
    run(new_tokens)  # the peak memory of a whole generation...
    peak = peak_rss_bytes()  # ...read before the bandwidth probe allocates its 1 GiB
    buffer = torch.ones(2**30 // 4)
    prefill, segments = [], []
    for _ in range(rounds):
        clock = run(new_tokens)
        prefill.append(prompt_len / clock.durations[0])
        segments += clock.segments()
    return {
        "prefill_tok_s": statistics.median(prefill),
        "segments": segments,
        "peak_rss_gib": peak / 2**30,
    }


def run_worker(impl: str, model_dir: Path, args, dtype: str, probe_every: int) -> dict:
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
        "--probe-every",
        str(probe_every),
        "--batch",
        str(args.batch),
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
    parser.add_argument("--rounds", type=int, default=3, help="timed generations")
    parser.add_argument(
        "--batch", type=int, default=1, help="sequences decoded together (prompts of one length)"
    )
    parser.add_argument(
        "--probe-every",
        type=int,
        help="decoded tokens between bandwidth probes (default: the config's; 0: only before "
        "and after each generation)",
    )
    args = parser.parse_args()
    if args.worker:
        result = worker(
            args.worker,
            args.model_dir,
            args.prompt_len,
            args.new_tokens,
            args.dtype,
            args.rounds,
            args.probe_every or 0,
            args.batch,
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
        f"# prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, batch "
        f"{args.batch}; "
        f"{args.rounds} timed generations each, bandwidth probed between stretches of decoding\n"
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
            # a step reads the weights once for all rows of the batch
            bytes_per_step = (
                config.num_parameters * torch.finfo(getattr(torch, spec["dtype"])).bits / 8
            )
            # weights that fit in the last-level cache are not read from memory each step: no limit
            cached = bytes_per_step < last_level_cache_bytes()
            rows = {}
            for impl in ("transformers", "ours"):
                every = spec["probe_every"] if args.probe_every is None else args.probe_every
                r = run_worker(impl, model_dir, args, spec["dtype"], every)
                segs = r["segments"]
                ratios = [
                    x["tokens"] / x["seconds"] * bytes_per_step / (x["gbs"] * 1e9) for x in segs
                ]
                rows[impl] = {
                    "prefill_tok_s": r["prefill_tok_s"] * args.batch,
                    "decode_tok_s": args.batch
                    * sum(x["tokens"] for x in segs)
                    / sum(x["seconds"] for x in segs),
                    "gbs": statistics.median(x["gbs"] for x in segs),
                    "of_limit": statistics.median(ratios),
                    "peak_rss_gib": r["peak_rss_gib"],
                }
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
                if cached:
                    continue
                notes.append(
                    f"- {name} {impl}: {len(segs)} stretches of decoding between probes; decode / "
                    f"limit per stretch: min {min(ratios):.0%}, quartiles {q[0]:.0%} "
                    f"{q[1]:.0%} {q[2]:.0%}, max {max(ratios):.0%}"
                )
        anchor = rows["transformers"]["decode_tok_s"]
        for impl, r in rows.items():
            limit = args.batch * r["gbs"] * 1e9 / bytes_per_step
            limit_cells = "in cache | -" if cached else f"{limit:.2f} | {r['of_limit']:.0%}"
            print(
                f"| {name} | {spec['dtype']} | {impl} | {r['prefill_tok_s']:.1f} | "
                f"{r['decode_tok_s']:.2f} | {r['decode_tok_s'] / anchor:.2f}x | {r['gbs']:.1f} | "
                f"{limit_cells} | {r['peak_rss_gib']:.2f} |"
            )
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
