"""Regenerate the bundled BC-HumanEval / BC-MBPP data by running BabelCode's own generator.

BabelCode (google-research/babelcode, Apache-2.0; Orlanski et al. 2023, arXiv:2302.01973)
translates HumanEval and MBPP into other languages with per-language templates. Its generated
files are not committed upstream, so this script runs its pipeline on a checkout you provide
(it fetches nothing) with a Python environment that has BabelCode's requirements:

    python scripts/babelcode_data.py generate --babelcode /tmp/babelcode \\
        --python /tmp/bcvenv/bin/python --commit d37a231

Per dataset it runs, in a scratch copy of the checkout (the checkout itself is not written):

    convert_dataset.py --dataset_name=D --input_path=data/raw_datasets/D_questions.jsonl
    generate_test_code.py --gin_file=configs/generate_code.gin \\
        --input=data/parsed_datasets/D.jsonl --output=data/problem_code/D
    scripts/make_validation_preds.py --name=D --problem_code_path=data/problem_code/D \\
        --output_path=data/validation_preds

and writes, under src/codegemma/eval/tasks/data/babelcode/, one `<dataset>-<lang>.jsonl.gz` per
set (a row = the language's `prompt_info.jsonl` row merged with its `testing_code.jsonl` row; see
`merge_rows`), one `<dataset>-<lang>.validation.jsonl.gz` (make_validation_preds' predictions:
a `return <first expected output>` stub, or the gold solution for Python), `languages.json`
(BabelCode's command lines, timeouts and file extensions, taken from its language registry, and
the stop words of data/language_stop_words.json) and `manifest.json` (counts, sha256 per set).
Gzip members have mtime 0, rows are JSON with sorted keys and the generator runs with
PYTHONHASHSEED=0 (it writes set literals in set iteration order), so a rerun is byte-identical.

`validate` runs BabelCode's own harness (evaluate_predictions.py, ALLOW_EXECUTION=true) and ours
(`codegemma.eval.tasks.babelcode`) on the same validation predictions and compares the verdict of
every problem and test case. It executes BabelCode's stubs and gold solutions only, never model
output, unsandboxed:

    python scripts/babelcode_data.py validate --babelcode /tmp/babelcode \\
        --python /tmp/bcvenv/bin/python --dataset humaneval --languages cpp,java --out /tmp/bcv
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from codegemma.eval.tasks import babelcode as bc  # noqa: E402
from codegemma.fileio import write_bytes_atomic, write_text_atomic  # noqa: E402

OUT = ROOT / "src" / "codegemma" / "eval" / "tasks" / "data" / "babelcode"
SCRATCH_IGNORE = ("parsed_datasets", "problem_code", "golden_predictions", "validation_preds")

# Run inside BabelCode's environment: its language registry is the source of the run specs.
DUMP_LANGUAGES = """
import json, pathlib, sys
sys.path.insert(0, ".")
from babelcode.languages import LanguageRegistry
out = {}
for name in sys.argv[1:]:
    lang = LanguageRegistry.get_language(name)
    cmds = lang.command_fn(pathlib.Path("__FILENAME__." + lang.file_ext))
    out[name] = {"file_ext": lang.file_ext, "commands": [c.command for c in cmds],
                 "timeouts": [c.timeout for c in cmds]}
print(json.dumps(out))
"""

# Runs evaluate_predictions.py with every command's timeout multiplied by BC_TIMEOUT_SCALE (the
# pool forks, so its workers inherit the patch); nothing else of BabelCode's harness changes.
SCALED_HARNESS = """
import copy, os, runpy, sys
sys.path.insert(0, ".")
from babelcode import execution
scale, original = float(os.environ["BC_TIMEOUT_SCALE"]), execution.safe_execute
def scaled(command, cwd, timeout_buffer=0.005):
    command = copy.copy(command)
    command.timeout = command.timeout * scale
    return original(command, cwd, timeout_buffer)
execution.safe_execute = scaled
sys.argv = ["evaluate_predictions.py", *sys.argv[1:]]
runpy.run_path("evaluate_predictions.py", run_name="__main__")
"""


def run(python: str, args: list[str], cwd: Path, env: dict | None = None) -> str:
    """Run one of BabelCode's scripts with its interpreter; stop with its output on failure.

    PYTHONHASHSEED is fixed: the generator writes set literals in Python's set iteration order,
    which for strings changes with the hash seed (a few BC-MBPP test programs differ run to run).
    """
    env = {**(env or os.environ), "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [python, *args], cwd=cwd, capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def scratch_copy(checkout: Path) -> Path:
    """A copy of the checkout without earlier outputs, so nothing stale is read back."""
    for required in ("convert_dataset.py", "generate_test_code.py", "data/raw_datasets"):
        if not (checkout / required).exists():
            sys.exit(f"{checkout} is not a BabelCode checkout: {required} is missing")
    dest = Path(tempfile.mkdtemp(prefix="babelcode-")) / "babelcode"
    shutil.copytree(checkout, dest, ignore=shutil.ignore_patterns(".git", *SCRATCH_IGNORE))
    return dest


def generate(work: Path, python: str, dataset: str) -> None:
    run(
        python,
        [
            "convert_dataset.py",
            f"--dataset_name={dataset}",
            f"--input_path=data/raw_datasets/{dataset}_questions.jsonl",
        ],
        work,
    )
    run(
        python,
        [
            "generate_test_code.py",
            "--gin_file=configs/generate_code.gin",
            f"--input=data/parsed_datasets/{dataset}.jsonl",
            f"--output=data/problem_code/{dataset}",
        ],
        work,
    )
    run(
        python,
        [
            "scripts/make_validation_preds.py",
            f"--name={dataset}",
            f"--problem_code_path=data/problem_code/{dataset}",
            "--output_path=data/validation_preds",
        ],
        work,
    )


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def merge_rows(prompt_rows: list[dict], code_rows: list[dict], language: str) -> list[dict]:
    """One row per problem: the prompt_info row, then the testing_code keys it lacks.

    The keys both files share agree (qid, language, entry_fn_name, entry_cls_name; checked),
    except `text`: prompt_info's is the description translated for the language (the one a
    prompt uses), testing_code's the original Python text, which test_code already embeds as a
    comment. The merged row keeps prompt_info's.
    """
    codes = {r["qid"]: r for r in code_rows if r["language"] == language}
    out = []
    for p in (r for r in prompt_rows if r["language"] == language):
        c = codes.pop(p["qid"])
        for key in ("qid", "language", "entry_fn_name", "entry_cls_name"):
            if c[key] != p[key]:
                sys.exit(f"{language}/{p['qid']}: {key} differs between the generator's files")
        out.append({**p, **{k: v for k, v in c.items() if k not in p}})
    if codes:
        sys.exit(f"{language}: testing_code rows without prompt_info: {sorted(codes)[:5]}")
    return out


def gzip_jsonl(rows: list[dict]) -> bytes:
    """Deterministic bytes: canonical JSON lines, gzip member with mtime 0 and no file name."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(bc.canonical_jsonl(rows).encode("utf-8"))
    return buf.getvalue()


def language_specs(work: Path, python: str, checkout: Path) -> dict:
    names = [bc.BABELCODE_NAMES[lang] for lang in bc.LANGUAGES]
    specs = json.loads(run(python, ["-c", DUMP_LANGUAGES, *names], work))
    stop_words = json.loads((checkout / "data" / "language_stop_words.json").read_text())
    return {
        lang: {"babelcode_name": name, **specs[name], "stop_words": stop_words.get(name, [])}
        for lang, name in zip(bc.LANGUAGES, names, strict=True)
    }


def cmd_generate(args: argparse.Namespace) -> None:
    checkout = Path(args.babelcode).resolve()
    work = scratch_copy(checkout)
    out = Path(args.out)
    manifest = {"source": "google-research/babelcode", "commit": args.commit, "sets": {}}
    try:
        for dataset, bc_name in bc.DATASETS.items():
            print(f"generating {bc_name} ...", flush=True)
            generate(work, args.python, bc_name)
            code_dir = work / "data" / "problem_code" / bc_name
            prompts = read_jsonl(code_dir / "prompt_info.jsonl")
            codes = read_jsonl(code_dir / "testing_code.jsonl")
            preds = read_jsonl(work / "data" / "validation_preds" / f"{bc_name}.jsonl")
            for lang in bc.LANGUAGES:
                name = bc.BABELCODE_NAMES[lang]
                rows = merge_rows(prompts, codes, name)
                qids = {r["qid"] for r in rows}
                stubs = [
                    {"qid": p["qid"], "language": name, "code": p["code"]}
                    for p in preds
                    if p["language"] == name and p["qid"] in qids
                ]
                if [s["qid"] for s in stubs] != [r["qid"] for r in rows]:
                    sys.exit(f"{bc_name}/{name}: validation predictions do not match problems")
                set_name = f"{dataset}-{lang}"
                write_bytes_atomic(out / f"{set_name}.jsonl.gz", gzip_jsonl(rows))
                write_bytes_atomic(out / f"{set_name}.validation.jsonl.gz", gzip_jsonl(stubs))
                manifest["sets"][set_name] = {"problems": len(rows), "sha256": bc.rows_sha256(rows)}
                print(f"  {set_name}: {len(rows)} problems sha256 {bc.rows_sha256(rows)}")
        specs = language_specs(work, args.python, checkout)
        write_text_atomic(
            out / "languages.json", json.dumps(specs, indent=1, sort_keys=True) + "\n"
        )
        write_text_atomic(
            out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        )
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


def their_verdicts(
    work: Path, python: str, dataset: str, langs: list[str], out: Path, scale: float
) -> dict:
    """Run BabelCode's evaluate_predictions.py on its validation predictions; per-problem results."""
    gin = out / "validation.gin"
    base = work / "configs" / "evaluation" / "base.gin"
    gin_text = (work / "configs" / "validation.gin").read_text()
    gin_text = gin_text.replace("'configs/evaluation/base.gin'", repr(str(base)))
    gin.write_text(gin_text.replace("num_workers=32", f"num_workers={os.cpu_count() or 1}"))
    names = [bc.BABELCODE_NAMES[lang] for lang in langs]
    preds = work / "data" / "validation_preds" / f"{dataset}.jsonl"
    env = {**os.environ, "ALLOW_EXECUTION": "true", "BC_TIMEOUT_SCALE": str(scale)}
    env["PATH"] = f"{Path(python).parent}{os.pathsep}{env['PATH']}"  # their `python` command
    run(
        python,
        [
            "-c",
            SCALED_HARNESS,
            f"--gin_file={gin}",
            "--experiment_name=theirs",
            f"--predictions={preds}",
            f"--output_path={out}",
            f"--test_code=data/problem_code/{dataset}",
            "--overwrite",
            "--samples=1",
            "--validation",
            f"--languages={','.join(names)}",
        ],
        work,
        env=env,
    )
    results = {}
    for row in read_jsonl(out / "theirs" / "pred_results.jsonl"):
        results[(row["language"], row["qid"])] = (row["outcome"], row["test_case_results"])
    return results


def our_verdicts(dataset: str, langs: list[str], workers: int, scale: float) -> dict:
    """Our assembly and runner on the same validation predictions."""
    jobs = []
    for lang in langs:
        problems = bc.by_qid(bc.load_babelcode(dataset, lang))
        for stub in bc.load_validation_predictions(dataset, lang):
            jobs.append((problems[stub["qid"]], stub["code"]))

    def one(job):
        problem, code = job
        with tempfile.TemporaryDirectory(prefix="bcv-") as tmp:
            program = bc.assemble(problem, code)
            result = bc.run_program_unsandboxed(
                problem.spec, program, Path(tmp), timeout_scale=scale
            )
        verdict = bc.verdict(result, problem.test_case_ids)
        key = (bc.BABELCODE_NAMES[problem.language], problem.qid)  # as BabelCode names it
        return key, (verdict.outcome, verdict.test_results)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, jobs))


def summarize(results: dict) -> dict:
    by_lang: dict[str, Counter] = {}
    for (language, _), (outcome, tests) in results.items():
        c = by_lang.setdefault(language, Counter())
        c[f"problems {outcome}"] += 1
        c["tests PASSED"] += sum(v == "PASSED" for v in tests.values())
        c["tests not PASSED"] += sum(v != "PASSED" for v in tests.values())
    return {k: dict(sorted(v.items())) for k, v in sorted(by_lang.items())}


def cmd_validate(args: argparse.Namespace) -> None:
    langs = args.languages.split(",")
    bc.require_toolchains(langs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = scratch_copy(Path(args.babelcode).resolve())
    dataset = bc.DATASETS[args.dataset]
    try:
        generate(work, args.python, dataset)
        theirs = their_verdicts(work, args.python, dataset, langs, out, args.timeout_scale)
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
    ours = our_verdicts(args.dataset, langs, args.workers, args.timeout_scale)
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    report = {
        "dataset": args.dataset,
        "theirs": summarize(theirs),
        "ours": summarize(ours),
        "problems compared": len(ours),
        "problems that differ": [f"{lang}/{qid}" for lang, qid in differ],
        "verdict sha256 (ours)": {
            lang: bc.verdicts_sha256(
                {q: ours[(n, q)][0] for n, q in ours if n == bc.BABELCODE_NAMES[lang]}
            )
            for lang in langs
        },
    }
    rows = [{"language": k[0], "qid": k[1], "theirs": theirs.get(k), "ours": ours[k]} for k in ours]
    write_text_atomic(out / "verdicts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    if differ:
        sys.exit(f"{len(differ)} problems differ; see {out / 'verdicts.jsonl'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "validate"):
        p = sub.add_parser(name)
        p.add_argument("--babelcode", required=True, help="a google-research/babelcode checkout")
        p.add_argument("--python", required=True, help="python of a venv with its requirements")
    gen = sub.choices["generate"]
    gen.add_argument("--commit", default="d37a231", help="the checkout's commit, for the manifest")
    gen.add_argument("--out", default=str(OUT))
    val = sub.choices["validate"]
    val.add_argument("--dataset", choices=sorted(bc.DATASETS), default="humaneval")
    val.add_argument("--languages", default=",".join(bc.LANGUAGES))
    val.add_argument("--out", required=True, help="directory for both harnesses' results")
    val.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    val.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="multiply every command's timeout, in both harnesses (for a loaded machine)",
    )
    args = parser.parse_args(argv)
    {"generate": cmd_generate, "validate": cmd_validate}[args.command](args)


if __name__ == "__main__":
    main()
