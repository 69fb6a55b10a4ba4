"""Fixtures for the server tests: the tiny model, and real uvicorn servers on free loopback ports.

`serve(settings, max_batch_size=...)` starts an app with its own Engine (weights shared) in a
background thread and yields its base URL; `serve_app(app)` does the same for an app of the
test's own; `server` is a module-wide default one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
from live_server import run_server

import codegemma
from codegemma.engine import Engine
from codegemma.server import ServerSettings, create_app

MODEL_ID = "tiny-codegemma"


@pytest.fixture(scope="session")
def tiny_cg(tiny_model_dir):
    return codegemma.load(tiny_model_dir, device="cpu", max_batch_size=4)


@pytest.fixture(scope="session")
def serve(tiny_cg):
    """serve(**settings) -> context manager yielding (base_url, app)."""

    @contextlib.contextmanager
    def _serve(max_batch_size: int = 4, **settings) -> Iterator[tuple[str, object]]:
        engine = Engine(tiny_cg.model, tiny_cg.tokenizer, max_batch_size=max_batch_size)
        settings.setdefault("served_model_name", MODEL_ID)
        app = create_app(engine, ServerSettings(**settings))
        with run_server(app) as url:
            yield url, app

    return _serve


@pytest.fixture(scope="session")
def serve_app():
    """serve_app(app) -> context manager yielding the base URL of a live server for `app`."""
    return run_server


@pytest.fixture(scope="module")
def server(serve) -> Iterator[str]:
    with serve(max_tokens=64) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server_app(serve):
    with serve(max_tokens=64) as (url, app):
        yield url, app


@pytest.fixture(scope="session")
def wait_idle():
    return _wait_idle


def _wait_idle(app, timeout: float = 60.0) -> None:
    """Until the scheduler holds no sequence (every slot freed), or fail. The bound is generous:
    on a loaded CI machine the last requests of a burst can take seconds to drain."""
    scheduler = app.state.server.scheduler
    deadline = time.monotonic() + timeout
    while (load := scheduler.load()).in_flight or load.active or load.queue_depth:
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle: in_flight={load.in_flight} active={load.active}")
        time.sleep(0.01)
