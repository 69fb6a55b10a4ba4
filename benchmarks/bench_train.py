"""Training throughput: trainer settings against today's, and against a plain PyTorch loop, one run.

Every loop trains the same random-init model (one of CONFIGS; "mini" is the bundled model's
shape) on the same token rows, written as real token shards: packed repository samples
`<bos> tokens <eos>` of exponentially distributed length (mean --sample-len), back to back and
cut into rows, as `codegemma data prepare` lays them out, so rows hold repository boundaries
(--sample-len 0: one sample, no boundary).
  variant  `codegemma.train.train(cfg)` with the settings of one of VARIANTS (precision,
           compile, repo_mask, micro-batch, threads) over today's defaults: data loader, lr
           schedule, clipping, loss-token counting, a metrics line every step (a host sync every
           step), progress bar off. 2W steps; its own per-step tokens/s of steps W+1..2W (the
           first W hold start-up, compilation and warm-up).
  plain    zero_grad / forward / cross entropy / backward / AdamW step on one fixed batch in
           today's precision (bf16 autocast on GPU, fp32 on CPU), W warm-up steps, then W steps
           each timed on its own (synchronised).
Each loop reports the median over its W measured steps. A round runs every loop once, in order;
--rounds rounds alternate them, so a burst of other load on a shared machine hits all of them
alike. The table gives each loop's median over rounds, and its ratio to the first variant (the
anchor, "today" by default) as the median of the per-round ratios, each taken between runs
minutes apart. MFU = flops_per_token * tokens/s / peak, with the FLOPs of train/metrics.py
(PaLM: 6N + attention) and the peak of the loop's compute dtype: --peak-flops, else the datasheet
bf16 peak of a known GPU, else the best matmul peak of this device measured in every round.
"loss" is the training loss of the last step (same seed, same rows): a check that a faster
setting trains the same model, not a convergence test (docs/training.md has that one).

    python benchmarks/bench_train.py --config mini --seq-len 512 --batch 16    # the bundled shape
    python benchmarks/bench_train.py --variants today,repo_mask    # the cost of repository masking
    python benchmarks/bench_train.py --config 2b --seq-len 2048 --batch 4 --steps 10   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from codegemma.config import ModelConfig
from codegemma.fileio import write_text_atomic

CONFIGS = {
    "small": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
    ),
    "mini": {},  # ModelConfig preset "mini": the bundled model (src/codegemma/assets/)
    "medium": dict(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=128,
        max_position_embeddings=4096,
    ),
    "2b": {},
}

# TrainConfig settings of each trainer variant over today's trainer ("today": the defaults as
# they were before repository masking; precision auto = fp32 on CPU, bf16 autocast on GPU).
# Two keys are the benchmark's own: "threads" (torch.set_num_threads for that run) and
# "batch_factor" (micro_batch_size = factor x --batch).
TODAY: dict[str, Any] = {"repo_mask": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "today": {},
    "repo_mask": {"repo_mask": True},
    "compile": {"compile": True},
    "bf16": {"precision": "bf16"},
    "bf16+compile": {"precision": "bf16", "compile": True},
    "bf16+compile+repo_mask": {"precision": "bf16", "compile": True, "repo_mask": True},
    "batch x2": {"batch_factor": 2},
    "1 thread": {"threads": 1},
}


def model_config(name: str) -> ModelConfig:
    if name == "mini":
        return ModelConfig.preset("mini")
    base = "2b" if name == "2b" else "tiny"
    return ModelConfig.preset(base, **CONFIGS[name], torch_dtype="float32")


def packed_stream(rng: np.random.Generator, tok: Any, n_tokens: int, sample_len: int) -> np.ndarray:
    """`<bos> random tokens <eos>` samples of exponential length (mean sample_len), back to back;
    one sample of n_tokens when sample_len is 0. Random tokens avoid the special ids 0..2."""
    if sample_len == 0:
        body = rng.integers(3, tok.vocab_size, n_tokens - 1)
        return np.concatenate([[tok.bos_id], body])
    parts, total = [], 0
    while total < n_tokens:
        n = max(1, int(rng.exponential(sample_len)))
        parts.append([tok.bos_id, *rng.integers(3, tok.vocab_size, n), tok.eos_id])
        total += n + 2
    return np.concatenate(parts)[:n_tokens]


def write_inputs(
    root: Path, config: ModelConfig, rows: int, seq_len: int, sample_len: int
) -> tuple[Path, Path]:
    """A tokenizer, a model dir (random init, seed 0) and packed-sample shards that fit both."""
    from codegemma.checkpoint import save_model
    from codegemma.data.shards import write_token_dataset
    from codegemma.model import GemmaForCausalLM
    from codegemma.tokenizer import Tokenizer
    from codegemma.train.tokenizer_trainer import train_tokenizer

    tok_dir = train_tokenizer(["def f(x):\n    return x + 1\n"] * 8, 512, root / "tok")
    tok = Tokenizer.load(tok_dir)
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    model.to_empty(device="cpu").init_weights(seed=0)
    save_model(model, config, root / "model")
    ids = packed_stream(np.random.default_rng(0), tok, rows * seq_len, sample_len)
    write_token_dataset(root / "shards", ids, tok, seq_len=seq_len)
    return tok_dir, root / "shards"


def variant_config(args: argparse.Namespace, name: str, run_dir: Path, root: Path) -> Any:
    from codegemma.train.config import TrainConfig

    settings = {**TODAY, **VARIANTS[name]}
    settings.pop("threads", None)
    batch = args.batch * settings.pop("batch_factor", 1)
    return TrainConfig(
        run_dir=str(run_dir),
        init_from=str(root / "model"),
        tokenizer=str(root / "tok"),
        data=str(root / "shards"),
        micro_batch_size=batch,
        max_steps=2 * args.steps,
        log_every=1,
        ckpt_every=2 * args.steps,
        eval_every=0,
        warmup_steps=1,
        progress=False,
        peak_flops=1.0,
        activation_checkpointing=args.activation_checkpointing,
        **settings,
    )


def run_variant(args: argparse.Namespace, name: str, run_dir: Path, root: Path) -> dict:
    """(tokens/s, last loss, compute dtype) of one trainer run with the variant's settings."""
    from codegemma.train.metrics import METRICS, read_metrics
    from codegemma.train.trainer import train

    cfg = variant_config(args, name, run_dir, root)
    threads = torch.get_num_threads()
    torch.set_num_threads(VARIANTS[name].get("threads", threads))
    torch._dynamo.reset()  # every compiled run starts from the same (empty) in-process cache
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    records = [r for r in read_metrics(run_dir / METRICS) if "tokens_per_s" in r]
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    return {
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in records[args.steps :]])),
        "loss": records[-1]["loss"],
        "dtype": torch.bfloat16 if bf16 else torch.float32,
    }


def run_plain(args: argparse.Namespace, root: Path, device: torch.device) -> dict:
    from codegemma.checkpoint import load_model
    from codegemma.data.shards import open_shards

    model, _ = load_model(root / "model", dtype=torch.float32, device=device)
    model.train()
    shards = open_shards(root / "shards")
    rows = np.stack([np.asarray(shards[i], dtype=np.int64) for i in range(args.batch)])
    batch = torch.from_numpy(rows).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    use_bf16 = device.type == "cuda"

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(args.steps):
        step()
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    return {"tokens_per_s": inputs.numel() / float(np.median(times)), "loss": loss, "dtype": dtype}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(rounds: list[dict[str, dict]], names: list[str]) -> dict[str, dict]:
    """Per loop: median tokens/s over rounds, and the median per-round ratio to names[0]."""
    anchor = names[0]
    out = {}
    for n in names:
        tps = [r[n]["tokens_per_s"] for r in rounds]
        ratios = [r[n]["tokens_per_s"] / r[anchor]["tokens_per_s"] for r in rounds]
        out[n] = {
            "tokens_per_s": statistics.median(tps),
            "rounds_tokens_per_s": tps,
            "ratio": statistics.median(ratios),
            "loss": rounds[-1][n]["loss"],
            "dtype": str(rounds[-1][n]["dtype"]).removeprefix("torch."),
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="mini")
    p.add_argument("--batch", type=int, default=16, help="rows per micro-batch of today's loop")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (inputs + 1)")
    p.add_argument("--sample-len", type=int, default=1024, help="mean repository sample length")
    p.add_argument("--steps", type=int, default=4, help="W: warm-up steps = timed steps")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of all loops")
    p.add_argument(
        "--variants",
        default="today,bf16,bf16+compile,bf16+compile+repo_mask",
        help=f"trainer variants, the first is the anchor; of: {', '.join(VARIANTS)}",
    )
    p.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch loop")
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    from codegemma.train.metrics import flops_per_token, peak_flops

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(args.config)
    rounds: list[dict[str, dict]] = []
    peaks: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    sources: dict[torch.dtype, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = 8 * args.batch * args.steps
        write_inputs(root, config, rows=rows, seq_len=args.seq_len, sample_len=args.sample_len)
        for r in range(args.rounds):
            results = {} if args.no_plain else {"plain": run_plain(args, root, device)}
            for n in names:
                results[n] = run_variant(args, n, root / f"round{r}-{n}", root)
            for dtype in peaks:
                peak, sources[dtype] = peak_flops(device, dtype, args.peak_flops)
                peaks[dtype].append(peak)
            rounds.append(results)
            line = ", ".join(f"{n} {v['tokens_per_s']:,.0f}" for n, v in results.items())
            print(f"round {r + 1}: tokens/s {line}", file=sys.stderr)
    loops = names if args.no_plain else [*names, "plain"]
    table = summarize(rounds, loops)
    peak = {str(d).removeprefix("torch."): max(v) for d, v in peaks.items()}
    fpt = flops_per_token(config, args.seq_len - 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    name += f" x{torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"model {args.config}: {config.num_parameters / 1e6:.1f}M params, batch {args.batch} x "
        f"{args.seq_len - 1} tokens, repository samples of mean {args.sample_len} tokens, "
        f"{name}; {fpt / 1e6:.1f} MFLOP/token; peaks "
        + ", ".join(
            f"{d} {v / 1e12:.3f} TFLOP/s ({sources[getattr(torch, d)]})" for d, v in peak.items()
        )
        + f"; median of {args.rounds} rounds"
    )
    print(f"| loop | tokens/s | x {names[0]} | MFU | loss at step {2 * args.steps} |")
    print("|---|---|---|---|---|")
    for n in loops:
        row = table[n]
        mfu = fpt * row["tokens_per_s"] / peak[row["dtype"]]
        label = "plain PyTorch loop" if n == "plain" else n
        print(
            f"| {label} | {row['tokens_per_s']:,.0f} | {row['ratio']:.2f} | {mfu:.1%} "
            f"({row['dtype']}) | {row['loss']:.4f} |"
        )
    if args.json:
        write_text_atomic(
            Path(args.json),
            json.dumps(
                {
                    "config": args.config,
                    "device": name,
                    "batch": args.batch,
                    "seq_len": args.seq_len,
                    "sample_len": args.sample_len,
                    "peak_flops": peak,
                    "flops_per_token": fpt,
                    "loops": table,
                },
                indent=1,
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
