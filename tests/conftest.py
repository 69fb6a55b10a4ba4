"""Shared test fixtures: tiny Gemma-layout tokenizers trained in well under a second.

`tiny_tokenizer_dir` / `tiny_tokenizer` are the tokenizer.json kind (vocab 512, the "tiny" model
preset's size); `tiny_sp_tokenizer_dir` / `tiny_sp_tokenizer` the sentencepiece tokenizer.model
kind. Both are trained once per session from the small built-in corpus below.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from codegemma.tokenizer import Tokenizer
from codegemma.train.tokenizer import train_sentencepiece, train_tokenizer

TINY_VOCAB_SIZE = 512

TINY_CORPUS: tuple[str, ...] = (
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n',
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "import os\nimport sys\n\n\ndef main(argv):\n    path = os.path.join(argv[1], 'data.txt')\n"
    "    with open(path, encoding='utf-8') as f:\n        return len(f.read())\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n",
    "def is_prime(n: int) -> bool:\n    if n < 2:\n        return False\n"
    "    for k in range(2, int(n ** 0.5) + 1):\n        if n % k == 0:\n            return False\n"
    "    return True\n",
    "# Grüße: naïve café, 日本語のコメント, emoji 🎉\nmessage = 'héllo wörld'\nprint(message)\n",
    "def read_lines(path):\n    with open(path) as f:\n        for line in f:\n"
    "            yield line.rstrip('\\n')\n",
    "result = {key: value for key, value in zip(keys, values) if value is not None}\n",
    "try:\n    x = int(text)\nexcept ValueError as e:\n    raise SystemExit(f'bad number: {e}')\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n"
    "    left = [x for x in xs[1:] if x < pivot]\n    right = [x for x in xs[1:] if x >= pivot]\n"
    "    return quicksort(left) + [pivot] + quicksort(right)\n",
    "@dataclass(frozen=True)\nclass Point:\n    x: float\n    y: float\n\n"
    "    def norm(self) -> float:\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
)


def tiny_corpus() -> list[str]:
    """The corpus, repeated so that common pairs pass the trainers' minimum frequency."""
    return list(TINY_CORPUS) * 4


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
