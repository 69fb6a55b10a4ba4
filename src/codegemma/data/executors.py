"""Executors: run the pipeline's jobs (pure functions of (Job, index)) on processes or Ray.

* `LocalExecutor(workers)`: in-process for one worker (easy to debug), else a multiprocessing
  pool, forked where the OS allows (no re-import of the caller's `__main__`, fast start; the
  parent has only loaded the tokenizer, never run it, so no tokenizer threads are inherited).
  Workers die with the parent: on Linux the kernel kills each one when the parent dies
  (`prctl(PR_SET_PDEATHSIG)`, set in the pool initializer), and everywhere a worker checks that
  its parent is alive before each job, so a killed `data prepare` leaves no process writing
  into `--out` behind it.
* `RayExecutor(workers)`: Ray Data maps the same functions over a dataset of job indices, on a
  running cluster (`ray.init(address="auto")` when `RAY_ADDRESS` is set) or a local instance.
  Workers must see `--out` at the same path (a shared filesystem on a cluster).

Both return results in index order and show a progress bar, so callers cannot tell them apart
except by speed.

    results = get_executor("local", 4).map(run_read, job, range(n), "read")
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from tqdm import tqdm

from codegemma.errors import DataPipelineError, UsageError

JobFn = Callable[[Any, int], dict[str, Any]]
ENGINES = ("local", "ray")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _check_workers(workers: int | None) -> None:
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise UsageError(f"--workers must be at least 1 (or left out for all CPUs), got {workers}")


class LocalExecutor:
    def __init__(self, workers: int | None = None) -> None:
        _check_workers(workers)
        self.workers = workers or os.cpu_count() or 1

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
                parent = os.getpid()
                with ctx.Pool(
                    min(self.workers, len(indices)),
                    initializer=die_with_parent,
                    initargs=(parent,),
                ) as pool:
                    run = partial(_indexed, fn, job, parent)
                    for i, res in pool.imap_unordered(run, indices):
                        results[i] = res
                        bar.update()
        finally:
            bar.close()
        return [results[i] for i in indices]


def die_with_parent(parent: int) -> None:
    """Pool initializer: have the kernel SIGKILL this process when its parent dies (Linux), and
    exit at once if the parent is already gone (it died before the request took effect)."""
    if sys.platform.startswith("linux"):
        # cannot fail with these arguments; were it to, the check before each job remains
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _exit_if_orphaned(parent)


def _exit_if_orphaned(parent: int) -> None:
    """An orphan is re-parented (to init or a subreaper): its parent id is no longer `parent`."""
    if os.getppid() != parent:
        os._exit(1)


def _indexed(fn: JobFn, job: Any, parent: int, i: int) -> tuple[int, dict[str, Any]]:
    _exit_if_orphaned(parent)  # no new job once the parent is gone (where PDEATHSIG is missing)
    return i, fn(job, i)


class RayExecutor:
    def __init__(self, workers: int | None = None) -> None:
        _check_workers(workers)
        try:
            import ray
        except ImportError as e:
            raise DataPipelineError(
                "--engine ray needs Ray Data, which is not installed",
                fix="pip install 'ray[data]==2.60.0' (the dist extra), or use --engine local",
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
    """The executor for `engine` (one of ENGINES) with `workers` processes (None: all CPUs)."""
    if engine == "local":
        return LocalExecutor(workers)
    if engine == "ray":
        return RayExecutor(workers)
    raise UsageError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
