"""lm-eval through our adapter (`--model codegemma`) vs lm-eval's own `hf` model.

The three local task shapes of tests/eval/data/lm_tasks (multiple choice with few-shot contexts
like ARC/MMLU, greedy generation with a regex answer like GSM8K, rolling perplexity like
wikitext), scaled to a few hundred requests, on one random-weight checkpoint of the "mini"
shape (the bundled model's: 2B-like MQA and GeGLU, vocab 8192) with the bundled tokenizer. Both
run fp32 on the CPU with the same threads and batch size, same machine, one process,
interleaved task by task and repeat by repeat (each repeat a freshly built model of each kind,
so no cache carries over). Prints, from the best of the repeats, requests/s for each and the
ratio, the ratio of CPU time too (what a loaded machine distorts least), and whether every
request's answer agrees (log-likelihoods within 1e-4 and the same greedy flags, identical
generations, rolling sums within fp32 rounding, equal metrics).

    .venv/bin/python benchmarks/bench_lm_eval.py [--questions 100] [--batch-size 8]
        [--threads N] [--repeats 3]

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import codegemma.eval.lm_harness as lm_harness  # switches Hugging Face libraries offline first
from codegemma.api import BUNDLED_MODEL
from codegemma.checkpoint import save_model
from codegemma.config import ModelConfig
from codegemma.model import GemmaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "tests" / "eval" / "data" / "lm_tasks"
TASKS = {
    "codegemma_test_mc": "loglikelihood",
    "codegemma_test_gen": "generate_until",
    "codegemma_test_ppl": "loglikelihood_rolling",
}


def make_checkpoint(out: Path) -> Path:
    model = GemmaForCausalLM(ModelConfig.preset("mini")).init_weights(std=0.1, seed=0)
    save_model(model, model.config, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(BUNDLED_MODEL / name, out / name)
    return out


def make_tasks(out: Path, questions: int) -> Path:
    """The test tasks' YAML files over larger data of the same shape."""
    out.mkdir(parents=True)
    for yaml in TASK_DIR.glob("*.yaml"):
        shutil.copy(yaml, out / yaml.name)
    shutil.copy(TASK_DIR / "mc_train.jsonl", out / "mc_train.jsonl")
    rng = random.Random(0)
    words = ["list", "dict", "tuple", "set", "string", "integer", "generator", "module", "class"]
    mc, gen = [], []
    for i in range(questions):
        a, b = rng.randrange(100), rng.randrange(100)
        if i % 2:
            choices = [str(a + b + d) for d in (0, 1, -1, 10)]
            question = f"What is {a} plus {b}?"
        else:
            choices = [f"a {w} of {rng.choice(words)}s" for w in rng.sample(words, 4)]
            question = f"Which {rng.choice(words)} holds {a} items in order?"
        mc.append({"question": question, "choices": choices, "label": rng.randrange(4)})
        if i < questions // 2:
            gen.append({"question": f"What is {a} times {b}?", "answer": f"#### {a * b}"})
    _jsonl(out / "mc.jsonl", mc)
    _jsonl(out / "gen.jsonl", gen)
    docs = [json.loads(line)["text"] for line in (TASK_DIR / "ppl.jsonl").read_text().splitlines()]
    _jsonl(out / "ppl.jsonl", [{"text": docs[i % len(docs)] * (1 + i % 3)} for i in range(12)])
    return out


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(lm, task: str, manager: TaskManager) -> tuple[dict, float, float]:
    """lm-eval's results, wall seconds and CPU seconds (this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = lm_eval.simple_evaluate(
        lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True
    )
    return results, time.perf_counter() - wall, time.process_time() - cpu


def agree(kind: str, ours: dict, theirs: dict, task: str) -> tuple[bool, int]:
    """Whether every request's answer agrees, and how many requests there were."""
    pairs = list(zip(ours["samples"][task], theirs["samples"][task], strict=True))
    same, requests, counted = True, 0, set()
    for mine, hf in pairs:
        first = mine["doc_id"] not in counted  # a document has one record per filter
        counted.add(mine["doc_id"])
        for a, b in zip(mine["resps"], hf["resps"], strict=True):
            requests += first
            if kind == "loglikelihood":
                same &= abs(a[0][0] - b[0][0]) <= 1e-4 and a[0][1] == b[0][1]
            elif kind == "loglikelihood_rolling":
                same &= math.isclose(a[0], b[0], rel_tol=1e-6, abs_tol=1e-4)
            else:
                same &= a == b
    return same and _metrics_agree(ours["results"][task], theirs["results"][task]), requests


def _metrics_agree(ours: dict, theirs: dict) -> bool:
    """Equal metrics (perplexities, sums of many fp32 terms, to a relative 1e-5)."""
    if ours.keys() != theirs.keys():
        return False
    for key, value in ours.items():
        other = theirs[key]
        if isinstance(value, float) and isinstance(other, float):
            if not (math.isclose(value, other, rel_tol=1e-5) or value == other):
                return False
        elif value != other:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, the best counts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_lm_eval."))
    cwd = os.getcwd()
    try:
        checkpoint = make_checkpoint(work / "mini")
        tasks = make_tasks(work / "tasks", args.questions)
        os.chdir(tasks)  # the YAMLs' data files are relative paths
        manager = TaskManager(include_path=str(tasks), include_defaults=False)

        def ours():
            return lm_harness.CodeGemmaLM(
                str(checkpoint), dtype="float32", device="cpu", batch_size=args.batch_size
            )

        def hf():
            return HFLM(
                pretrained=str(checkpoint),
                device="cpu",
                dtype="float32",
                batch_size=args.batch_size,
                add_bos_token=True,
            )

        rows = []
        for task, kind in TASKS.items():
            best = {"ours": (math.inf, math.inf), "hf": (math.inf, math.inf)}
            same = True
            for _ in range(args.repeats):
                mine, wall, cpu = run(ours(), task, manager)
                best["ours"] = min(best["ours"][0], wall), min(best["ours"][1], cpu)
                theirs, wall, cpu = run(hf(), task, manager)
                best["hf"] = min(best["hf"][0], wall), min(best["hf"][1], cpu)
                agreed, n = agree(kind, mine, theirs, task)
                same &= agreed
            (w_ours, c_ours), (w_hf, c_hf) = best["ours"], best["hf"]
            rows.append((kind, n, n / w_ours, n / w_hf, w_hf / w_ours, c_hf / c_ours, same))
        print(
            f"torch {torch.__version__}, lm-eval {lm_eval.__version__}, {torch.get_num_threads()}"
            f" threads, ModelConfig 'mini' random weights, fp32, batch size {args.batch_size}, "
            f"best of {args.repeats}"
        )
        print(
            "| request type | requests | codegemma req/s | hf req/s | speed-up | "
            "speed-up (CPU time) | identical |"
        )
        print("|---|---:|---:|---:|---:|---:|---|")
        for kind, n, ours_rps, hf_rps, ratio, cpu_ratio, same in rows:
            print(
                f"| {kind} | {n} | {ours_rps:.1f} | {hf_rps:.1f} | {ratio:.2f}x | "
                f"{cpu_ratio:.2f}x | {same} |"
            )
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
