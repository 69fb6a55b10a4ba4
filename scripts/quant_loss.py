"""Held-out loss of a model in fp32 and quantized to Q8_0 and Q4_0: what quantization costs.

Held-out text: the CPython standard library files that scripts/stdlib_corpus.py puts in its
held-out split (the bundled model never trains on them): build/corpus/heldout/Lib where it is
staged, else the same files chosen from this interpreter's standard library by that script's own
rule (`stdlib_files` and `is_heldout` at its default fraction), so the list is the same wherever
the Python version is. Each file is <bos> + its tokens, cut into windows of --window predicted
tokens (each token predicted once, with the context of its window); the loss is the mean
next-token cross-entropy over all of them. Every variant computes in fp32 on the same windows;
the quantized ones are `codegemma.load(..., quantize=...)` (every matrix and the tied embedding in
ggml's blocks, norms in fp32), through the same code as inference (quant.py's kernels on CPU).

    python scripts/quant_loss.py                          # the bundled model: fp32, q8_0, q4_0
    python scripts/quant_loss.py --model DIR --max-tokens 50000
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from stdlib_corpus import is_heldout, stdlib_files  # noqa: E402

import codegemma  # noqa: E402

STAGED = Path("build/corpus/heldout/Lib")
HELDOUT_FRACTION = 0.02  # stdlib_corpus.py's default
Q8_0_TARGET = 0.01  # relative change of the loss


def heldout_files(staged: Path = STAGED) -> tuple[list[Path], str]:
    """The held-out stdlib files, and where they came from."""
    if staged.is_dir():
        files = sorted(staged.rglob("*.py"))
        if files:
            return files, str(staged)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in stdlib_files(root)
        if is_heldout(p.relative_to(root).as_posix(), HELDOUT_FRACTION)
    ]
    return files, f"{root} (stdlib_corpus.is_heldout, fraction {HELDOUT_FRACTION})"


def windows(tokenizer, files: list[Path], window: int, max_tokens: int | None) -> list[list[int]]:
    """Token windows of up to window + 1 ids (inputs and their next tokens), consecutive windows
    sharing one token, until max_tokens tokens are predicted."""
    out, predicted = [], 0
    for path in files:
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), bos=True)
        for start in range(0, len(ids) - 1, window):
            piece = ids[start : start + window + 1]
            if max_tokens is not None and predicted + len(piece) - 1 > max_tokens:
                piece = piece[: max_tokens - predicted + 1]
            if len(piece) > 1:
                out.append(piece)
                predicted += len(piece) - 1
            if max_tokens is not None and predicted >= max_tokens:
                return out
    return out


@torch.inference_mode()
def mean_loss(model, pieces: list[list[int]], batch: int) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, tokens predicted); windows of one length together."""
    total, count = 0.0, 0
    by_length: dict[int, list[list[int]]] = {}
    for p in pieces:
        by_length.setdefault(len(p), []).append(p)
    for group in by_length.values():
        for i in range(0, len(group), batch):
            ids = torch.tensor(group[i : i + batch])
            logits = model(ids[:, :-1]).float()
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += ids[:, 1:].numel()
    return total / count, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint (default: the bundled model)")
    parser.add_argument("--types", default="q8_0,q4_0")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=None, help="predict at most this many")
    args = parser.parse_args()
    files, source = heldout_files()
    base = codegemma.load(args.model, dtype="float32", device="cpu")
    pieces = windows(base.tokenizer, files, args.window, args.max_tokens)
    print(f"# model {base.path}; held-out: {len(files)} files from {source}")
    print(f"# windows of {args.window} tokens, fp32 compute\n")
    print("| weights | held-out loss (nats/token) | perplexity | vs fp32 | tokens | seconds |")
    print("|---|---|---|---|---|---|")
    variants = [("fp32", None)] + [(t, t) for t in args.types.split(",")]
    reference = None
    notes = []
    for name, quantize in variants:
        model = base.model if quantize is None else None
        if model is None:
            model = codegemma.load(
                args.model, dtype="float32", device="cpu", quantize=quantize
            ).model
        start = time.time()
        loss, count = mean_loss(model, pieces, args.batch)
        reference = loss if reference is None else reference
        change = loss / reference - 1
        print(
            f"| {name} | {loss:.5f} | {math.exp(loss):.3f} | {change:+.3%} | {count} | "
            f"{time.time() - start:.0f} |",
            flush=True,
        )
        if name == "q8_0":
            met = "met" if abs(change) <= Q8_0_TARGET else "NOT met"
            notes.append(f"- Q8_0 within {Q8_0_TARGET:.0%} of fp32: {met} ({change:+.3%})")
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
