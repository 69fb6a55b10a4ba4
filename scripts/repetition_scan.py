"""How often the repetition rule (codegemma.middle.cut_repetition) would cut real code, and how
much of a weak model's output it removes.

Real code: windows of completion size (50-600 characters) at random places of this interpreter's
standard library sources (tests and generated tables included, so the worst case), each checked
as a whole text (the rule anywhere in it) and as the output of a generation that ran out of
tokens there (the tail rule too). Every hit is a false positive: that code is what the model
should write. Weak model: FIM completions of the bundled model at random points of the same files
(greedy and sampled), 128 tokens each; the share of them the rule cuts, and of their characters.

    python scripts/repetition_scan.py [--windows 5000] [--completions 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sysconfig
from pathlib import Path

from codegemma.middle import cut_repetition

SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


def sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.parts))


def windows(files: list[Path], count: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        try:
            text = rng.choice(files).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 700:
            continue
        start = rng.randrange(0, len(text) - 600)
        out.append(text[start : start + rng.randrange(50, 600)])
    return out


def scan_code(texts: list[str]) -> None:
    anywhere = [t for t in texts if cut_repetition(t) != t]
    at_limit = [t for t in texts if cut_repetition(t, exhausted=True) != t]
    print(f"real code: {len(texts)} windows of 50-600 characters")
    print(
        f"  cut as a whole text:                        {len(anywhere)} ({_pct(anywhere, texts)})"
    )
    print(
        f"  cut as a generation that ran out of tokens: {len(at_limit)} ({_pct(at_limit, texts)})"
    )
    for text in at_limit[:8]:
        cut = cut_repetition(text, exhausted=True)
        print(f"    e.g. ...{text[max(0, len(cut) - 30) : len(cut) + 40]!r}")


def scan_model(files: list[Path], count: int, rng: random.Random) -> None:
    import codegemma
    from codegemma import prompts

    cg = codegemma.load(device="cpu")
    pairs = []
    while len(pairs) < count:
        text = rng.choice(files).read_text(encoding="utf-8", errors="replace")
        if len(text) < 2000:
            continue
        at = rng.randrange(500, len(text) - 500)
        pairs.append((text[max(0, at - 1500) : at], text[at : at + 500]))
    ids = [prompts.fim_prompt(cg.tokenizer, p, s) for p, s in pairs]
    for temperature in (0.0, 0.8):
        results = cg.generate_results(ids, max_new_tokens=128, temperature=temperature, seed=0)
        cut = [cut_repetition(r.text, exhausted=r.finish_reason == "length") for r in results]
        hit = sum(c != r.text for c, r in zip(cut, results, strict=True))
        removed = sum(len(r.text) - len(c) for c, r in zip(cut, results, strict=True))
        total = sum(len(r.text) for r in results)
        print(
            f"bundled model, temperature {temperature}: {hit} of {len(results)} completions cut, "
            f"{removed} of {total} characters ({removed / max(total, 1):.0%}) removed"
        )


def _pct(part: list, whole: list) -> str:
    return f"{len(part) / len(whole):.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=5000)
    parser.add_argument("--completions", type=int, default=40, help="0: skip the model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    files = sources()
    scan_code(windows(files, args.windows, rng))
    if args.completions:
        scan_model(files, args.completions, rng)


if __name__ == "__main__":
    main()
