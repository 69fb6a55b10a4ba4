"""Executors: run the pipeline's jobs (pure functions of (Job, index)) on processes or Ray.

* `LocalExecutor(workers)`: in-process for one worker (easy to debug), else a multiprocessing
  pool, forked where the OS allows (no re-import of the caller's `__main__`, fast start; the
  parent has only loaded the tokenizer, never run it, so no tokenizer threads are inherited).
* `RayExecutor(workers)`: Ray Data maps the same functions over a dataset of job indices, on a
  running cluster (`ray.init(address="auto")` when `RAY_ADDRESS` is set) or a local instance.
  Workers must see `--out` at the same path (a shared filesystem on a cluster).

Both return results in index order and show a progress bar, so callers cannot tell them apart
except by speed.

    results = get_executor("local", 4).map(run_read, job, range(n), "read")
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from tqdm import tqdm

JobFn = Callable[[Any, int], dict[str, Any]]


class LocalExecutor:
    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)

    def map(self, fn: JobFn, job: Any, indices: Sequence[int], desc: str) -> list[dict[str, Any]]:
        indices = list(indices)
        bar = tqdm(total=len(indices), desc=desc, unit="job", disable=_quiet(), file=sys.stderr)
        results: dict[int, dict[str, Any]] = {}
        try:
            if self.workers == 1 or len(indices) <= 1:
                for i in indices:
                    results[i] = fn(job, i)
                    bar.update()
            else:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
                ctx = mp.get_context(method)
                with ctx.Pool(min(self.workers, len(indices))) as pool:
                    for i, res in pool.imap_unordered(partial(_indexed, fn, job), indices):
                        results[i] = res
                        bar.update()
        finally:
            bar.close()
        return [results[i] for i in indices]


def _indexed(fn: JobFn, job: Any, i: int) -> tuple[int, dict[str, Any]]:
    return i, fn(job, i)


class RayExecutor:
    def __init__(self, workers: int | None = None) -> None:
        try:
            import ray
        except ImportError as e:
            raise RuntimeError(
                "--engine ray needs Ray Data: pip install 'ray[data]==2.60.0' (the dist extra)"
            ) from e
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(address="auto", log_to_driver=False)
            else:
                ray.init(
                    num_cpus=workers or os.cpu_count(),
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))

    def map(self, fn: JobFn, job: Any, indices: Sequence[int], desc: str) -> list[dict[str, Any]]:
        import ray.data

        indices = list(indices)
        if not indices:
            return []
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not _quiet()

        def run(row: dict[str, Any]) -> dict[str, Any]:
            # results travel as JSON text: nested stats dicts have no fixed Arrow schema
            return {"index": row["index"], "result": json.dumps(fn(job, int(row["index"])))}

        ds = ray.data.from_items([{"index": i} for i in indices], override_num_blocks=len(indices))
        rows = ds.map(run, concurrency=min(self.workers, len(indices))).take_all()
        by_index = {int(r["index"]): json.loads(r["result"]) for r in rows}
        return [by_index[i] for i in indices]


def _quiet() -> bool:
    return os.environ.get("CODEGEMMA_QUIET") == "1"


def get_executor(engine: str, workers: int | None = None) -> LocalExecutor | RayExecutor:
    if engine == "local":
        return LocalExecutor(workers)
    if engine == "ray":
        return RayExecutor(workers)
    raise ValueError(f"unknown engine {engine!r}; use 'local' or 'ray'")
