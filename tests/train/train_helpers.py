"""Helpers for trainer tests: small token shards written with the data pipeline's writer,
chat conversations for SFT, and a fast TrainConfig of the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

from codegemma.data.shards import write_token_dataset
from codegemma.tokenizer import Tokenizer
from codegemma.train.config import TrainConfig

SEQ_LEN = 33  # 32 inputs + 1 shifted target per row

TEXTS = (
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n',
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n"
    "    left = [x for x in xs[1:] if x < pivot]\n    right = [x for x in xs[1:] if x >= pivot]\n"
    "    return quicksort(left) + [pivot] + quicksort(right)\n",
)


def write_shards(
    out: Path, tok: Tokenizer, texts: list[str], *, seq_len: int, per_shard: int
) -> Path:
    """Documents as <bos> text <eos>, concatenated and cut into rows, `per_shard` rows a shard."""
    stream: list[int] = []
    for text in texts:
        stream += [tok.bos_id, *tok.encode(text), tok.eos_id]
    return write_token_dataset(out, stream, tok, seq_len=seq_len, rows_per_shard=per_shard)


CHATS = [
    [
        {"role": "user", "content": "add two numbers"},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "print hello"},
        {"role": "model", "content": "print('hello')"},
        {"role": "user", "content": "and in a loop?"},
        {"role": "model", "content": "for i in range(3):\n    print('hello')"},
    ],
    [
        {"role": "user", "content": "a stack class"},
        {"role": "model", "content": "class Stack:\n    def push(self, item):\n        pass"},
    ],
]


def write_chats(path: Path, repeat: int = 4) -> Path:
    lines = [json.dumps({"messages": m}) for _ in range(repeat) for m in CHATS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(run_dir: Path, data: Path, tokenizer: Path | None, **overrides) -> TrainConfig:
    """A seconds-long fp32 CPU run of the tiny preset: every step logged."""
    kw = dict(
        run_dir=str(run_dir),
        preset="tiny",
        data=str(data),
        tokenizer=None if tokenizer is None else str(tokenizer),
        max_steps=6,
        micro_batch_size=4,
        grad_accum=2,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        ckpt_every=2,
        eval_every=0,
        device="cpu",
        precision="fp32",
        progress=False,
        peak_flops=1e11,
    )
    kw.update(overrides)
    return TrainConfig(**kw)


def reference_config(run_dir: Path, data: Path, tokenizer: Path, **overrides) -> TrainConfig:
    """The session's reference run: 6 steps, checkpoints at 2, 4, 6, eval on a held-out tail."""
    return tiny_config(run_dir, data, tokenizer, eval_holdout=8, eval_every=2, **overrides)


def train_records(run_dir: Path) -> list[dict]:
    from codegemma.train.metrics import METRICS, read_metrics

    return [r for r in read_metrics(Path(run_dir) / METRICS) if "loss" in r]


def curve(run_dir: Path) -> list[tuple]:
    """(step, loss, lr, grad_norm) of every logged step: what must match exactly on resume."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in train_records(run_dir)]
