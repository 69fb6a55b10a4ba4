"""Concurrent clients on loopback: batching, bounded queue (503 + Retry-After), disconnects.

The default run has 8 clients (some streaming, some hanging up mid-stream) over 4 slots and 2
queue places; the engine is held until the queue has refused someone, so the overload happens
however the clients' arrivals are spread out by the machine's load. `-m slow` runs the 32-client
load test and prints p50/p95 latency and tokens/s. Both check that every request either succeeded
or got an intended 503, that decode steps really batched several requests, and that the server is
back to idle (no slot or queue entry leaked) afterwards.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    rejected: int = 0  # 503s (each retried)
    disconnected: int = 0
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0


async def _one(client: httpx.AsyncClient, kind: str, max_tokens: int, out: LoadResult) -> None:
    request = {"prompt": f"def f{kind}(", "max_tokens": max_tokens, "temperature": 0.8}
    started = time.perf_counter()  # latency as the client sees it, 503 retries included
    deadline = time.monotonic() + 120  # retries are bounded by time, not by a count
    while time.monotonic() < deadline:
        if kind == "plain":
            r = await client.post("/v1/completions", json=request)
            if r.status_code == 200:
                out.latencies.append(time.perf_counter() - started)
                out.tokens += r.json()["usage"]["completion_tokens"]
                return
        else:
            async with client.stream(
                "POST", "/v1/completions", json={**request, "stream": True}
            ) as r:
                if r.status_code == 200:
                    await _consume(r, kind, started, out)
                    return
                await r.aread()
        if r.status_code != 503 or "retry-after" not in r.headers:
            out.failures.append(f"{r.status_code}: {r.text[:200]}")
            return
        out.rejected += 1
        await asyncio.sleep(0.02)  # the test honours Retry-After's intent, faster than 1 s
    out.failures.append("never admitted")


async def _consume(r: httpx.Response, kind: str, started: float, out: LoadResult) -> None:
    async for line in r.aiter_lines():
        if kind == "disconnect" and line.startswith("data: {"):
            out.disconnected += 1
            return  # leaving the block closes the connection mid-stream
        if line == "data: [DONE]":
            out.latencies.append(time.perf_counter() - started)
            return
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.failures.append(str(chunk["error"]))
                return
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                out.tokens += 1  # a text chunk (an approximation of one token)
    out.failures.append("stream ended without [DONE]")


async def run_load(url: str, clients: list[list[str]], max_tokens: int) -> LoadResult:
    """Each client sends its requests one after the other; the clients run concurrently."""
    out = LoadResult()

    async def client_run(kinds: list[str]) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for kind in kinds:
                await _one(client, kind, max_tokens, out)

    started = time.perf_counter()
    await asyncio.gather(*(client_run(kinds) for kinds in clients))
    out.elapsed = time.perf_counter() - started
    return out


def check(app, out: LoadResult, clients: list[list[str]], wait_idle) -> None:
    kinds = [k for c in clients for k in c]
    assert out.failures == []
    completed = sum(k != "disconnect" for k in kinds)
    assert len(out.latencies) == completed and out.disconnected == kinds.count("disconnect")
    wait_idle(app)  # every slot and queue entry came back
    metrics = app.state.server.metrics
    assert max(b for b in _batch_sizes(metrics)) > 1, "decode steps never batched requests"
    assert metrics.rejected.total() == out.rejected


def _batch_sizes(metrics) -> list[int]:
    text = metrics.render()
    sizes = []
    previous = 0
    for line in text.splitlines():
        if line.startswith("codegemma_step_batch_size_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            count = int(float(line.rsplit(" ", 1)[1]))
            if count > previous and bound != "+Inf":
                sizes.append(int(bound))
            previous = count
    return sizes


def hold_engine_until_rejected(app, monkeypatch, timeout: float = 120.0) -> None:
    """Engine steps wait until the server has answered a 503. Nothing finishes before then, so
    every client is in flight at once: admitted (4 slots + 2 queued) or refused."""
    engine, rejected = app.state.server.scheduler.engine, app.state.server.metrics.rejected
    step, overloaded = engine.step, threading.Event()

    def held_step():
        deadline = time.monotonic() + timeout  # a bound for a broken test, not a timing
        while not overloaded.is_set():
            if rejected.total() > 0 or time.monotonic() > deadline:
                overloaded.set()  # from now on every step runs at once
            else:
                time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", held_step)


def test_eight_concurrent_clients_with_disconnects(serve, wait_idle, monkeypatch):
    clients = [[k] for k in ["plain", "stream", "disconnect"] * 2 + ["plain", "stream"]]
    with serve(max_batch_size=4, max_queue=2, max_tokens=16) as (url, app):
        hold_engine_until_rejected(app, monkeypatch)
        out = asyncio.run(run_load(url, clients, max_tokens=12))
        check(app, out, clients, wait_idle)
        assert out.rejected > 0, "8 clients over 4 slots + 2 queued: some must get 503"


@pytest.mark.slow
def test_load_32_clients(serve, wait_idle):
    # 32 clients x 2 requests: 12 plain, 12 streaming, 8 that hang up on their second request
    clients = [["plain", "plain"]] * 6 + [["stream", "stream"]] * 6 + [["plain", "stream"]] * 12
    clients += [["stream", "disconnect"]] * 8
    with serve(max_batch_size=8, max_queue=16, max_tokens=16) as (url, app):
        out = asyncio.run(run_load(url, clients, max_tokens=16))
        check(app, out, clients, wait_idle)
    lat = sorted(out.latencies)
    p95 = lat[max(0, round(0.95 * len(lat)) - 1)]
    print(
        f"\nload: {len(lat) + out.disconnected} requests from {len(clients)} clients in "
        f"{out.elapsed:.2f} s, "
        f"{out.rejected} x 503 (retried), p50 {statistics.median(lat) * 1000:.0f} ms, "
        f"p95 {p95 * 1000:.0f} ms, {out.tokens / out.elapsed:.0f} tokens/s"
    )
