"""The product API: prefix, suffix and context files in, a clean middle out.

Prompts come from prompts.py (the layout training uses too); generation stops at any FIM sentinel
or eos (without this, models run on into the next file); the raw text then goes through the
middle rules of middle.py (no repetition loop, single-line or block mode, no repeat of the
suffix). When prompt and generation do not fit the context, context files are dropped first, then
the prefix is trimmed from the left and the suffix from the right, keeping the text nearest the
cursor.
"""

from __future__ import annotations

from collections.abc import Sequence

from codegemma import prompts
from codegemma.engine import Engine, SamplingParams
from codegemma.middle import FimRequest, clean
from codegemma.prompts import ContextFile, FimMode, PromptError


def fim_params(
    tokenizer, *, single_line: bool, stop: Sequence[str] = (), **options
) -> SamplingParams:
    """Sampling params for FIM: sentinels and eos stop; a newline stops a single-line completion."""
    stops = tuple(stop) + (("\n",) if single_line else ())
    return SamplingParams(
        stop_token_ids=prompts.fim_stop_ids(tokenizer), stop_strings=stops, **options
    )


def build_prompt(tokenizer, request: FimRequest, budget: int) -> list[int]:
    """The FIM prompt ids for `request`, fitted into `budget` tokens."""
    prefix, suffix, files = request.prefix, request.suffix, list(request.files)
    fim_mode = request.fim_mode
    ids = prompts.fim_prompt(
        tokenizer, prefix, suffix, mode=fim_mode, path=request.path, files=files
    )
    while len(ids) > budget and files:
        files.pop(0)  # the first context file is taken as the least relevant
        ids = prompts.fim_prompt(
            tokenizer, prefix, suffix, mode=fim_mode, path=request.path, files=files
        )
    if len(ids) > budget:
        excess = len(ids) - budget
        p_ids, s_ids = tokenizer.encode(prefix), tokenizer.encode(suffix)
        # take from the suffix only what the prefix cannot give while keeping a quarter of budget
        from_prefix = min(excess, max(0, len(p_ids) - budget // 4))
        from_suffix = excess - from_prefix
        prefix = _decode_tail(tokenizer, p_ids, from_prefix)
        suffix = tokenizer.decode(s_ids[: max(0, len(s_ids) - from_suffix)])
        ids = prompts.fim_prompt(tokenizer, prefix, suffix, mode=fim_mode, path=request.path)
    if len(ids) > budget:
        raise PromptError(
            f"the FIM prompt needs {len(ids)} tokens but only {budget} fit; "
            "lower max_new_tokens or use a model with a longer context"
        )
    return ids


def _decode_tail(tokenizer, ids: list[int], drop: int) -> str:
    text = tokenizer.decode(ids[drop:])
    return text.lstrip("\ufffd")  # a character cut in half at the new start is dropped


def complete_batch(
    engine: Engine,
    tokenizer,
    requests: Sequence[FimRequest],
    *,
    max_new_tokens: int = 128,
    stop: Sequence[str] = (),
    progress: bool = False,
    **options,
) -> list[str]:
    """Middles for many FIM requests, generated together."""
    budget = engine.max_seq_len - max_new_tokens
    if budget < 8:
        raise PromptError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
            f"the {engine.max_seq_len}-token context"
        )
    ids = [build_prompt(tokenizer, r, budget) for r in requests]
    params = [
        fim_params(
            tokenizer,
            single_line=r.single_line,
            stop=stop,
            max_new_tokens=max_new_tokens,
            **options,
        )
        for r in requests
    ]
    results = engine.generate(ids, params, progress=progress)
    return [
        clean(res.text, req, exhausted=res.finish_reason == "length")
        for res, req in zip(results, requests, strict=True)
    ]


def complete(
    engine: Engine,
    tokenizer,
    prefix: str,
    suffix: str = "",
    *,
    path: str | None = None,
    files: Sequence[ContextFile] = (),
    mode: str = "auto",
    fim_mode: FimMode | str = FimMode.PSM,
    **options,
) -> str:
    request = FimRequest(
        prefix=prefix, suffix=suffix, path=path, files=tuple(files), mode=mode, fim_mode=fim_mode
    )
    return complete_batch(engine, tokenizer, [request], **options)[0]
