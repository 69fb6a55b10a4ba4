"""Shared test fixtures: tiny Gemma-layout tokenizers trained in well under a second.

`tiny_tokenizer_dir` / `tiny_tokenizer` are the tokenizer.json kind (vocab 512, the "tiny" model
preset's size); `tiny_sp_tokenizer_dir` / `tiny_sp_tokenizer` the sentencepiece tokenizer.model
kind. Both are trained once per session from the small built-in corpus below.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings
from tiny_corpus_texts import tiny_corpus

from codegemma.tokenizer import Tokenizer
from codegemma.train.tokenizer_trainer import train_sentencepiece, train_tokenizer

TINY_VOCAB_SIZE = 512

# In CI (the CI variable set, as CI services do) property tests draw the same examples every run,
# so a landing is never refused by a new random find; local runs keep exploring and keep a
# database of failures. HYPOTHESIS_PROFILE picks a profile explicitly.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("dev")
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tiny_corpus(), TINY_VOCAB_SIZE, tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sp_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tiny_corpus(), TINY_VOCAB_SIZE, tmp_path_factory.mktemp("tiny_sp"))


@pytest.fixture(scope="session")
def tiny_sp_tokenizer(tiny_sp_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_sp_tokenizer_dir)


@pytest.fixture(params=["json", "sentencepiece"], scope="session")
def any_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    """Each test using this runs once per file kind."""
    name = "tiny_tokenizer" if request.param == "json" else "tiny_sp_tokenizer"
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A complete model directory: a random-weight "tiny" Gemma (seeded) plus the tiny tokenizer.
    Loadable by `codegemma.load` and by transformers. Treat it as read-only."""
    import shutil

    from codegemma.checkpoint import save_model
    from codegemma.config import ModelConfig
    from codegemma.model import GemmaForCausalLM

    out = tmp_path_factory.mktemp("tiny_model") / "tiny"
    model = GemmaForCausalLM(ModelConfig.preset("tiny")).init_weights(std=0.3, seed=0)
    save_model(model, model.config, out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out
