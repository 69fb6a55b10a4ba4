"""Data-pipeline throughput on a real corpus every machine has: the Python standard library.

Each package under the stdlib directory is one repository source; the top-level modules go in
as a JSONL source (repo "stdlib"). Stages are timed one by one, in this process, on the same
documents (MB/s of source text through the stage); then `prepare` runs end to end with 1 and 2
local workers. The anchor in the same run: datasketch's MinHash (`update_batch`, the library
the issue names) against our vectorised numpy MinHash, on the same shingles.

    .venv/bin/python benchmarks/bench_data.py              # stdlib without its test suite
    .venv/bin/python benchmarks/bench_data.py --with-tests # + Lib/test (about 2x the bytes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sysconfig
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

SKIP = {"site-packages", "__pycache__", "test", "idle_test", "tests"}


def corpus_sources(tmp: Path, with_tests: bool) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = SKIP - ({"test", "tests", "idle_test"} if with_tests else set())
    sources = [
        f"{d.name}={d}"
        for d in sorted(lib.iterdir())
        if d.is_dir() and d.name not in skip and any(d.rglob("*.py"))
    ]
    rows = [
        {"repo": "stdlib", "path": f.name, "content": f.read_text(encoding="utf-8")}
        for f in sorted(lib.glob("*.py"))
    ]
    (tmp / "toplevel.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return sources + [str(tmp / "toplevel.jsonl")]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def stage_table(sources: list[str], tok_dir: Path) -> tuple[list[tuple[str, float, float]], float]:
    from codegemma.data.base import run_steps
    from codegemma.data.decontaminate import Decontaminate
    from codegemma.data.dedup import Signer, cluster
    from codegemma.data.filters import QualityFilters
    from codegemma.data.fim import FimConfig, build_repo_sample
    from codegemma.data.packing import order_repository
    from codegemma.data.pii import PiiStep
    from codegemma.data.shards import ShardWriter, token_dtype
    from codegemma.data.sources import plan_sources, read_task
    from codegemma.tokenizer import Tokenizer

    rows = []

    def add(name, seconds, nbytes):
        rows.append((name, seconds, nbytes / 1e6 / seconds))

    stats: Counter = Counter()
    docs, t = timed(lambda: [d for task in plan_sources(sources) for d in read_task(task, stats)])
    mb = sum(len(d.text.encode()) for d in docs)
    add("read (sources)", t, mb)
    kept, t = timed(lambda: list(QualityFilters().run(docs)))
    add("quality filters", t, mb)
    kept_mb = sum(len(d.text.encode()) for d in kept)
    signer = Signer()
    sigs, t = timed(lambda: signer.sign_all(kept))
    add("dedup: MinHash signatures (ours, numpy)", t, kept_mb)
    add("dedup: MinHash anchor (datasketch)", *_datasketch(kept, signer))
    result, t = timed(lambda: cluster(sigs))
    add("dedup: LSH clustering (global)", t, kept_mb)
    kept = [d for d in kept if d.id not in result.dropped]
    kept_mb = sum(len(d.text.encode()) for d in kept)
    _, t = timed(lambda: list(run_steps([PiiStep()], kept)))
    add("PII redaction", t, kept_mb)
    decon = Decontaminate()
    kept, t = timed(lambda: list(decon.run(kept)))
    add("decontamination (HumanEval)", t, kept_mb)
    by_repo = defaultdict(list)
    for d in kept:
        by_repo[d.repo].append(d)
    packed, t = timed(
        lambda: [
            order_repository(sorted(v, key=lambda d: d.path)) for _, v in sorted(by_repo.items())
        ]
    )
    add("repository packing (order)", t, kept_mb)
    tok = Tokenizer.load(tok_dir)
    samples, t = timed(
        lambda: [build_repo_sample(tok, p.documents, FimConfig(), seed=0) for p in packed]
    )
    add("FIM + tokenize", t, kept_mb)

    def write():
        w = ShardWriter(Path(tempfile.mkdtemp()) / "s.bin", 2048, token_dtype(tok.vocab_size))
        for s in samples:
            w.add([tok.bos_id, *s.tokens, tok.eos_id])
        info = w.close()
        shutil.rmtree(Path(w.path).parent)
        return info

    _, t = timed(write)
    add("pack + write shard", t, kept_mb)
    return rows, mb


def _datasketch(docs, signer) -> tuple[float, int]:
    from datasketch import MinHash

    from codegemma.data.dedup import TOKEN

    sample = docs[: max(1, len(docs) // 4)]  # the anchor is slow: a quarter is enough
    t = time.perf_counter()
    for d in sample:
        toks = TOKEN.findall(d.text)
        shingles = {" ".join(toks[i : i + 5]).encode() for i in range(max(1, len(toks) - 4))}
        MinHash(num_perm=256).update_batch(list(shingles))
    return time.perf_counter() - t, sum(len(d.text.encode()) for d in sample)


def end_to_end(sources: list[str], tok_dir: Path, workers: int, tmp: Path) -> tuple[float, dict]:
    from codegemma.data.pipeline import PrepareConfig, prepare

    out = tmp / f"out-{workers}"
    config = PrepareConfig(tokenizer=str(tok_dir), seq_len=2048, num_shards=8)
    manifest, t = timed(lambda: prepare(sources, out, config, workers=workers))
    return t, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--with-tests", action="store_true", help="include Lib/test")
    ap.add_argument("--workers", default="1,2", help="end-to-end worker counts")
    args = ap.parse_args()
    os.environ.setdefault("CODEGEMMA_QUIET", "1")
    from codegemma.train.tokenizer_trainer import train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sources = corpus_sources(tmp, args.with_tests)
        lib = Path(sysconfig.get_paths()["stdlib"])
        sample = [f.read_text() for f in sorted(lib.glob("*.py"))[:40]]
        tok_dir = train_tokenizer(sample, 2048, tmp / "tok")
        rows, mb = stage_table(sources, tok_dir)
        print(
            f"corpus: CPython {lib} ({len(sources)} sources, {mb / 1e6:.1f} MB of code read), "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n"
        )
        print("| stage | seconds | MB/s |\n|---|---:|---:|")
        for name, t, rate in rows:
            print(f"| {name} | {t:.2f} | {rate:.1f} |")
        for w in (int(x) for x in args.workers.split(",")):
            t, m = end_to_end(sources, tok_dir, w, tmp)
            print(
                f"| end to end, local engine, {w} worker{'s' if w > 1 else ''} | {t:.2f} | "
                f"{mb / 1e6 / t:.1f} |"
            )
        st = m["stats"]
        print(
            f"\nlast run: {m['num_sequences']} sequences x 2048, filters {st.get('filters')}, "
            f"dedup {st.get('dedup')}, pii {st.get('pii')}, "
            f"decontaminate {st.get('decontaminate')}"
        )


if __name__ == "__main__":
    main()
