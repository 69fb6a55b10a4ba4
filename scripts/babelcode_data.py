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

`validate` runs BabelCode's own harness (evaluate_predictions.py, ALLOW_EXECUTION=true; unsandboxed,
on BabelCode's stubs and gold solutions only, never model output) and ours (the sandbox, as
`codegemma eval` runs a model's completions) on the same validation predictions and compares the
verdict of every problem and test case; `--limit N` takes each set's first N problems, and with
`--start S` the N from problem S on (a long set run in parts, e.g. BC-MBPP Kotlin):

    python scripts/babelcode_data.py validate --babelcode /tmp/babelcode \\
        --python /tmp/bcvenv/bin/python --dataset humaneval --languages cpp,java --out /tmp/bcv

`record` writes the verdicts BabelCode's harness gave (its pred_results.jsonl files, from
`validate` or from evaluate_predictions.py run by hand) into tests/eval/data/babelcode_verdicts.json.gz
(a set recorded again replaces its entry), which the tests compare our harness with; each
prediction's code must equal our bundled stub:

    python scripts/babelcode_data.py record --dataset humaneval /tmp/bcv/*/pred_results.jsonl \\
        --timeout-scale 3
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
    work: Path,
    python: str,
    dataset: str,
    langs: list[str],
    out: Path,
    scale: float,
    span: slice = slice(None),
    workers: int | None = None,
) -> dict:
    """Run BabelCode's evaluate_predictions.py (generated test code in `work`) on our bundled
    validation predictions, one experiment per language (out/<dataset>-<lang>/); per-problem
    results as (language, qid) -> (outcome, test_case_results)."""
    gin = out / "validation.gin"
    base = work / "configs" / "evaluation" / "base.gin"
    gin_text = (work / "configs" / "validation.gin").read_text()
    gin_text = gin_text.replace("'configs/evaluation/base.gin'", repr(str(base)))
    gin.write_text(gin_text.replace("num_workers=32", f"num_workers={workers or os.cpu_count()}"))
    env = {**os.environ, "ALLOW_EXECUTION": "true", "BC_TIMEOUT_SCALE": str(scale)}
    env["PATH"] = f"{Path(python).parent}{os.pathsep}{env['PATH']}"  # their `python` command
    results = {}
    for lang in langs:
        name = f"{dataset}-{lang}" + (f"-from{span.start}" if span.start else "")
        stubs = bc.load_validation_predictions(dataset, lang)[span]
        preds = out / f"{name}.predictions.jsonl"
        write_text_atomic(preds, "".join(json.dumps(p) + "\n" for p in stubs))
        run(
            python,
            [
                "-c",
                SCALED_HARNESS,
                f"--gin_file={gin}",
                f"--experiment_name={name}",
                f"--predictions={preds}",
                f"--output_path={out}",
                f"--test_code=data/problem_code/{bc.DATASETS[dataset]}",
                "--overwrite",
                "--samples=1",
                "--validation",
                f"--languages={bc.BABELCODE_NAMES[lang]}",
            ],
            work,
            env=env,
        )
        results.update(read_their_results(out / name / "pred_results.jsonl"))
    return results


def read_their_results(path: Path) -> dict:
    """BabelCode's pred_results.jsonl: (language, qid) -> (outcome, test_case_results)."""
    return {
        (row["language"], row["qid"]): (row["outcome"], row["test_case_results"])
        for row in read_jsonl(path)
    }


def our_verdicts(
    dataset: str,
    langs: list[str],
    workers: int,
    scale: float,
    span: slice = slice(None),
    reuse: bool = True,
) -> dict:
    """Our harness on the same validation predictions: each language's BabelCodeSandbox, as
    `codegemma eval` scores a model's completions (every timeout times `scale`)."""
    from codegemma.eval.execution import babelcode_sandbox, judge_babelcode

    results = {}
    for lang in langs:
        problems = bc.by_qid(bc.load_babelcode(dataset, lang))
        stubs = bc.load_validation_predictions(dataset, lang)[span]
        timeout = max(bc.language_spec(lang).timeouts) * scale
        with (
            babelcode_sandbox(lang, timeout, reuse=reuse) as sandbox,
            ThreadPoolExecutor(max_workers=workers) as pool,
        ):

            def one(stub, sandbox=sandbox, problems=problems):
                verdict, _ = judge_babelcode(problems[stub["qid"]], stub["code"], sandbox=sandbox)
                return stub["qid"], (verdict.outcome, verdict.test_results)

            for qid, verdict in pool.map(one, stubs):
                results[(bc.BABELCODE_NAMES[lang], qid)] = verdict  # as BabelCode names it
    return results


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
    span = slice(args.start, None if args.limit is None else args.start + args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkout = Path(args.babelcode).resolve()
    dataset = bc.DATASETS[args.dataset]
    if args.generated:  # a checkout where the generator already ran (checked against our data)
        work, scratch = checkout, None
        check_generated(work, args.dataset)
    else:
        work = scratch = scratch_copy(checkout)
    try:
        if scratch is not None:
            generate(work, args.python, dataset)
        theirs = their_verdicts(
            work,
            args.python,
            args.dataset,
            langs,
            out,
            args.timeout_scale,
            span,
            args.workers,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch.parent, ignore_errors=True)
    ours = our_verdicts(args.dataset, langs, args.workers, args.timeout_scale, span)
    report = compare(theirs, ours, langs)
    report["dataset"] = args.dataset
    rows = [{"language": k[0], "qid": k[1], "theirs": theirs.get(k), "ours": ours[k]} for k in ours]
    write_text_atomic(out / "verdicts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    if report["problems that differ"]:
        sys.exit(
            f"{len(report['problems that differ'])} problems differ; see {out / 'verdicts.jsonl'}"
        )


def check_generated(work: Path, dataset: str) -> None:
    """The checkout's generated test code must be the data we bundle (same rows, same hashes)."""
    root = work / "data" / "problem_code" / bc.DATASETS[dataset]
    prompts = read_jsonl(root / "prompt_info.jsonl")
    codes = read_jsonl(root / "testing_code.jsonl")
    manifest = json.loads((OUT / "manifest.json").read_text())
    for lang in bc.LANGUAGES:
        rows = merge_rows(prompts, codes, bc.BABELCODE_NAMES[lang])
        if bc.rows_sha256(rows) != manifest["sets"][f"{dataset}-{lang}"]["sha256"]:
            sys.exit(
                f"{root}: {dataset}-{lang} differs from the bundled data; regenerate it "
                "(PYTHONHASHSEED=0) or drop --generated"
            )


def compare(theirs: dict, ours: dict, langs: list[str]) -> dict:
    """Per language: problems compared, per-problem verdicts (outcome and every test case) that
    agree, both harnesses' counts, and the problems that differ."""
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    agree = {}
    for lang in langs:
        name = bc.BABELCODE_NAMES[lang]
        keys = [k for k in ours if k[0] == name]
        agree[lang] = f"{sum(ours[k] == theirs.get(k) for k in keys)}/{len(keys)}"
    return {
        "agree": agree,
        "theirs": summarize({k: v for k, v in theirs.items() if k in ours}),
        "ours": summarize(ours),
        "problems compared": len(ours),
        "problems that differ": [f"{lang}/{qid}" for lang, qid in differ],
    }


VERDICTS = ROOT / "tests" / "eval" / "data" / "babelcode_verdicts.json.gz"


def cmd_record(args: argparse.Namespace) -> None:
    """Their verdicts, checked to be on our bundled predictions, to the tests' data file."""
    by_name = {v: k for k, v in bc.BABELCODE_NAMES.items()}
    new: dict[str, dict] = {}
    for path in map(Path, args.results):
        for row in read_jsonl(path):
            lang = by_name[row["language"]]
            if _stubs(args.dataset, lang).get(row["qid"]) != row["code"]:
                sys.exit(f"{path}: {lang}/{row['qid']} is not our bundled validation prediction")
            verdict = [row["outcome"], row["test_case_results"]]
            new.setdefault(f"{args.dataset}-{lang}", {})[row["qid"]] = verdict
    out = Path(args.out)
    sets = json.loads(gzip.decompress(out.read_bytes()))["sets"] if out.is_file() else {}
    for name, verdicts in new.items():
        order = [p.qid for p in bc.load_babelcode(*name.split("-"))]
        sets[name] = {
            "timeout_scale": args.timeout_scale,
            "verdicts": {q: verdicts[q] for q in order if q in verdicts},
        }
    data = {
        "about": (
            "Per-problem verdicts of BabelCode's own harness (google-research/babelcode, "
            "Apache-2.0, evaluate_predictions.py at the commit below, every command's timeout "
            "times the set's timeout_scale) on its validation predictions as bundled in "
            "src/codegemma/eval/tasks/data/babelcode/*.validation.jsonl.gz "
            "(scripts/make_validation_preds.py: a stub returning the first test's expected "
            "output; for Python the gold solution). Per set, qid -> [outcome, {test id: "
            "result}] for the problems that were run. Written by scripts/babelcode_data.py "
            "record."
        ),
        "source": "google-research/babelcode",
        "commit": args.commit,
        "sets": dict(sorted(sets.items())),
    }
    text = json.dumps(data, indent=0, sort_keys=True, ensure_ascii=True) + "\n"
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text.encode())
    write_bytes_atomic(out, buf.getvalue())
    for name, entry in data["sets"].items():
        print(f"{name}: {len(entry['verdicts'])} problems, timeout scale {entry['timeout_scale']}")


_STUBS: dict = {}


def _stubs(dataset: str, lang: str) -> dict:
    if (dataset, lang) not in _STUBS:
        rows = bc.load_validation_predictions(dataset, lang)
        _STUBS[dataset, lang] = {r["qid"]: r["code"] for r in rows}
    return _STUBS[dataset, lang]


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
    val.add_argument("--limit", type=int, default=None, help="each set's first N problems only")
    val.add_argument(
        "--start",
        type=int,
        default=0,
        help="each set's problems from this one on (--limit N: N of them)",
    )
    val.add_argument(
        "--generated",
        action="store_true",
        help="the checkout already holds the generator's output (checked against the bundled "
        "data): do not regenerate it",
    )
    val.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="multiply every command's timeout, in both harnesses (for a loaded machine)",
    )
    rec = sub.add_parser("record")
    rec.add_argument("results", nargs="+", help="BabelCode pred_results.jsonl files")
    rec.add_argument("--dataset", choices=sorted(bc.DATASETS), required=True)
    rec.add_argument("--out", default=str(VERDICTS))
    rec.add_argument("--commit", default="d37a231", help="the commit of the harness that ran")
    rec.add_argument(
        "--timeout-scale", type=float, required=True, help="the scale the harness ran with"
    )
    args = parser.parse_args(argv)
    commands = {"generate": cmd_generate, "validate": cmd_validate, "record": cmd_record}
    commands[args.command](args)


if __name__ == "__main__":
    main()
