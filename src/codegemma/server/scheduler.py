"""The scheduler: one background thread owns the Engine; request handlers talk to it by queue.

Handlers (on the asyncio event loop) `submit()` a group of sequences (a request's `n` choices) and
get a `Submission` whose `events()` async-iterates `(choice index, Event)`. The thread loops:
take new sequences and cancellations from a lock-protected inbox, hand them to the engine, run one
`engine.step()` (a prefill of waiting sequences into free slots, or one decode step of every active
slot in a single forward pass: the batching), and route the step's events to each submission's
asyncio queue with one `loop.call_soon_threadsafe` per submission per step. With nothing to do it
sleeps on a condition variable (no busy loop).

Fairness: the engine admits waiting sequences first-come first-served as slots free up, and every
active sequence advances by exactly one token per decode step, whoever it belongs to.
Admission is bounded: at most `slots + max_queue` sequences in flight, beyond that `submit` raises
`Overloaded` (the server answers 503 with Retry-After). Cancellation (a client that went away)
goes through the inbox too, so the engine is only ever touched by its own thread. If a step
raises, every live sequence is failed (its handler answers 500) and cancelled, which frees its
slot; the thread carries on serving.

`call(fn)` runs other work that needs the model (scoring.py's log-probabilities) on the same
thread, between two engine steps, and resolves an awaitable with its result; it counts against
the same admission bound as a sequence. Each sequence's `SequenceTiming` (when its prefill step
ran, when it finished) is recorded on the engine thread before its events are delivered, for
llama.cpp's `timings`.

The scheduler knows nothing of metrics: it reports what happens to the `SchedulerEvents` sink it
is given (the server's `prometheus.SchedulerMetrics`), and `load()` is a read-only snapshot of
its occupancy for gauges and /health (`progress()` one of each live sequence, for /slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from codegemma.engine import Engine, Event, GenerationResult, SamplingParams

log = logging.getLogger("codegemma.server")
T = TypeVar("T")


class Overloaded(Exception):
    """More sequences were submitted than the queue holds."""


class GenerationFailed(Exception):
    """The engine failed while generating this request's sequences."""


class SchedulerEvents(Protocol):
    """What the scheduler reports, from its thread, as it works."""

    def admitted(self, prompt_tokens: int) -> None:
        """A sequence entered the engine with a prompt of this many tokens."""

    def first_token(self, seconds: float) -> None:
        """A submission got its first generated token this long after it was submitted."""

    def stepped(self, tokens: int) -> None:
        """An engine step generated this many tokens (one per sequence it advanced)."""

    def finished(self, result: GenerationResult) -> None:
        """A sequence finished (stopped, hit its length, was cancelled)."""


class _NoEvents:
    def admitted(self, prompt_tokens: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def stepped(self, tokens: int) -> None:
        pass

    def finished(self, result: GenerationResult) -> None:
        pass


@dataclass(frozen=True)
class Load:
    """The scheduler's occupancy at one moment."""

    slots: int  # engine slots (the max batch size)
    queue_capacity: int  # sequences that may wait beyond the slots
    active: int  # sequences holding a slot
    in_flight: int  # sequences admitted and not yet finished
    queue_depth: int  # sequences admitted and waiting for a slot


@dataclass
class SequenceTiming:
    """perf_counter() times of one sequence, written by the engine thread: `prefill_start` and
    `prefill_end` bound the engine step that prefilled it (and chose its first token)."""

    submitted: float
    prefill_start: float | None = None
    prefill_end: float | None = None
    finished: float | None = None


@dataclass(frozen=True)
class Progress:
    """One live sequence, for /slots: its request's submission order and tokens so far."""

    group: int
    index: int
    active: bool  # holds an engine slot (else queued)
    generated: int
    max_new_tokens: int
    has_new_line: bool  # its text has a newline


@dataclass(frozen=True)
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass(frozen=True)
class _Job:
    submission: Submission
    request_id: Hashable
    prompt: list[int]
    params: SamplingParams


class Submission:
    """A request's sequences in the scheduler; iterate `events()` on the submitting loop."""

    def __init__(self, scheduler: Scheduler, group: int, count: int) -> None:
        self.scheduler = scheduler
        self.request_ids = [(group, i) for i in range(count)]
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.timings = [SequenceTiming(self.submitted_at) for _ in range(count)]
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list] = asyncio.Queue()
        self._unfinished = set(self.request_ids)

    @property
    def done(self) -> bool:
        return not self._unfinished

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every sequence has its final event."""
        while self._unfinished:
            for item in await self._queue.get():
                if isinstance(item, BaseException):
                    self._unfinished.clear()
                    raise item
                if item.finished:
                    self._unfinished.discard(item.request_id)
                yield item.request_id[1], item

    def cancel(self, index: int | None = None) -> None:
        """Stop one choice (or all still running); their final events still arrive."""
        ids = self._unfinished if index is None else {self.request_ids[index]} & self._unfinished
        for request_id in list(ids):
            self.scheduler.cancel(request_id)

    def _deliver(self, items: list) -> bool:
        """From the scheduler thread; False when the submitting loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, items)
            return True
        except RuntimeError:  # the loop was closed: nobody is listening any more
            return False


class Scheduler:
    def __init__(
        self, engine: Engine, *, max_queue: int = 64, events: SchedulerEvents | None = None
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine, self.max_queue = engine, max_queue
        self.events: SchedulerEvents = events if events is not None else _NoEvents()
        self._cond = threading.Condition()
        self._inbox: list[_Job] = []
        self._cancels: list[Hashable] = []
        self._calls: list[_Call] = []
        self._live: dict[Hashable, Submission] = {}  # request id -> its submission (engine thread)
        # request id -> [tokens generated, max_new_tokens, holds a slot, has a newline]
        self._progress: dict[Hashable, list[int]] = {}
        self._progress_lock = threading.Lock()
        self._in_flight = 0
        self._groups = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- state read by metrics and /health ------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.engine.max_batch_size

    @property
    def capacity(self) -> int:
        return self.slots + self.max_queue

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def active(self) -> int:
        return self.engine.num_active

    @property
    def queue_depth(self) -> int:
        return max(0, self._in_flight - self.engine.num_active)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def load(self) -> Load:
        in_flight, active = self._in_flight, self.engine.num_active
        return Load(
            slots=self.slots,
            queue_capacity=self.max_queue,
            active=active,
            in_flight=in_flight,
            queue_depth=max(0, in_flight - active),
        )

    def progress(self) -> list[Progress]:
        """Every live sequence, oldest request first."""
        with self._progress_lock:
            items = sorted((rid, list(v)) for rid, v in self._progress.items())
        return [
            Progress(
                group=g,
                index=i,
                active=bool(a),
                generated=n,
                max_new_tokens=m,
                has_new_line=bool(nl),
            )
            for (g, i), (n, m, a, nl) in items
        ]

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if self.alive:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="codegemma-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- called from request handlers -----------------------------------------------------------
    def submit(self, jobs: Sequence[tuple[list[int], SamplingParams]]) -> Submission:
        """Admit all of a request's sequences, or none (raises Overloaded)."""
        self.start()
        with self._cond:
            if self._in_flight + len(jobs) > self.capacity:
                raise Overloaded(
                    f"the server is at capacity ({self._in_flight} sequences in flight, "
                    f"{self.slots} slots + {self.max_queue} queued); retry shortly"
                )
            submission = Submission(self, next(self._groups), len(jobs))
            for request_id, (prompt, params) in zip(submission.request_ids, jobs, strict=True):
                self._inbox.append(_Job(submission, request_id, list(prompt), params))
            self._in_flight += len(jobs)
            self._cond.notify()
        return submission

    def cancel(self, request_id: Hashable) -> None:
        with self._cond:
            self._cancels.append(request_id)
            self._cond.notify()

    def call(self, fn: Callable[[], T]) -> Awaitable[T]:
        """Run fn() on the engine thread between two steps; await the result (its exception is
        raised as GenerationFailed). Raises Overloaded as `submit` does."""
        self.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._in_flight + 1 > self.capacity:
                raise Overloaded(
                    f"the server is at capacity ({self._in_flight} sequences in flight, "
                    f"{self.slots} slots + {self.max_queue} queued); retry shortly"
                )
            self._calls.append(_Call(fn, loop, future))
            self._in_flight += 1
            self._cond.notify()
        return future

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._inbox
                    or self._cancels
                    or self._calls
                    or self._stopping
                    or self.engine.has_work()
                ):
                    self._cond.wait()
                if self._stopping:
                    break
                jobs, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                calls, self._calls = self._calls, []
            self._admit(jobs)
            for request_id in cancels:
                if request_id in self._live:
                    self.engine.cancel(request_id)
            for call in calls:
                self._run_call(call)
            if not self.engine.has_work():
                continue
            started = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as exc:  # keep serving: fail what was running, free its slots
                log.exception("engine step failed; failing %d live sequences", len(self._live))
                self._fail_all(exc)
                continue
            self._route(events, started, time.perf_counter())
        self._fail_all(GenerationFailed("the server is shutting down"))

    def _run_call(self, call: _Call) -> None:
        try:
            result, error = call.fn(), None
        except Exception as exc:
            log.exception("work on the engine thread failed")
            result, error = None, GenerationFailed(f"{type(exc).__name__}: {exc}")
        with self._cond:
            self._in_flight -= 1
        with contextlib.suppress(RuntimeError):  # the loop was closed: nobody is waiting
            call.loop.call_soon_threadsafe(_resolve, call.future, result, error)

    def _admit(self, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                self.engine.submit(job.prompt, job.params, request_id=job.request_id)
            except Exception as exc:  # an invalid prompt fails its own request only
                self._finish_ids([job.request_id])
                job.submission._deliver([GenerationFailed(str(exc))])
                continue
            self._live[job.request_id] = job.submission
            with self._progress_lock:
                self._progress[job.request_id] = [0, job.params.max_new_tokens, 0, 0]
            self.events.admitted(len(job.prompt))

    def _route(self, events: list[Event], started: float, ended: float) -> None:
        by_submission: dict[int, tuple[Submission, list[Event]]] = {}
        for event in events:
            submission = self._live.get(event.request_id)
            if submission is None:
                continue
            by_submission.setdefault(id(submission), (submission, []))[1].append(event)
            timing = submission.timings[event.request_id[1]]
            if timing.prefill_end is None:  # a sequence's first event comes from its prefill
                timing.prefill_start, timing.prefill_end = started, ended
            if event.finished:
                timing.finished = ended
            with self._progress_lock:
                progress = self._progress.get(event.request_id)
                if progress is not None:
                    progress[0] += event.token_id is not None
                    progress[2] = 1
                    progress[3] |= "\n" in event.delta
        finished = [e.request_id for e in events if e.finished and e.request_id in self._live]
        self._record(events)
        self._finish_ids(finished)  # before delivery: a client that sees its end finds it freed
        for submission, items in by_submission.values():
            if submission.first_token_at is None and any(e.token_id is not None for e in items):
                submission.first_token_at = time.perf_counter()
                self.events.first_token(submission.first_token_at - submission.submitted_at)
            if not submission._deliver(items):
                for request_id in submission.request_ids:
                    if request_id in self._live:
                        self.engine.cancel(request_id)

    def _record(self, events: list[Event]) -> None:
        tokens = sum(e.token_id is not None for e in events)
        if tokens:
            self.events.stepped(tokens)
        for e in events:
            if e.finished:
                self.events.finished(e.result)

    def _finish_ids(self, request_ids: list[Hashable]) -> None:
        for request_id in request_ids:
            self._live.pop(request_id, None)
        with self._progress_lock:
            for request_id in request_ids:
                self._progress.pop(request_id, None)
        with self._cond:
            self._in_flight -= len(request_ids)

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every live sequence, queued job and pending call, cancelling them in the engine."""
        with self._cond:
            jobs, self._inbox = self._inbox, []
            calls, self._calls = self._calls, []
            self._cancels.clear()
            self._in_flight -= len(calls)
        for call in calls:
            error = exc if isinstance(exc, GenerationFailed) else GenerationFailed(str(exc))
            with contextlib.suppress(RuntimeError):
                call.loop.call_soon_threadsafe(_resolve, call.future, None, error)
        failed = list(self._live.items()) + [(j.request_id, j.submission) for j in jobs]
        for request_id, _ in list(self._live.items()):
            self.engine.cancel(request_id)
        try:
            self.engine.step()  # only cancellations are pending: frees the slots, no forward pass
        except Exception:
            log.exception("the engine could not free its slots after a failure")
        error = (
            exc
            if isinstance(exc, GenerationFailed)
            else GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
        )
        self._finish_ids([request_id for request_id, _ in failed])
        notified: set[int] = set()
        for _, submission in failed:
            if id(submission) not in notified:
                notified.add(id(submission))
                submission._deliver([error])


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiting request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
