"""A short scaling sweep for the bundled model: vocabulary, width and depth at one token budget.

Each candidate is trained from scratch by `codegemma train` (the bundled model's config, with the
shape and data overridden) on the same number of tokens, and scored by its held-out loss in
**bits per byte** of the held-out text, so that tokenizers of different vocabularies compare
fairly (a larger vocabulary puts more bytes in each token). Wall time and tokens/s are recorded
too: the bundled model's size is chosen for what the full run can afford, not only for the loss
at this budget (docs/training.md, "The bundled model").

    python scripts/scaling_sweep.py --out build/sweep/result.json \
        --data 8192=build/sweep/data8192:build/sweep/heldout8192 ... \
        --shape 6x256 --shape 4x192 --steps 120

A `--data V=TRAIN:HELDOUT` names the prepared shards (and held-out shards) of vocabulary V; a
`--shape LxH` a depth and width (GeGLU width 4H, head dim 64, one kv head, as the mini preset).
Every shape runs at the first vocabulary; every vocabulary at the first shape.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codegemma.config import ModelConfig
from codegemma.data.shards import open_shards
from codegemma.fileio import write_text_atomic
from codegemma.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "codegemma-tiny.toml"


@dataclass(frozen=True)
class Candidate:
    vocab: int
    layers: int
    hidden: int

    @property
    def name(self) -> str:
        return f"v{self.vocab}-{self.layers}x{self.hidden}"

    def model_config(self) -> ModelConfig:
        return ModelConfig.preset(
            "mini",
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=4 * self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=max(1, self.hidden // 64),
            head_dim=64,
        )


def bytes_per_token(heldout: Path) -> float:
    """UTF-8 bytes of the held-out text per token, from its shards (special tokens not counted
    as text, so every vocabulary is scored on the same bytes)."""
    manifest = json.loads((heldout / "manifest.json").read_text())
    tok = Tokenizer.load(manifest["tokenizer"]["path"])
    n_bytes = n_tokens = 0
    for row in open_shards(heldout):
        ids = np.asarray(row).tolist()
        n_tokens += len(ids)
        n_bytes += len(tok.decode(ids).encode("utf-8"))
    return n_bytes / n_tokens


def train(cand: Candidate, data: Path, heldout: Path, out: Path, steps: int) -> dict:
    run = out / cand.name
    cfg = cand.model_config()
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run)
    eval_rows = sum(1 for _ in open_shards(heldout))
    cmd = [
        str(ROOT / ".venv" / "bin" / "codegemma"),
        "train",
        "--config",
        str(CONFIG),
        "--run-dir",
        str(run / "run"),
        "--preset",
        "none",
        "--model-config",
        str(run / "config.json"),
        "--data",
        str(data),
        "--eval-data",
        str(heldout),
        "--max-steps",
        str(steps),
        "--warmup-steps",
        str(max(1, steps // 20)),
        "--eval-every",
        str(steps),
        "--eval-batches",
        str(math.ceil(eval_rows / 16)),
        "--ckpt-every",
        str(steps),
        "--keep-checkpoints",
        "1",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [
        json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in records if "eval_loss" in r]
    trains = [r for r in records if "tokens_per_s" in r]
    return {
        "name": cand.name,
        "vocab": cand.vocab,
        "layers": cand.layers,
        "hidden": cand.hidden,
        "parameters": cfg.num_parameters,
        "non_embedding_parameters": cfg.num_non_embedding_parameters,
        "steps": steps,
        "tokens": trains[-1]["tokens"],
        "eval_loss": evals[-1]["eval_loss"],
        "tokens_per_s": trains[-1]["tokens_per_s"],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True, metavar="V=TRAIN:HELDOUT")
    ap.add_argument("--shape", action="append", required=True, metavar="LxH")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", type=Path, required=True, help="result JSON (runs beside it)")
    args = ap.parse_args()

    datasets: dict[int, tuple[Path, Path]] = {}
    for spec in args.data:
        vocab, _, paths = spec.partition("=")
        train_dir, _, heldout_dir = paths.partition(":")
        datasets[int(vocab)] = (Path(train_dir), Path(heldout_dir))
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shape]
    first_vocab = next(iter(datasets))
    cands = [Candidate(first_vocab, L, H) for L, H in shapes]
    cands += [Candidate(v, *shapes[0]) for v in datasets if v != first_vocab]

    out_dir = args.out.parent / "runs"
    results = []
    for cand in cands:
        data, heldout = datasets[cand.vocab]
        res = train(cand, data, heldout, out_dir, args.steps)
        res["bytes_per_token"] = bytes_per_token(heldout)
        res["bits_per_byte"] = res["eval_loss"] / math.log(2) / res["bytes_per_token"]
        results.append(res)
        print(
            f"{res['name']:>16}  params {res['parameters']:>10,}  eval loss {res['eval_loss']:.3f}"
            f"  bits/byte {res['bits_per_byte']:.3f}  {res['tokens_per_s']:,.0f} tok/s"
            f"  {res['wall_s']:.0f} s",
            flush=True,
        )
    write_text_atomic(args.out, json.dumps({"steps": args.steps, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
