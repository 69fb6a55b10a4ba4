"""Schema fuzzing: schemathesis generates valid and invalid requests from our OpenAPI spec;
no response may be a 5xx, every error must have OpenAI's shape (Ollama's `{"error": text}` on
its /api routes), and no slot may leak.

Generations are kept tiny (max_tokens limit 4) so the generated requests stay fast.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from codegemma.engine import Engine  # noqa: E402
from codegemma.server import ServerSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_app(tiny_cg):
    engine = Engine(tiny_cg.model, tiny_cg.tokenizer, max_batch_size=4)
    app = create_app(engine, ServerSettings(served_model_name="tiny", max_tokens=4, max_n=2))
    yield app
    app.state.server.scheduler.stop()


@pytest.fixture(scope="module")
def operations(fuzz_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    return [result.ok() for result in schema.get_all_operations()]


def test_every_route_is_in_the_schema(operations):
    routes = {(op.method.upper(), op.path) for op in operations}
    for route in [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/infill"),
        ("GET", "/v1/models"),
        ("GET", "/health"),
    ]:
        assert route in routes


# schemathesis's pytest plugin does not run under pytest 9, so the cases are drawn with
# hypothesis directly from each operation's strategy: valid (positive) and invalid (negative).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(operations, fuzz_app, wait_idle, mode):
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # no body: nothing schemathesis can make invalid (any path string is valid)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.as_curl_command(), response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                if case.operation.path.startswith("/api/"):  # Ollama's routes: Ollama's error shape
                    assert isinstance(error, str) and error, response.text
                    return
                assert set(error) == {"message", "type", "param", "code"}, (
                    case.as_curl_command(),
                    response.text,
                )

        check()
    wait_idle(fuzz_app)
    if mode is GenerationMode.NEGATIVE:  # the invalid requests did reach the app and were refused
        assert fuzz_app.state.server.metrics.errors.total() > 0
