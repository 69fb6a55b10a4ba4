"""Prefix caching: the engine with and without it, same model, same requests, one run.

Two workloads, each run with `Engine(prefix_cache=True)` and `=False` (alternating, best of
--rounds), greedy:
  typing     an editor completing as the user types: one FIM request per keystroke while a line
             of a real source file (the standard library's json/encoder.py, from a cursor in its
             middle) is typed into the gap before the rest of the file: the text after the cursor
             stays, the text before it grows by a character (editors send the file from its start,
             or from a fixed point, and the rest after the cursor). Single-line completions of up
             to 16 tokens. In SPM order (suffix first) each request extends the previous one; in
             PSM the suffix follows the prefix, so only the text before the cursor is reused.
  infilling  the first --tasks HumanEval single-line infilling tasks through `complete_batch`
             (the evaluation's path): tasks of one problem share its prompt.
We report wall time, prompt tokens prefilled and prompt tokens taken from the cache.

    python benchmarks/bench_prefix_cache.py                  # the bundled model
    python benchmarks/bench_prefix_cache.py --model path/to/codegemma-2b --keystrokes 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import codegemma
from codegemma import completion
from codegemma.engine import Engine
from codegemma.eval.tasks import load_taskset
from codegemma.middle import FimRequest


def typing_requests(keystrokes: int, fim_mode: str, context: int = 3000) -> list[FimRequest]:
    source = (Path(json.__file__).parent / "encoder.py").read_text()
    cursor = source.index("\n", len(source) // 2) + 1  # the start of a line
    typed = source[cursor : cursor + keystrokes]  # the user types the next line(s) anew
    after = source[cursor + keystrokes : cursor + keystrokes + context // 3]
    return [
        FimRequest(
            prefix=source[cursor - context : cursor] + typed[:i],
            suffix=after,
            mode="line",
            fim_mode=fim_mode,
        )
        for i in range(keystrokes)
    ]


def infilling_requests(tasks: int) -> list[FimRequest]:
    return [
        FimRequest(prefix=t.prompt, suffix=t.suffix, mode="line")
        for t in load_taskset("humaneval-single-line", limit=tasks)
    ]


def run(cg, requests, *, cached: bool, one_by_one: bool, batch: int) -> dict:
    engine = Engine(cg.model, cg.tokenizer, max_batch_size=batch, prefix_cache=cached)
    start = time.perf_counter()
    if one_by_one:
        outs = [
            completion.complete_batch(engine, cg.tokenizer, [r], max_new_tokens=16)[0]
            for r in requests
        ]
    else:
        outs = completion.complete_batch(engine, cg.tokenizer, requests, max_new_tokens=16)
    return {
        "seconds": time.perf_counter() - start,
        "computed": engine.prompt_tokens_computed,
        "cached": engine.prompt_tokens_cached,
        "outputs": outs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--keystrokes", type=int, default=24)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cg = codegemma.load(args.model)
    workloads = {
        "typing, SPM": (typing_requests(args.keystrokes, "spm"), True, 1),
        "typing, PSM": (typing_requests(args.keystrokes, "psm"), True, 1),
        f"infilling, {args.tasks} tasks": (infilling_requests(args.tasks), False, 8),
    }
    print(f"model: {args.model or 'bundled'}, greedy, 16 new tokens per request\n")
    print(
        "| workload | requests | no cache s | cache s | speed-up | prefilled tokens "
        "(no cache -> cache) | cached tokens | same output |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (requests, one_by_one, batch) in workloads.items():
        best = {}
        for _ in range(args.rounds):
            for cached in (False, True):
                r = run(cg, requests, cached=cached, one_by_one=one_by_one, batch=batch)
                if cached not in best or r["seconds"] < best[cached]["seconds"]:
                    best[cached] = r
        off, on = best[False], best[True]
        same = sum(a == b for a, b in zip(off["outputs"], on["outputs"], strict=True))
        print(
            f"| {name} | {len(requests)} | {off['seconds']:.2f} | {on['seconds']:.2f} | "
            f"{off['seconds'] / on['seconds']:.2f}x | {off['computed']} -> {on['computed']} | "
            f"{on['cached']} | {same}/{len(requests)} |"
        )


if __name__ == "__main__":
    main()
