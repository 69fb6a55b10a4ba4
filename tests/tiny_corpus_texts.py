"""The small built-in corpus the tiny test tokenizers are trained on (shared by conftest and tests).

A module with a unique name, not conftest: several conftest.py files exist, and `from conftest
import ...` would pick whichever was imported first.
"""

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
