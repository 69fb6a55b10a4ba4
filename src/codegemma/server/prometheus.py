"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand.

Three small types (Counter, Gauge read through a callback at scrape time, Histogram) and a
Registry that renders them; a lock per metric, as the scheduler thread and the event loop both
record. No prometheus_client dependency: the format is a few lines of text.

    registry = Registry()
    requests = registry.counter("codegemma_requests_total", "HTTP requests", ("endpoint", "status"))
    requests.inc(endpoint="/v1/completions", status="200")
    print(registry.render())

The server's metrics come in two parts wired without a cycle: `SchedulerMetrics` is the sink the
scheduler reports to (it knows nothing of the scheduler), and `ServerMetrics` adds the HTTP
metrics, gauges that read the scheduler's `load()` snapshot, and the engine's speculative
decoding counts (`Engine.decode_stats`), all read when scraped:

    events = SchedulerMetrics()
    scheduler = Scheduler(engine, events=events)
    metrics = ServerMetrics(events, load=scheduler.load, decode_stats=lambda: engine.decode_stats)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

from codegemma.engine import DecodeStats, GenerationResult
from codegemma.server.scheduler import Load

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read at scrape time from `read()`."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        super().__init__(name, help)
        self.read = read

    def render(self) -> list[str]:
        return [f"{self.name} {_number(self.read())}"]


class CounterFunc(_Metric):
    """A counter kept elsewhere, read at scrape time from `read()` (it must only grow)."""

    kind = "counter"

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        super().__init__(name, help)
        self.read = read

    def render(self) -> list[str]:
        return [f"{self.name} {_number(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets or LATENCY_BUCKETS))
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += value
            series[-1] += 1

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
        return int(series[-1]) if series else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        lines = []
        for key, series in items:
            for bound, n in zip((*self.buckets, math.inf), (*series[:-2], series[-1]), strict=True):
                le = _labels(self.label_names, key, f'le="{_number(bound)}"')
                lines.append(f"{self.name}_bucket{le} {_number(n)}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_number(series[-1])}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric):
        """Register a metric made elsewhere (it is rendered with the others)."""
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return self.add(Counter(name, help, labels))

    def counter_func(self, name: str, help: str, read: Callable[[], float]) -> CounterFunc:
        return self.add(CounterFunc(name, help, read))

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> Gauge:
        return self.add(Gauge(name, help, read))

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> Histogram:
        return self.add(Histogram(name, help, labels, buckets))

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines += metric.header() + metric.render()
        return "\n".join(lines) + "\n"


class SchedulerMetrics:
    """The scheduler's counters and histograms, written through its `SchedulerEvents` calls
    (this class is that sink); it holds no reference to the scheduler."""

    def __init__(self) -> None:
        self.ttft = Histogram(
            "codegemma_time_to_first_token_seconds",
            "time from admission to the first generated token",
        )
        self.prompt_tokens = Counter("codegemma_prompt_tokens_total", "prompt tokens admitted")
        self.cached_prompt_tokens = Counter(
            "codegemma_prompt_tokens_cached_total",
            "prompt tokens whose keys and values came from the prefix cache, not a prefill",
        )
        self.generated_tokens = Counter(
            "codegemma_generated_tokens_total", "tokens generated (stop tokens included)"
        )
        self.sequences = Counter(
            "codegemma_sequences_total", "sequences finished, by finish reason", ("reason",)
        )
        self.steps = Counter("codegemma_engine_steps_total", "engine steps that ran a forward pass")
        self.batch = Histogram(
            "codegemma_step_batch_size",
            "sequences advanced by one engine step (decode batching)",
            buckets=BATCH_BUCKETS,
        )

    def all(self) -> list[_Metric]:
        return [
            self.ttft,
            self.prompt_tokens,
            self.cached_prompt_tokens,
            self.generated_tokens,
            self.sequences,
            self.steps,
            self.batch,
        ]

    # -- scheduler.SchedulerEvents -----------------------------------------------------------
    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def stepped(self, tokens: int) -> None:
        self.steps.inc()
        self.batch.observe(tokens)
        self.generated_tokens.inc(tokens)

    def finished(self, result: GenerationResult) -> None:
        self.sequences.inc(reason=result.finish_reason)
        self.cached_prompt_tokens.inc(result.cached_tokens)


class ServerMetrics:
    """Everything /metrics shows: the HTTP metrics (kept here), the scheduler's metrics, and
    gauges that read the scheduler's occupancy through `load` at scrape time."""

    def __init__(
        self,
        scheduler: SchedulerMetrics,
        load: Callable[[], Load],
        decode_stats: Callable[[], DecodeStats] = DecodeStats,
    ) -> None:
        r = self.registry = Registry()
        self.scheduler = scheduler
        self.requests = r.counter(
            "codegemma_requests_total",
            "HTTP requests by endpoint and status",
            ("endpoint", "status"),
        )
        self.errors = r.counter(
            "codegemma_request_errors_total",
            "HTTP requests answered with status >= 400",
            ("endpoint", "status"),
        )
        self.latency = r.histogram(
            "codegemma_request_latency_seconds",
            "time from request to the end of the response (streams included)",
            ("endpoint",),
        )
        self.rejected = r.counter(
            "codegemma_rejected_total", "requests refused with 503 because the queue was full"
        )
        for metric in scheduler.all():
            r.add(metric)
        self._add_gauges(load)
        self._add_decode_stats(decode_stats)

    def _add_decode_stats(self, stats: Callable[[], DecodeStats]) -> None:
        """Speculative decoding (engine/speculative.py), summed over every sequence."""
        counters = [
            ("codegemma_decode_steps_total", "decode forward passes", "decode_steps"),
            (
                "codegemma_verify_steps_total",
                "decode forward passes that verified drafted tokens",
                "verify_steps",
            ),
            (
                "codegemma_decode_sequence_steps_total",
                "sequences advanced by decode steps (one per sequence per step)",
                "sequence_steps",
            ),
            ("codegemma_decode_tokens_total", "tokens decode steps produced", "decode_tokens"),
            (
                "codegemma_draft_tokens_total",
                "tokens drafted by prompt lookup and fed for verification",
                "draft_tokens",
            ),
            (
                "codegemma_draft_tokens_accepted_total",
                "drafted tokens the model kept",
                "accepted_draft_tokens",
            ),
        ]
        for name, help, field in counters:
            self.registry.counter_func(name, help, lambda field=field: getattr(stats(), field))
        self.registry.gauge(
            "codegemma_decode_tokens_per_step",
            "tokens per sequence per decode step since the start (1 without speculation)",
            lambda: stats().tokens_per_step,
        )
        self.registry.gauge(
            "codegemma_draft_acceptance_rate",
            "share of drafted tokens the model kept since the start",
            lambda: stats().acceptance_rate,
        )

    def _add_gauges(self, load: Callable[[], Load]) -> None:
        gauges = [
            ("codegemma_queue_depth", "sequences admitted and waiting for a slot", "queue_depth"),
            ("codegemma_active_sequences", "sequences holding an engine slot", "active"),
            (
                "codegemma_in_flight_sequences",
                "sequences admitted and not yet finished",
                "in_flight",
            ),
            ("codegemma_slots", "engine slots (max batch size)", "slots"),
            (
                "codegemma_queue_capacity",
                "sequences that may wait beyond the slots",
                "queue_capacity",
            ),
        ]
        for name, help, field in gauges:
            self.registry.gauge(name, help, lambda field=field: getattr(load(), field))

    def render(self) -> str:
        return self.registry.render()
