"""`prepare`: source repositories -> token shards, in three resumable phases.

1. **read** (one job per `ReadTask`): sources -> quality filters -> dedup signatures. Kept
   documents are written to `.work/` partitioned by repository (blake2b(repo) % num_shards), so
   every repository lands whole in exactly one output shard.
2. **dedup** (once, global): exact + MinHash/LSH clusters over all signatures; each cluster keeps
   its lexicographically smallest id.
3. **shard** (one job per output shard): drop duplicates -> PII redaction -> decontamination ->
   group by repository -> `order_repository` (dependency order) -> `<bos> sample <eos>` per
   repository, concatenated and cut into `seq_len` rows. FIM at context level (the default):
   samples are plain (`plain_repo_sample`) and each row is FIM'd (`ContextPacker`); at document
   level each file is FIM'd in its sample (`build_repo_sample`) before the cut.

Jobs are pure functions of (config, job index), so any executor gives the same bytes: the local
engine (multiprocessing) and the Ray Data engine are checked equal in tests. Every job records a
completion marker; a rerun with the same `--out` removes the temporary files a killed run left,
skips finished jobs and reproduces the rest, and `manifest.json` is written last. Source entries
that cannot be read are skipped and counted (sources.py); read jobs return their warnings, and
the driver logs them, so they reach the console whichever engine ran the job.

    manifest = prepare(["repo_a", "corpus.jsonl"], "out/", PrepareConfig(tokenizer="tok/", seq_len=2048))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codegemma.data.base import Stats, as_dict, run_steps, stable_int
from codegemma.data.decontaminate import DecontamConfig, Decontaminate
from codegemma.data.dedup import DedupConfig, Signatures, Signer, cluster
from codegemma.data.document import Document
from codegemma.data.filters import FilterConfig, QualityFilters
from codegemma.data.fim import MIN_PART_TOKENS, FimConfig
from codegemma.data.pii import PiiConfig, PiiStep
from codegemma.data.shards import (
    MANIFEST,
    VERSION,
    ShardError,
    ShardWriter,
    base_manifest,
    shard_name,
    token_dtype,
)
from codegemma.data.sources import ReadTask, SourceConfig, plan_sources, read_task
from codegemma.errors import UsageError
from codegemma.fileio import write_text_atomic
from codegemma.options import option

log = logging.getLogger(__name__)
WORK = ".work"
MIN_CONTEXT_SEQ_LEN = 2 * MIN_PART_TOKENS  # a row must hold a FIM-able part and more
MAX_WARNINGS = 20  # per read job; the rest are summed up in one line (all are counted)
_PACKED = (
    "each repository: <bos> file_1 <|file_separator|> ... file_n <eos>; repositories "
    "concatenated and cut into seq_len rows; the last partial row of each shard is dropped"
)
LAYOUTS = {
    "document": f"{_PACKED}; files FIM'd before the cut (document-level FIM)",
    "context": f"{_PACKED}; each row FIM'd after the cut (context-level FIM): one file-part "
    "of the row in PSM or SPM, the text that no longer fits starting the next row",
}


def _nested(cls: type) -> Any:
    """A field holding a step's own config (its defaults; no flag of its own)."""
    return field(default_factory=cls, metadata={"cli": False})


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Everything that decides the output of `prepare` (the `data prepare` flags come from the
    fields with `option` help; the nested configs have their own defaults)."""

    tokenizer: str = option(help="tokenizer directory or file (a path Tokenizer.load accepts)")
    seq_len: int = option(2048, "tokens per training sequence")
    num_shards: int = option(8, "output shards = shard jobs; repositories are hashed onto them")
    seed: int = option(0, "seed of the FIM choices (per repository) and the repository order")
    sources: SourceConfig = _nested(SourceConfig)
    filters: FilterConfig = _nested(FilterConfig)
    dedup: DedupConfig = _nested(DedupConfig)
    pii: PiiConfig = _nested(PiiConfig)
    decontam: DecontamConfig = _nested(DecontamConfig)
    fim: FimConfig = _nested(FimConfig)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise UsageError(f"seq_len (--seq-len) must be at least 2, got {self.seq_len}")
        if self.num_shards < 1:
            raise UsageError(f"num_shards (--shards) must be at least 1, got {self.num_shards}")
        if self.fim.fim_level == "context" and self.seq_len < MIN_CONTEXT_SEQ_LEN:
            raise UsageError(
                f"context-level FIM needs seq_len (--seq-len) >= {MIN_CONTEXT_SEQ_LEN}, "
                f"got {self.seq_len}",
                fix="use a longer --seq-len, or --fim-level document",
            )

    def to_dict(self) -> dict[str, Any]:
        d = as_dict(self)
        d["pii"].pop("salt")  # the salt keys the placeholders: never publish it
        return d


@dataclass(frozen=True, kw_only=True)
class Job:
    """What a worker needs: picklable, so local processes and Ray tasks get the same thing."""

    out: str
    config: PrepareConfig
    tasks: tuple[ReadTask, ...]
    tokenizer_fingerprint: str


def _work(job: Job) -> Path:
    return Path(job.out) / WORK


def bucket_of(repo: str, num_shards: int) -> int:
    return stable_int(repo) % num_shards


def repo_seed(seed: int, repo: str) -> int:
    return stable_int(seed, repo) >> 1


# -- phase 1: read -----------------------------------------------------------------------------
def run_read(job: Job, index: int) -> dict[str, Any]:
    """Read task `index`: filter, sign, and write its documents partitioned by shard."""
    marker = _work(job) / f"read-{index:05d}.done.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    task, cfg = job.tasks[index], job.config
    source_stats: Counter[str] = Counter()
    warnings: list[str] = []
    filters = QualityFilters(cfg.filters)
    docs = list(filters.run(read_task(task, source_stats, cfg.sources, warn=warnings.append)))
    Signer(cfg.dedup).sign_all(docs).save(_work(job) / f"read-{index:05d}.sig.npz")
    parts: dict[int, list[str]] = defaultdict(list)
    for d in docs:
        row = {"repo": d.repo, "path": d.path, "language": d.language, "text": d.text}
        parts[bucket_of(d.repo, cfg.num_shards)].append(json.dumps(row, ensure_ascii=False))
    for b, rows in parts.items():
        write_text_atomic(_work(job) / f"docs-{index:05d}-{b:05d}.jsonl", "\n".join(rows) + "\n")
    result = {
        "stats": Stats({"sources": source_stats, "filters": filters.stats}).to_dict(),
        "buckets": sorted(parts),
        "warnings": _capped(warnings),
    }
    write_text_atomic(marker, json.dumps(result))
    return result


def _capped(warnings: list[str]) -> list[str]:
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    rest = len(warnings) - MAX_WARNINGS
    return [*warnings[:MAX_WARNINGS], f"... and {rest} more skipped (counted in the stats)"]


# -- phase 2: dedup ----------------------------------------------------------------------------
def run_dedup(job: Job) -> dict[str, Any]:
    path = _work(job) / "dedup.json"
    if path.is_file():
        return json.loads(path.read_text())
    sigs = Signatures.concat(
        [Signatures.load(_work(job) / f"read-{t.index:05d}.sig.npz") for t in job.tasks],
        job.config.dedup.num_perm,
    )
    result = cluster(sigs, job.config.dedup)
    out = {
        "dropped": dict(sorted(result.dropped.items())),
        "stats": {k: int(v) for k, v in sorted(result.stats.items())},
        "clusters": [c[:10] for c in result.clusters[:20]],
    }
    write_text_atomic(path, json.dumps(out))
    return out


# -- phase 3: shards ---------------------------------------------------------------------------
def load_bucket(job: Job, bucket: int, read_results: Sequence[dict[str, Any]]) -> list[Document]:
    docs = []
    for task, res in zip(job.tasks, read_results, strict=True):
        if bucket in res["buckets"]:
            path = _work(job) / f"docs-{task.index:05d}-{bucket:05d}.jsonl"
            if not path.is_file():
                raise ShardError(
                    f"{path} is gone (intermediates are removed once a preparation "
                    f"completes); delete {job.out} and prepare again"
                )
            for line in path.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                docs.append(
                    Document(text=r["text"], repo=r["repo"], path=r["path"], language=r["language"])
                )
    return docs


def run_shard(job: Job, bucket: int) -> dict[str, Any]:
    """Output shard `bucket`: redact, decontaminate, order, FIM and pack its repositories."""
    from codegemma.tokenizer import Tokenizer

    marker = _work(job) / f"shard-{bucket:05d}.done.json"
    if marker.is_file() and (Path(job.out) / shard_name(bucket)).is_file():
        return json.loads(marker.read_text())
    cfg = job.config
    read_results = [run_read(job, t.index) for t in job.tasks]  # markers: cheap
    dropped = run_dedup(job)["dropped"]
    docs = [d for d in load_bucket(job, bucket, read_results) if d.id not in dropped]
    pii, decon = PiiStep(cfg.pii), Decontaminate(cfg.decontam)
    by_repo: dict[str, list[Document]] = defaultdict(list)
    for d in run_steps([pii, decon], docs):
        by_repo[d.repo].append(d)
    tok = Tokenizer.load(cfg.tokenizer)
    if tok.fingerprint != job.tokenizer_fingerprint:
        raise ShardError(f"tokenizer {cfg.tokenizer} changed during preparation; start again")
    writer = ShardWriter(
        Path(job.out) / shard_name(bucket), cfg.seq_len, token_dtype(tok.vocab_size)
    )
    stats = Stats({"pii": pii.stats, "decontaminate": decon.stats})
    pack = _pack_context if cfg.fim.fim_level == "context" else _pack_documents
    try:
        pack(tok, cfg, bucket, by_repo, writer, stats)
    except BaseException:
        writer.abort()
        raise
    info = writer.close()
    stats["tokens"].update(
        written=info.sequences * cfg.seq_len,
        dropped_tail=info.tokens_dropped,
        samples=info.tokens_in,
    )
    stats["rows"].update(count_fim_rows(Path(job.out) / info.file, cfg.seq_len, tok))
    result = {"shard": info.to_dict(), "stats": stats.to_dict()}
    write_text_atomic(marker, json.dumps(result))
    return result


def _repo_order(cfg: PrepareConfig, by_repo: dict[str, list[Document]]) -> Iterator[Any]:
    """Each repository of a shard, its files in packing order; repositories in a seeded
    shuffle, so a shard is not alphabetical by repository name."""
    from codegemma.data.packing import order_repository

    for repo in sorted(by_repo, key=lambda r: (repo_seed(cfg.seed, r), r)):
        yield repo, order_repository(sorted(by_repo[repo], key=lambda d: d.path))


def _pack_documents(
    tok: Any,
    cfg: PrepareConfig,
    bucket: int,
    by_repo: dict[str, list[Document]],
    writer: ShardWriter,
    stats: Stats,
) -> None:
    """Document-level FIM: every file FIM'd in its repository sample, then the cut into rows."""
    from codegemma.data.fim import build_repo_sample

    for repo, packed in _repo_order(cfg, by_repo):
        sample = build_repo_sample(tok, packed.documents, cfg.fim, seed=repo_seed(cfg.seed, repo))
        writer.add([tok.bos_id, *sample.tokens, tok.eos_id])
        _count_repo(stats, packed, sample)


def _pack_context(
    tok: Any,
    cfg: PrepareConfig,
    bucket: int,
    by_repo: dict[str, list[Document]],
    writer: ShardWriter,
    stats: Stats,
) -> None:
    """Context-level FIM: plain repository samples, cut into rows, each row FIM'd; the tail
    shorter than a row goes to the writer, which drops and counts it."""
    from codegemma.data.fim import ContextPacker, plain_repo_sample

    packer = ContextPacker(tok, cfg.seq_len, cfg.fim, seed=cfg.seed, shard=bucket)
    for _, packed in _repo_order(cfg, by_repo):
        sample = plain_repo_sample(tok, packed.documents)
        for row in packer.add(*sample.stream(tok)):
            writer.add(row)
        _count_repo(stats, packed, sample)
    writer.add(packer.finish())
    stats["fim"].update(packer.stats)


def count_fim_rows(path: Path, seq_len: int, tok: Any, block_rows: int = 4096) -> Counter[str]:
    """Rows of a shard file and the FIM examples they hold whole. A row's FIM sentinels read in
    order, each run <|fim_prefix|> <|fim_suffix|> <|fim_middle|> is one whole example
    (`fim_examples`; rows holding one: `fim`); a row with FIM sentinels but no whole run is
    `fim_broken` (document level makes them from FIM'd files longer than a row). Counted the same
    way at both levels, from the bytes written."""
    import numpy as np

    sp = tok.special
    letter = {sp.fim_prefix: "p", sp.fim_suffix: "s", sp.fim_middle: "m"}
    sentinels = np.array(list(letter))
    size = path.stat().st_size
    data = np.memmap(path, dtype=token_dtype(tok.vocab_size), mode="r") if size else np.zeros(0)
    rows = data.reshape(-1, seq_len)
    counts: Counter[str] = Counter(rows=len(rows))
    for start in range(0, len(rows), block_rows):
        block = np.asarray(rows[start : start + block_rows])
        for row in block[np.isin(block, sentinels).any(axis=1)]:
            marks = "".join(letter[int(t)] for t in row[np.isin(row, sentinels)])
            whole = marks.count("psm")
            counts["fim_examples"] += whole
            counts["fim" if whole else "fim_broken"] += 1
    return counts


def _count_repo(stats: Stats, packed: Any, sample: Any) -> None:
    stats["fim"].update(sample.stats)
    report = packed.report
    stats["packing"].update(
        repos=1,
        files=report.files,
        graph_edges=report.graph_edges,
        broken_edges=len(report.broken_edges),
        test_pairs=len(report.test_pairs),
    )
    for d in packed.documents:
        stats["language_files"][d.language or "unknown"] += 1
        stats["language_bytes"][d.language or "unknown"] += len(d.text.encode("utf-8", "replace"))


# -- driver ------------------------------------------------------------------------------------


def prepare(
    sources: Sequence[str],
    out: str | Path,
    config: PrepareConfig,
    *,
    engine: str = "local",
    workers: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the manifest written to `out/manifest.json`."""
    from codegemma.data.executors import get_executor
    from codegemma.tokenizer import Tokenizer

    out = Path(out)
    tok = Tokenizer.load(config.tokenizer)
    tasks = tuple(plan_sources(sources, config.sources))
    job = Job(out=str(out), config=config, tasks=tasks, tokenizer_fingerprint=tok.fingerprint)
    plan = _check_plan(job, sources)
    remove_stale_temporaries(out)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("plan") == plan:
            log.info("%s is already complete", out)
            return manifest
    executor = get_executor(engine, workers)
    t0 = time.perf_counter()
    read_results = executor.map(run_read, job, [t.index for t in tasks], "read")
    for result in read_results:
        for warning in result.get("warnings", ()):
            log.warning("warning: %s", warning)
    dedup = run_dedup(job)
    shard_results = executor.map(run_shard, job, list(range(config.num_shards)), "shards")
    manifest = _manifest(job, tok, plan, read_results, dedup, shard_results)
    manifest["provenance"].update(
        engine=engine, workers=executor.workers, seconds=round(time.perf_counter() - t0, 3)
    )
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    for p in _work(job).glob("docs-*.jsonl"):  # intermediates: a copy of the corpus
        p.unlink()
    return manifest


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files a killed run left in `out` (half-written shards, manifest and
    `.work` files; a finished write renames its temporary away): a rerun rewrites what they
    were for. Returns what was removed."""
    stale = [
        *out.glob(".shard-*.tmp"),
        *out.glob(f".{MANIFEST}.*.tmp"),
        *(out / WORK).glob(".*.tmp"),
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) an interrupted run left in %s", len(stale), out)
    return stale


def _check_plan(job: Job, sources: Sequence[str]) -> str:
    """A fingerprint of everything that decides the output; a rerun must match it to resume."""
    desc = {
        "sources": list(sources),
        "tasks": [dataclasses.asdict(t) for t in job.tasks],
        "config": job.config.to_dict(),
        "salt": job.config.pii.salt,
        "tokenizer": job.tokenizer_fingerprint,
        "format": VERSION,
    }
    plan = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    path = _work(job) / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text()).get("plan")
        if old != plan:
            raise ShardError(
                f"{job.out} holds a preparation with other sources, config or tokenizer; "
                f"use a new --out, or delete {job.out} to start over"
            )
    else:
        write_text_atomic(path, json.dumps({"plan": plan}))
    return plan


def _manifest(
    job: Job, tok: Any, plan: str, read_results: list[dict], dedup: dict, shard_results: list[dict]
) -> dict[str, Any]:
    cfg = job.config
    stats = Stats()
    for r in read_results + shard_results:
        stats += Stats(r["stats"])
    stats += Stats({"dedup": dedup["stats"]})
    shards = [r["shard"] for r in shard_results]
    return {
        **base_manifest(tok, cfg.seq_len, shards, tokenizer_path=cfg.tokenizer),
        "layout": LAYOUTS[cfg.fim.fim_level],
        "fim_level": cfg.fim.fim_level,
        "stats": stats.to_dict(),
        "dedup_clusters": dedup["clusters"],
        "config": cfg.to_dict(),
        "plan": plan,
        "provenance": {
            "sources": sorted({t.path for t in job.tasks}),
            "read_tasks": len(job.tasks),
            "codegemma": _version(),
        },
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("codegemma")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"
