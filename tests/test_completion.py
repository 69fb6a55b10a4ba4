"""completion.py: prompt fitting, stops at sentinels, single-line/block modes, suffix-repeat trims.

End-to-end cases run the real engine over a *scripted* model: a module that emits a fixed token
sequence after the prompt, so the test controls exactly what "the model" writes.
"""

from __future__ import annotations

import pytest
from scripted_model import ScriptedModel

from codegemma import prompts
from codegemma.completion import build_prompt, complete, complete_batch
from codegemma.config import ModelConfig
from codegemma.engine import Engine
from codegemma.middle import FimRequest, clean, cursor_is_mid_line


def run(tokenizer, text: str, request: FimRequest, *, sentinel: int | None = None, **kw) -> str:
    script = tokenizer.encode(text) + ([sentinel] if sentinel is not None else [])
    script += tokenizer.encode("\nTAIL_AFTER_THE_END\n")
    engine = Engine(ScriptedModel(script), tokenizer, max_batch_size=1)
    return complete_batch(engine, tokenizer, [request], max_new_tokens=len(script), **kw)[0]


def test_stops_at_every_fim_sentinel_and_eos(tiny_tokenizer):
    sp = tiny_tokenizer.special
    req = FimRequest(prefix="def f(x):\n    return ", suffix="", mode="block")
    for sentinel in (sp.fim_prefix, sp.fim_suffix, sp.fim_middle, sp.file_separator, sp.eos):
        assert run(tiny_tokenizer, "x + 1", req, sentinel=sentinel) == "x + 1"


def test_single_line_when_the_cursor_is_mid_line(tiny_tokenizer):
    req = FimRequest(prefix="total = add(", suffix=")\nprint(total)\n")
    assert req.single_line
    assert run(tiny_tokenizer, "a, b\nc = 3", req) == "a, b"


def test_suffix_repeat_at_the_end_is_trimmed(tiny_tokenizer):
    req = FimRequest(prefix="total = add(", suffix=")\n")
    assert run(tiny_tokenizer, "a, b)", req) == "a, b"


def test_block_mode_stops_where_the_block_ends(tiny_tokenizer):
    req = FimRequest(prefix="def f(x):\n    ", suffix="\n\nprint(f(2))\n")
    assert not req.single_line
    text = "y = x * 2\n    return y\ndef g():\n    pass"
    assert (
        run(tiny_tokenizer, text, req, sentinel=tiny_tokenizer.eos_id) == "y = x * 2\n    return y"
    )


def test_block_mode_stops_before_repeating_the_suffix(tiny_tokenizer):
    req = FimRequest(prefix="def f(x):\n    ", suffix="\n    return y\n")
    text = "y = x + 1\n    return y\n"
    assert run(tiny_tokenizer, text, req, sentinel=tiny_tokenizer.eos_id) == "y = x + 1"


def test_a_repetition_loop_is_cut_after_its_first_copy(tiny_tokenizer):
    req = FimRequest(prefix="def f(x):\n    ", suffix="\n", mode="block")
    text = "y = 1\n    " + "import sys\n    " * 30
    assert run(tiny_tokenizer, text, req) == "y = 1\n    import sys\n"


def test_a_loop_the_token_limit_ends_in_is_cut_at_the_tail_threshold(tiny_tokenizer):
    """A short loop counts only when generation ran out of tokens inside it: the same text that
    ends with eos keeps it."""
    req = FimRequest(prefix="values = [", suffix="]\n")
    script = tiny_tokenizer.encode("1, " + "0, " * 12)
    engine = Engine(ScriptedModel(script), tiny_tokenizer, max_batch_size=1)
    exhausted = complete_batch(engine, tiny_tokenizer, [req], max_new_tokens=len(script))[0]
    assert exhausted == "1, 0"  # the loop is ", 0" from the first comma on
    ended = script + [tiny_tokenizer.eos_id]
    engine = Engine(ScriptedModel(ended), tiny_tokenizer, max_batch_size=1)
    assert complete_batch(engine, tiny_tokenizer, [req], max_new_tokens=len(ended))[0] == (
        "1, " + "0, " * 12
    )


def test_user_stop_strings(tiny_tokenizer):
    req = FimRequest(prefix="x = ", suffix="", mode="block")
    assert run(tiny_tokenizer, "1  # done", req, stop=["  #"]) == "1"


@pytest.mark.parametrize(
    ("suffix", "mid_line"),
    [("", False), ("\n", False), ("   \nfoo", False), (")", True), ("  x\n", True)],
)
def test_cursor_mid_line(suffix, mid_line):
    assert cursor_is_mid_line(suffix) is mid_line


def test_middle_rules():
    line = FimRequest(prefix="a = ", suffix="  # note", mode="line")
    assert clean("1\n2", line) == "1"
    assert clean("   \n\t", FimRequest(prefix="x", mode="block")) == ""
    top = FimRequest(prefix="import os\n", suffix="", mode="block")
    assert clean("def f():\n    pass\n\nx = 1\n", top) == "def f():\n    pass\n\nx = 1\n"
    body = FimRequest(prefix="class A:\n    def f(self):\n", suffix="", mode="block")
    # at column 0 after `def f(self):` the block is f's body: the next method ends it
    got = clean("        return 1\n    def g(self):\n        pass\nB = 1", body)
    assert got == "        return 1"
    method = FimRequest(prefix="class A:\n    def f(self):\n        ", mode="block")
    assert clean("return 1\n    def g(self):\n        pass", method) == "return 1"


def test_prompt_is_fitted_into_the_budget(tiny_tokenizer):
    files = tuple(
        prompts.ContextFile(path=f"lib/m{i}.py", text="def helper():\n    return 42\n" * 5)
        for i in range(3)
    )
    req = FimRequest(
        prefix="def main():\n" + "    x = 1\n" * 80 + "    ",
        suffix="\n" * 3 + "print(main())\n" * 30,
        path="app.py",
        files=files,
    )
    full = build_prompt(tiny_tokenizer, req, budget=10_000)
    assert len(full) > 400
    fitted = build_prompt(tiny_tokenizer, req, budget=200)
    assert len(fitted) <= 200
    sp = tiny_tokenizer.special
    assert sp.file_separator not in fitted  # context files go first
    pre = fitted[fitted.index(sp.fim_prefix) + 1 : fitted.index(sp.fim_suffix)]
    suf = fitted[fitted.index(sp.fim_suffix) + 1 : fitted.index(sp.fim_middle)]
    assert req.prefix.endswith(tiny_tokenizer.decode(pre))  # the text nearest the cursor stays
    assert req.suffix.startswith(tiny_tokenizer.decode(suf))
    assert fitted[0] == sp.bos and fitted[-1] == sp.fim_middle


def test_real_model_completion_is_clean_text(tiny_tokenizer):
    from codegemma.model import GemmaForCausalLM

    model = GemmaForCausalLM(ModelConfig.preset("tiny")).init_weights(std=0.3, seed=0)
    engine = Engine(model, tiny_tokenizer)
    out = complete(engine, tiny_tokenizer, "def add(a, b):\n    return ", "\n", max_new_tokens=16)
    line = complete(engine, tiny_tokenizer, "x = f(", ")\n", max_new_tokens=16)
    assert isinstance(out, str) and "\n" not in line
    for text in (out, line):
        assert "<|fim" not in text and "<|file_separator|>" not in text
