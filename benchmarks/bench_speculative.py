"""Speculative decoding by prompt lookup: the engine with and without it, same model, same requests.

FIM requests on a real source file with repetitive code (the standard library's json/encoder.py):
  lines     a cursor at the start of --cursors lines in the middle of the file, the rest of the
            file after it as the suffix; a whole block is completed (up to --new-tokens).
  similar   a cursor in the middle of lines that resemble an earlier line of the file (their first
            half occurs earlier): the edit an editor sees when a line like others is typed; the
            rest of the line is completed (single-line mode).
Each in both FIM layouts (--fim-modes: PSM, CodeGemma's documented one, and SPM, where the
bundled model completes best). Each workload runs greedy through `Engine(speculative=False)` (one token per step), `=True`
(drafts at every step) and `="auto"` (the default: drafts while verify steps are faster, as
timed), the requests one at a time (--batch 1, an editor's latency) or --batch at once. Reported:
tokens per decode step (the tokens each sequence got per forward pass of the model in decode),
decode forward passes, draft tokens and the share accepted, decode tok/s (tokens from decode
steps / wall time of the decode steps; prefill is the same work in every engine) and whether
every text equals the plain engine's. Models: the bundled one (`codegemma.load()`)
and a random-weight model of its shape with its tokenizer (--random-std 0.3: text that never
repeats, so drafts are rare and refused; 0.02, the init default, writes one token over and over).

    python benchmarks/bench_speculative.py
    python benchmarks/bench_speculative.py --models bundled --batch 4 --cursors 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import codegemma
from codegemma import completion
from codegemma.engine import Engine
from codegemma.middle import FimRequest
from codegemma.model import GemmaForCausalLM

MODES = {"plain": False, "speculative": True, "auto": "auto"}


def source() -> str:
    return (Path(json.__file__).parent / "encoder.py").read_text()


def line_requests(cursors: int, fim_mode: str, context: int = 3000) -> list[FimRequest]:
    text = source()
    starts = [i + 1 for i, c in enumerate(text) if c == "\n"]
    middle = len(starts) // 2
    chosen = starts[middle - cursors // 2 : middle - cursors // 2 + cursors]
    return [
        FimRequest(
            prefix=text[max(0, c - context) : c],
            suffix=text[c : c + context // 3],
            mode="block",
            fim_mode=fim_mode,
        )
        for c in chosen
    ]


def similar_requests(cursors: int, fim_mode: str, context: int = 3000) -> list[FimRequest]:
    """Cursors halfway through lines whose first half (at least 12 characters) occurs earlier."""
    text, requests, offset = source(), [], 0
    for line in text.splitlines(keepends=True):
        body = line.strip()
        half = line[: len(line) - len(line.lstrip()) + len(body) // 2]
        if len(half.strip()) >= 12 and text.find(half, 0, offset) >= 0:
            cursor = offset + len(half)
            requests.append(
                FimRequest(
                    prefix=text[max(0, cursor - context) : cursor],
                    suffix=text[cursor : cursor + context // 3],
                    mode="line",
                    fim_mode=fim_mode,
                )
            )
        offset += len(line)
    step = max(1, len(requests) // cursors)
    return requests[::step][:cursors]


def random_model(like: GemmaForCausalLM, std: float) -> GemmaForCausalLM:
    model = GemmaForCausalLM(like.config).init_weights(std=std, seed=0)
    return model.to(like.model.embed_tokens.weight.dtype).eval()


def run(model, tokenizer, requests, mode, *, batch: int, new_tokens: int) -> dict:
    engine = Engine(model, tokenizer, max_batch_size=batch, speculative=MODES[mode])
    budget = engine.max_seq_len - new_tokens
    ids = [completion.build_prompt(tokenizer, r, budget) for r in requests]
    params = [
        completion.fim_params(tokenizer, single_line=r.single_line, max_new_tokens=new_tokens)
        for r in requests
    ]
    results, decode_seconds = [], 0.0
    for i in range(0, len(ids), batch):
        done = {}
        for j in range(i, min(i + batch, len(ids))):
            engine.submit(ids[j], params[j], request_id=j)
        while engine.has_work():
            prefill = engine.num_waiting > 0 and engine.num_active < engine.max_batch_size
            start = time.perf_counter()
            events = engine.step()
            if not prefill:
                decode_seconds += time.perf_counter() - start
            done.update({e.request_id: e.result for e in events if e.finished})
        results += [done[j] for j in sorted(done)]
    stats = engine.decode_stats
    return dict(
        texts=[r.text for r in results],
        tokens=sum(len(r.token_ids) for r in results),
        drafted=stats.draft_tokens,
        steps=stats.decode_steps,
        tokens_per_step=stats.tokens_per_step,
        decode_tokens=stats.decode_tokens,
        sequence_steps=stats.sequence_steps,
        acceptance=stats.acceptance_rate,
        tok_s=stats.decode_tokens / decode_seconds,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["random", "bundled"])
    ap.add_argument("--workloads", nargs="+", default=["lines", "similar"])
    ap.add_argument("--fim-modes", nargs="+", default=["psm", "spm"])
    ap.add_argument("--cursors", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--random-std", type=float, default=0.3, help="init std of the random model's weights"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cg = codegemma.load()
    models = {"bundled": cg.model, "random": random_model(cg.model, args.random_std)}
    workloads = {"lines": line_requests, "similar": similar_requests}
    settings = dict(batch=args.batch, new_tokens=args.new_tokens)
    print(
        f"| model | workload | layout | requests | tokens | engine | decode steps | tokens/step "
        f"| drafted | accepted | decode tok/s | same text |\n|{'---|' * 12}"
    )
    totals: dict[tuple[str, str], list[int]] = {}  # (model, engine) -> [tokens, steps]
    for name, workload, fim_mode in itertools.product(args.models, args.workloads, args.fim_modes):
        requests = workloads[workload](args.cursors, fim_mode)
        runs = {mode: run(models[name], cg.tokenizer, requests, mode, **settings) for mode in MODES}
        for mode, r in runs.items():
            same = r["texts"] == runs["plain"]["texts"]
            total = totals.setdefault((name, mode), [0, 0])
            total[0], total[1] = total[0] + r["decode_tokens"], total[1] + r["sequence_steps"]
            print(
                f"| {name} | {workload} | {fim_mode} | {len(requests)} | {r['tokens']} | {mode} "
                f"| {r['steps']} | {r['tokens_per_step']:.2f} | {r['drafted']} | {r['acceptance']:.0%} "
                f"| {r['tok_s']:.0f} | {'yes' if same else 'NO'} |",
                flush=True,
            )
    for (name, mode), (tokens, steps) in totals.items():
        print(f"{name} {mode}: {tokens / steps:.2f} tokens per decode step overall")


if __name__ == "__main__":
    main()
