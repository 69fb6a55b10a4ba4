"""Programs per second on BabelCode's validation stubs: our harness vs BabelCode's own.

The predictions are BabelCode's own validation predictions (bundled in
data/babelcode/*.validation.jsonl.gz: a stub returning the first test's expected output, or for
Python the gold solution), the same for both harnesses, in one run. Ours runs each program in its
BabelCodeSandbox (namespaces, own uid, seccomp, rlimits) with what the run reuses between
programs (babelcode.REUSE: a precompiled bits/stdc++.h, JVM class-data-sharing archives, Go's
link without symbol table and DWARF, an empty virtual environment for Python);
`--no-reuse` adds a column without it (the harness before that change). BabelCode's
evaluate_predictions.py runs from a checkout you give (google-research/babelcode at d37a231) with
the Python of a venv holding its requirements; its test code is written from our bundled rows
(the fields its harness reads: test_code, entry names, test_case_ids, title, metadata). Both use
the same number of parallel workers and the same timeouts (times `--timeout-scale`, for a loaded
machine: the stubs' verdicts do not depend on time). Timed: our execution, and apart (and in
the totals) the one-off build of what is reused ("prepare"); their `execute_predictions` only
(not their TensorFlow import or metrics). CPU seconds per program count every process of each
harness (ours: prepare included). Verdicts (outcome and every test case) are compared between
the two harnesses and with tests/eval/data/babelcode_verdicts.json.gz (their harness, recorded).

    .venv/bin/python benchmarks/bench_babelcode.py --langs cpp,java --limit 20 \\
        [--sets humaneval,mbpp] [--workers 2] [--no-reuse] [--timeout-scale 3] \\
        [--babelcode /tmp/babelcode --babelcode-python /tmp/bcvenv/bin/python]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from codegemma.eval.execution import babelcode_sandbox, judge_babelcode
from codegemma.eval.tasks import babelcode as bc

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "eval" / "data" / "babelcode_verdicts.json.gz"

# Run with BabelCode's interpreter in its checkout: evaluate_predictions.py as its own main, with
# every command's timeout scaled and the wall and CPU time of execute_predictions (its pool of
# workers running the commands) written to $BENCH_TIMES.
THEIR_SHIM = """
import copy, json, os, resource, runpy, sys, time
sys.path.insert(0, ".")
from babelcode import execution
scale, safe_execute, execute_predictions = (
    float(os.environ["BENCH_SCALE"]), execution.safe_execute, execution.execute_predictions)
def scaled(command, cwd, timeout_buffer=0.005):
    command = copy.copy(command)
    command.timeout = command.timeout * scale
    return safe_execute(command, cwd, timeout_buffer)
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
def timed(*args, **kwargs):
    wall, used = time.perf_counter(), cpu()
    out = execute_predictions(*args, **kwargs)
    with open(os.environ["BENCH_TIMES"], "w") as f:
        json.dump({"wall_s": time.perf_counter() - wall, "cpu_s": cpu() - used}, f)
    return out
execution.safe_execute, execution.execute_predictions = scaled, timed
sys.argv = ["evaluate_predictions.py", *sys.argv[1:]]
runpy.run_path("evaluate_predictions.py", run_name="__main__")
"""

GIN = """include '{base}'
metrics:
  num_preds_per_question=1
  k_vals=[1]
  subsampling_rounds=1
  subsampling_iter_per_round=10
format_output_metrics:
  question_key_format='{{language}}/question/{{question_id}}'
  language_key_format='{{language}}/{{field}}'
execution:
  num_workers={workers}
  update_freq=25
"""


@dataclass
class Timing:
    wall_s: float
    cpu_s: float
    prepare_s: float = 0.0
    verdicts: dict = field(default_factory=dict)  # qid -> (outcome, {test id: result})


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_ours(
    dataset: str, lang: str, stubs: list[dict], workers: int, scale: float, reuse: bool
) -> Timing:
    """Every stub through our harness: prepare (what is reused), then the programs."""
    problems = bc.by_qid(bc.load_babelcode(dataset, lang))
    timeout = max(bc.language_spec(lang).timeouts) * scale
    start, used = time.perf_counter(), _cpu()
    sandbox = babelcode_sandbox(lang, timeout, reuse=reuse)
    prepared = time.perf_counter()
    try:
        with ThreadPoolExecutor(workers) as pool:
            judged = list(
                pool.map(
                    lambda s: judge_babelcode(problems[s["qid"]], s["code"], sandbox=sandbox),
                    stubs,
                )
            )
    finally:
        sandbox.close()  # reaps the zygote: its runs' CPU time is then ours to count
    verdicts = {
        s["qid"]: (v.outcome, v.test_results) for s, (v, _) in zip(stubs, judged, strict=True)
    }
    return Timing(time.perf_counter() - start, _cpu() - used, prepared - start, verdicts)


def run_theirs(
    checkout: Path,
    python: str,
    dataset: str,
    lang: str,
    stubs: list[dict],
    workers: int,
    scale: float,
    scratch: Path,
) -> Timing:
    """The same stubs through BabelCode's evaluate_predictions.py (its --validation mode)."""
    name = f"{dataset}-{lang}"
    work = scratch / name
    code_dir = work / "test_code"
    code_dir.mkdir(parents=True)
    wanted = {s["qid"] for s in stubs}
    rows = [p.row for p in bc.load_babelcode(dataset, lang) if p.qid in wanted]
    (code_dir / "testing_code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = work / "predictions.jsonl"
    preds.write_text("".join(json.dumps(s) + "\n" for s in stubs))
    gin = work / "bench.gin"
    base = checkout / "configs" / "evaluation" / "base.gin"
    gin.write_text(GIN.format(base=base, workers=workers))
    times = work / "times.json"
    env = {
        **os.environ,
        "ALLOW_EXECUTION": "true",
        "BENCH_SCALE": str(scale),
        "BENCH_TIMES": str(times),
        "PATH": f"{Path(python).parent}{os.pathsep}{os.environ['PATH']}",  # their `python`
    }
    argv = [
        python,
        "-c",
        THEIR_SHIM,
        f"--gin_file={gin}",
        "--experiment_name=theirs",
        f"--predictions={preds}",
        f"--output_path={work}",
        f"--test_code={code_dir}",
        "--overwrite",
        "--samples=1",
        "--validation",
        f"--languages={bc.BABELCODE_NAMES[lang]}",
    ]
    done = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not times.is_file():
        sys.exit(f"BabelCode's harness failed on {name}:\n{done.stderr[-3000:]}")
    t = json.loads(times.read_text())
    verdicts = {}
    for line in (work / "theirs" / "pred_results.jsonl").read_text().splitlines():
        row = json.loads(line)
        verdicts[row["qid"]] = (row["outcome"], row["test_case_results"])
    return Timing(t["wall_s"], t["cpu_s"], 0.0, verdicts)


def recorded_verdicts() -> dict:
    if not RECORDED.is_file():
        return {}
    data = json.loads(gzip.decompress(RECORDED.read_bytes()))
    return {
        name: {q: (v[0], v[1]) for q, v in entry["verdicts"].items()}
        for name, entry in data["sets"].items()
    }


def agreement(ours: dict, other: dict) -> str:
    shared = [q for q in ours if q in other]
    if not shared:
        return "-"
    return f"{sum(ours[q] == other[q] for q in shared)}/{len(shared)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--langs", default=",".join(bc.LANGUAGES))
    ap.add_argument("--sets", default="humaneval,mbpp", help="datasets: humaneval, mbpp")
    ap.add_argument("--limit", type=int, default=None, help="each set's first N problems")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout-scale", type=float, default=1.0)
    ap.add_argument("--no-reuse", action="store_true", help="also time ours without reuse")
    ap.add_argument("--babelcode", type=Path, help="a google-research/babelcode checkout")
    ap.add_argument("--babelcode-python", help="python of a venv with BabelCode's requirements")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    langs, datasets = args.langs.split(","), args.sets.split(",")
    for d in datasets:
        bc._check_dataset(d)
    bc.require_toolchains(langs)
    if args.babelcode and not args.babelcode_python:
        ap.error("--babelcode needs --babelcode-python (a venv with its requirements.txt)")
    if args.babelcode and not (args.babelcode / "evaluate_predictions.py").is_file():
        ap.error(f"{args.babelcode} is not a BabelCode checkout (no evaluate_predictions.py)")
    recorded = recorded_verdicts()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-babelcode-") as scratch:
        for dataset in datasets:
            for lang in langs:
                stubs = bc.load_validation_predictions(dataset, lang)[: args.limit]
                name = f"{dataset}-{lang}"
                print(f"{name}: {len(stubs)} programs ...", file=sys.stderr, flush=True)
                row = {"set": name, "programs": len(stubs)}
                ours = run_ours(dataset, lang, stubs, args.workers, args.timeout_scale, True)
                row["ours"] = ours
                if args.no_reuse:
                    row["plain"] = run_ours(
                        dataset, lang, stubs, args.workers, args.timeout_scale, False
                    )
                if args.babelcode:
                    row["theirs"] = run_theirs(
                        args.babelcode,
                        args.babelcode_python,
                        dataset,
                        lang,
                        stubs,
                        args.workers,
                        args.timeout_scale,
                        Path(scratch),
                    )
                rows.append(row)
                print_row(row, recorded.get(name, {}), file=sys.stderr)
    print_table(rows, recorded, args)


def rate(row: dict, key: str, prepare: bool = False) -> float | None:
    """Programs per second of the execution (with `prepare`: and of the one-off build of what
    the run reuses; BabelCode's harness has none, and its start-up is not timed either)."""
    t = row.get(key)
    return row["programs"] / (t.wall_s - (0 if prepare else t.prepare_s)) if t else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_row(row: dict, recorded: dict, file=sys.stdout) -> None:
    ours = row["ours"]
    theirs = row.get("theirs")
    print(
        f"  ours {fmt(rate(row, 'ours'))}/s (+ prepare {ours.prepare_s:.1f}s)"
        + (f", no reuse {fmt(rate(row, 'plain'))}/s" if "plain" in row else "")
        + (f", theirs {fmt(rate(row, 'theirs'))}/s" if theirs else "")
        + f"; agree with theirs {agreement(ours.verdicts, theirs.verdicts) if theirs else '-'}"
        + f", with recorded {agreement(ours.verdicts, recorded)}",
        file=file,
        flush=True,
    )
    for other, label in ((theirs.verdicts if theirs else {}, "theirs"), (recorded, "recorded")):
        for qid in (q for q in ours.verdicts if q in other and ours.verdicts[q] != other[q]):
            print(f"    {qid}: ours {ours.verdicts[qid]}, {label} {other[qid]}", file=file)


def print_table(rows: list[dict], recorded: dict, args) -> None:
    print(
        f"\nBabelCode validation stubs, {args.workers} workers, {os.cpu_count()} CPUs, "
        f"timeouts x{args.timeout_scale:g}, limit {args.limit or 'none'}\n"
    )
    print(
        "| set | programs | ours prog/s | + prepare s | ours, no reuse prog/s | BabelCode prog/s "
        "| ours / BabelCode | CPU-s/prog ours / BabelCode | verdicts agree (theirs, recorded) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    totals = {"ours": 0.0, "prepare": 0.0, "plain": 0.0, "theirs": 0.0, "n": 0}
    for row in rows:
        ours, theirs = row["ours"], row.get("theirs")
        ratio = rate(row, "ours") / rate(row, "theirs") if theirs else None
        cpu = f"{ours.cpu_s / row['programs']:.2f}"
        cpu += f" / {theirs.cpu_s / row['programs']:.2f}" if theirs else ""
        agree_theirs = agreement(ours.verdicts, theirs.verdicts) if theirs else "-"
        agree_rec = agreement(ours.verdicts, recorded.get(row["set"], {}))
        print(
            f"| {row['set']} | {row['programs']} | {fmt(rate(row, 'ours'))} | "
            f"{ours.prepare_s:.1f} | {fmt(rate(row, 'plain'))} | {fmt(rate(row, 'theirs'))} | "
            f"{fmt(ratio)}{'x' if ratio else ''} | {cpu} | {agree_theirs}, {agree_rec} |"
        )
        totals["n"] += row["programs"]
        totals["prepare"] += ours.prepare_s
        for key in ("ours", "plain", "theirs"):
            if key in row:
                totals[key] += row[key].wall_s - row[key].prepare_s
    n, ours_s, prep = totals["n"], totals["ours"], totals["prepare"]
    print(f"\nall sets: ours {n / ours_s:.2f} programs/s ({n / (ours_s + prep):.2f} with prepare)")
    if totals["theirs"]:
        print(
            f"BabelCode {n / totals['theirs']:.2f} programs/s: ours {totals['theirs'] / ours_s:.2f}x "
            f"({totals['theirs'] / (ours_s + prep):.2f}x with prepare)"
        )
    if totals["plain"]:
        print(
            f"reuse: {totals['plain'] / ours_s:.2f}x ours without it "
            f"({totals['plain'] / (ours_s + prep):.2f}x with prepare)"
        )
    if args.json:
        out = [
            {
                "set": r["set"],
                "programs": r["programs"],
                **{
                    k: {"wall_s": r[k].wall_s, "cpu_s": r[k].cpu_s, "prepare_s": r[k].prepare_s}
                    for k in ("ours", "plain", "theirs")
                    if k in r
                },
            }
            for r in rows
        ]
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
