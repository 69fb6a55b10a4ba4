"""Fixtures of the data-pipeline tests: `corpus` writes the fixture repositories into tmp_path
(see corpus_fixtures.py for what they contain on purpose)."""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus_fixtures import write_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    return write_corpus(tmp_path / "corpus")
