"""Interop with llama.cpp itself (slow; needs `make llamacpp`, which this test never runs).

The bundled model exported by `codegemma export gguf` (f32, bf16, q8_0, q4_0), and the files
llama.cpp's `llama-quantize` writes from our f32 export (Q8_0, Q4_0, Q4_K_M): on each, llama.cpp's
greedy tokens (llama-server `/completion` fed our token ids, so the two tokenizers cannot blur the
comparison) equal ours (`codegemma.load(file)`) for FIM prompts, the first 16 tokens, both
stopping at the same end-of-generation ids; llama.cpp tokenizes text as our tokenizer does; and
`/infill` ends at `<|file_separator|>` without showing it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import llamacpp  # noqa: E402

import codegemma  # noqa: E402
from codegemma.api import BUNDLED_MODEL  # noqa: E402
from codegemma.export import export_gguf  # noqa: E402
from codegemma.prompts import fim_prompt  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        llamacpp.tools() is None,
        reason=f"llama.cpp is not built: {llamacpp.BUILD_HINT}",
    ),
]

N_TOKENS = 16
# (prefix, suffix): code the bundled model (trained on the CPython standard library) has seen
FIM_CASES = [
    ("import os\n\n\ndef main(filename):\n    path = os.path.", "\n    return path\n"),
    (
        "def fib(n):\n    if n < 2:\n        return n\n    return ",
        "\n\n\nprint(fib(10))\n",
    ),
    ("class Stack:\n    def __init__(self):\n        self.items = ", "\n\n    def push(self, x):"),
]
OUR_TYPES = ("f32", "bf16", "q8_0", "q4_0")
LLAMA_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")  # llama-quantize from our f32 export


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    found = {}
    for t in OUR_TYPES:
        found[f"ours-{t}"] = export_gguf(BUNDLED_MODEL, out / f"tiny-{t}.gguf", type=t)
    for t in LLAMA_TYPES:
        found[f"llama-quantize-{t}"] = llamacpp.llama_quantize(
            found["ours-f32"], out / f"tiny-llama-{t}.gguf", t
        )
    return found


@pytest.fixture(scope="module")
def bundled():
    return codegemma.load(None, device="cpu")


def eog_ids(tok) -> frozenset[int]:
    """The ids llama.cpp ends generation at on our files: eos, <end_of_turn> (eot_token_id) and
    <|file_separator|> (fim_sep_token_id)."""
    sp = tok.special
    return frozenset(i for i in (sp.eos, sp.end_of_turn, sp.file_separator) if i is not None)


def llama_greedy(url: str, ids: list[int], n: int) -> dict:
    """llama-server's greedy continuation of token ids, with the tokens it generated."""
    return llamacpp.post(
        url + "/completion",
        {
            "prompt": ids,
            "n_predict": n,
            "temperature": 0.0,
            "top_k": 1,
            "samplers": ["top_k"],
            "cache_prompt": False,
            "return_tokens": True,
            "n_probs": 2,
        },
    )


def llama_tokens(response: dict) -> list[int]:
    """The generated ids, the end-of-generation token included (llama.cpp leaves it out of
    `tokens` but reports it in `completion_probabilities`)."""
    probs = response.get("completion_probabilities") or []
    if len(probs) > len(response["tokens"]):
        return [int(p["id"]) for p in probs]
    return [int(t) for t in response["tokens"]]


@pytest.fixture(
    scope="module",
    params=[*(f"ours-{t}" for t in OUR_TYPES)] + [f"llama-quantize-{t}" for t in LLAMA_TYPES],
)
def served(request, files, tmp_path_factory):
    """(name, file, llama-server url, our model on the same file)."""
    name = request.param
    path = files[name]
    port = llamacpp.free_port()
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    cmd = llamacpp.llama_server_cmd(path, port, threads=2, ctx=2048)
    ours = codegemma.load(path, device="cpu")
    if ours.model.quantized:  # llama.cpp's activations are fp32 (where ours default to bf16)
        ours = codegemma.load(path, dtype="float32", device="cpu")
    with llamacpp.server_process(cmd, port, log, timeout=120) as (url, _):
        yield name, path, url, ours


def test_greedy_tokens_equal_llamacpp(served):
    name, _, url, ours = served
    stop = eog_ids(ours.tokenizer)
    for prefix, suffix in FIM_CASES:
        ids = fim_prompt(ours.tokenizer, prefix, suffix)
        response = llama_greedy(url, ids, N_TOKENS)
        theirs = llama_tokens(response)
        mine = ours.generate_results(
            [ids], max_new_tokens=N_TOKENS, temperature=0.0, stop_token_ids=stop
        )[0].token_ids
        assert mine == theirs, (
            f"{name}: greedy tokens differ for prefix {prefix!r}\nours:      {mine}\n"
            f"llama.cpp: {theirs}\nllama.cpp's top-2 at each step: "
            f"{[p.get('top_probs') for p in response.get('completion_probabilities', [])]}"
        )


def test_llamacpp_tokenizes_as_we_do(served):
    name, _, url, ours = served
    for prefix, suffix in FIM_CASES:
        for text in (prefix, suffix, prefix + suffix):
            theirs = llamacpp.post(url + "/tokenize", {"content": text, "add_special": False})
            assert theirs["tokens"] == ours.tokenizer.encode(text), (name, text)


def infill_with_separator_forced(path: Path, sep: int, log: Path) -> dict:
    """llama-server's /infill on `path` with <|file_separator|> made the greedy choice at every
    step (logit_bias), so whether it ends there depends on the file's metadata only."""
    port = llamacpp.free_port()
    cmd = llamacpp.llama_server_cmd(path, port, threads=2, ctx=2048)
    with llamacpp.server_process(cmd, port, log, timeout=120) as (url, _):
        return llamacpp.post(
            url + "/infill",
            {
                "input_prefix": FIM_CASES[0][0],
                "input_suffix": FIM_CASES[0][1],
                "n_predict": 8,
                "temperature": 0.0,
                "top_k": 1,
                "samplers": ["top_k"],
                "logit_bias": [[sep, 100.0]],
                "return_tokens": True,
                "n_probs": 1,
            },
        )


def test_infill_stops_at_file_separator(files, bundled, tmp_path):
    """On our export /infill ends at <|file_separator|> (stop_type "eos") without showing it;
    the same file without our `tokenizer.ggml.fim_sep_token_id` (as llama.cpp's converter writes
    CodeGemma) runs on past it to the token limit."""
    sep = bundled.tokenizer.special.file_separator
    r = infill_with_separator_forced(files["ours-f32"], sep, tmp_path / "ours.log")
    assert r["stop_type"] == "eos", r
    assert llama_tokens(r) == [sep], r
    assert r["content"] == "", r

    stripped = tmp_path / "no-fim-sep.gguf"
    cmd = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(files["ours-f32"])]
    cmd += [str(stripped), "--remove-metadata", "tokenizer.ggml.fim_sep_token_id", "--force"]
    subprocess.run(cmd, check=True, capture_output=True)
    r = infill_with_separator_forced(stripped, sep, tmp_path / "stripped.log")
    assert r["stop_type"] == "limit", r
    assert llama_tokens(r) == [sep] * 8, r
