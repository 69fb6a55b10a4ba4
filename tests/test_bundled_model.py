"""The bundled model (src/codegemma/assets/codegemma-tiny): it loads by default, transformers loads
the same directory and writes the same greedy completion, and the demo command works."""

from __future__ import annotations

import torch
import transformers

import codegemma
from codegemma import prompts
from codegemma.api import BUNDLED_MODEL
from codegemma.cli import main

PREFIX = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    '
SUFFIX = "\n\n\nprint(fibonacci(10))\n"


def test_bundled_model_is_complete_and_documented():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"):
        assert (BUNDLED_MODEL / name).is_file(), name
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.iterdir())
    assert size < 50 * 2**20  # the budget for shipped files


def test_loads_by_default_and_matches_transformers_greedy_fim():
    cg = codegemma.load(device="cpu")
    assert cg.path == BUNDLED_MODEL
    ids = prompts.fim_prompt(cg.tokenizer, PREFIX, SUFFIX)
    ours = cg.generate_results([ids], max_new_tokens=48)[0]

    hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    assert hf_tok(PREFIX, add_special_tokens=False)["input_ids"] == cg.tokenizer.encode(PREFIX)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=sorted(prompts.fim_stop_ids(cg.tokenizer)),
            pad_token_id=cg.tokenizer.pad_id,
        )[0, len(ids) :].tolist()
    assert ours.token_ids == out
    assert ours.text == hf_tok.decode(out, skip_special_tokens=True)


def test_demo_prints_a_completion(capsys):
    prefix, suffix = (
        "import os\n\n\ndef main(filename):\n    path = os.path.",
        "\n    return path\n",
    )
    args = ["complete", "--prefix", prefix, "--suffix", suffix, "--mode", "line"]
    assert main([*args, "--fim-mode", "spm", "--show", "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(prefix) and shown.endswith(suffix + "\n")
    middle = shown[len(prefix) : -len(suffix) - 1]
    assert middle and "\n" not in middle  # one line, in line mode
