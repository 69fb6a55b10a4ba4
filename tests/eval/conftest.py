"""Shared fixtures for the evaluation tests: one sandbox per session, the MBPP fixture path."""

from pathlib import Path

import pytest

from codegemma.eval.sandbox import Limits, Sandbox

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def eval_sandbox():
    with Sandbox(Limits(timeout_s=5.0)) as sb:
        yield sb


@pytest.fixture(scope="session")
def mbpp_file() -> Path:
    return DATA / "mbpp_fixture.jsonl"


@pytest.fixture(scope="session")
def sanitized_file() -> Path:
    return DATA / "sanitized_mbpp_fixture.json"
