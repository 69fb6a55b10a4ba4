"""Training throughput: our trainer vs a plain minimal PyTorch loop, same model and batch, one run.

Both train the same random-init model (one of CONFIGS) on the same token rows (random ids written
as real token shards), with AdamW and the same precision (bf16 autocast on GPU, fp32 on CPU):
  trainer  `codegemma.train.train(cfg)`: data loader, lr schedule, clipping, loss-token counting,
           a metrics line every step (so a host sync every step), progress bar off. 2W steps; its
           own per-step tokens/s of steps W+1..2W (the first W hold start-up and warm-up; the
           final checkpoint is written after the last measurement).
  plain    zero_grad / forward / cross entropy / backward / AdamW step on one fixed batch,
           W warm-up steps, then W steps each timed on its own (synchronised).
Each reports the median over its W measured steps. The pair runs --rounds times, alternating
(plain, trainer, plain, trainer, ...), and the table shows each loop's best round: on a shared
machine bursts of other load hit single steps and whole rounds; the median and the best round
filter them, and alternating gives both loops the same chances. The CPU matmul peak is measured
in every round too, and its best is used.
MFU = flops_per_token * tokens/s / peak, with the FLOPs of train/metrics.py (PaLM: 6N + attention)
and one peak for both: --peak-flops, else the datasheet bf16 peak of a known GPU, else a measured
matmul peak of this device (printed with its source).

    python benchmarks/bench_train.py                       # small config, CPU or GPU
    python benchmarks/bench_train.py --config 2b --seq-len 2048 --batch 4 --steps 10   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

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


def model_config(name: str) -> ModelConfig:
    base = "2b" if name == "2b" else "tiny"
    return ModelConfig.preset(base, **CONFIGS[name], torch_dtype="float32")


def write_inputs(root: Path, config: ModelConfig, rows: int, seq_len: int) -> tuple[Path, Path]:
    """A tokenizer, a model dir (random init, seed 0) and random-token shards that fit both."""
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
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, rows * seq_len)
    write_token_dataset(root / "shards", ids, tok, seq_len=seq_len)
    return tok_dir, root / "shards"


def run_trainer(args: argparse.Namespace, run_dir: Path, tok_dir: Path, data: Path) -> float:
    from codegemma.train.config import TrainConfig
    from codegemma.train.metrics import METRICS, read_metrics
    from codegemma.train.trainer import train

    w = args.steps
    cfg = TrainConfig(
        run_dir=str(run_dir),
        init_from=str(data.parent / "model"),
        tokenizer=str(tok_dir),
        data=str(data),
        micro_batch_size=args.batch,
        max_steps=2 * w,
        log_every=1,
        ckpt_every=2 * w,
        eval_every=0,
        warmup_steps=1,
        progress=False,
        peak_flops=1.0,
        activation_checkpointing=args.activation_checkpointing,
    )
    train(cfg)
    logged = [
        r["tokens_per_s"]
        for r in read_metrics(run_dir / METRICS)
        if "tokens_per_s" in r and r["step"] > w
    ]
    return float(np.median(logged))


def run_plain(args: argparse.Namespace, root: Path, data: Path, device: torch.device) -> float:
    from codegemma.checkpoint import load_model
    from codegemma.data.shards import open_shards

    model, _ = load_model(root / "model", dtype=torch.float32, device=device)
    model.train()
    rows = np.stack([np.asarray(open_shards(data)[i], dtype=np.int64) for i in range(args.batch)])
    batch = torch.from_numpy(rows).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    use_bf16 = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(inputs)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        opt.step()

    for _ in range(args.steps):
        step()
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return inputs.numel() / float(np.median(times))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--batch", type=int, default=8, help="rows per step (one micro-batch)")
    p.add_argument("--seq-len", type=int, default=257, help="tokens per row (inputs + 1)")
    p.add_argument("--steps", type=int, default=8, help="W: warm-up steps = timed steps")
    p.add_argument("--rounds", type=int, default=3, help="alternating plain/trainer rounds")
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    from codegemma.train.metrics import flops_per_token, peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args.config)
    rounds: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = 4 * args.batch * args.steps
        tok_dir, data = write_inputs(root, config, rows=rows, seq_len=args.seq_len)
        for r in range(args.rounds):
            plain = run_plain(args, root, data, device)
            ours = run_trainer(args, root / f"round{r}", tok_dir, data)
            peak, source = peak_flops(device, dtype, args.peak_flops)
            rounds.append((plain, ours, peak))
            print(
                f"round {r + 1}: plain {plain:,.0f} tok/s, trainer {ours:,.0f} tok/s, "
                f"peak {peak / 1e12:.3f} TFLOP/s",
                file=sys.stderr,
            )
    plain, ours, peak = (max(x) for x in zip(*rounds, strict=True))
    fpt = flops_per_token(config, args.seq_len - 1)
    cpu = f"CPU x{torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(
        f"model {args.config}: {config.num_parameters / 1e6:.1f}M params, batch {args.batch} x "
        f"{args.seq_len - 1} tokens, {str(dtype).removeprefix('torch.')}, {name}; "
        f"{fpt / 1e6:.1f} MFLOP/token; peak {peak / 1e12:.3f} TFLOP/s ({source}); "
        f"best of {args.rounds} rounds"
    )
    print("| loop | tokens/s | MFU |\n|---|---|---|")
    for label, tps in (("plain PyTorch loop", plain), ("codegemma trainer", ours)):
        print(f"| {label} | {tps:,.0f} | {fpt * tps / peak:.1%} |")
    print(f"trainer / plain = {ours / plain:.3f}")
    if args.json:
        write_text_atomic(
            Path(args.json),
            json.dumps(
                {
                    "config": args.config,
                    "device": name,
                    "dtype": str(dtype),
                    "peak_flops": peak,
                    "peak_source": source,
                    "flops_per_token": fpt,
                    "plain_tokens_per_s": plain,
                    "trainer_tokens_per_s": ours,
                },
                indent=1,
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
