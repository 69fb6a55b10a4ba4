"""The product API: prefix, suffix and context files in, a clean middle out.

What makes raw FIM output usable in an editor (the practice of Tabby, Continue and llama.vim,
shared/reference/codegemma-facts.md):
- stop at any FIM sentinel or eos (without this, models run on into the next file);
- single-line mode when the cursor is mid-line (`mode="auto"`: non-blank text follows the cursor on
  its line), cut at the first newline; otherwise block mode, cut where a line dedents out of the
  cursor's block;
- trim output that starts repeating the suffix: a completion line equal to the suffix's next
  non-blank line, or a tail equal to the suffix's beginning;
- whitespace-only output becomes "".
Prompts come from prompts.py (the layout training uses too). When prompt and generation do not fit
the context, context files are dropped first, then the prefix is trimmed from the left and the
suffix from the right, keeping the text nearest the cursor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from codegemma import prompts
from codegemma.engine import Engine, SamplingParams
from codegemma.prompts import ContextFile, FimMode

MODES = ("auto", "line", "block")


@dataclass(frozen=True, kw_only=True)
class CompletionRequest:
    prefix: str
    suffix: str = ""
    path: str | None = None
    files: tuple[ContextFile, ...] = ()
    mode: str = "auto"  # auto | line | block
    fim_mode: FimMode = FimMode.PSM  # the prompt layout; CodeGemma documents PSM

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "fim_mode", FimMode(self.fim_mode))
        files = tuple(f if isinstance(f, ContextFile) else ContextFile(**f) for f in self.files)
        object.__setattr__(self, "files", files)

    @property
    def single_line(self) -> bool:
        if self.mode != "auto":
            return self.mode == "line"
        return cursor_is_mid_line(self.suffix)


def cursor_is_mid_line(suffix: str) -> bool:
    return bool(suffix.split("\n", 1)[0].strip())


def fim_params(
    tokenizer, *, single_line: bool, stop: Sequence[str] = (), **options
) -> SamplingParams:
    """Sampling params for FIM: sentinels and eos stop; a newline stops a single-line completion."""
    stops = tuple(stop) + (("\n",) if single_line else ())
    return SamplingParams(
        stop_token_ids=prompts.fim_stop_ids(tokenizer), stop_strings=stops, **options
    )


def build_prompt(tokenizer, request: CompletionRequest, budget: int) -> list[int]:
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
        raise ValueError(
            f"the FIM prompt needs {len(ids)} tokens but only {budget} fit; "
            "lower max_new_tokens or use a model with a longer context"
        )
    return ids


def _decode_tail(tokenizer, ids: list[int], drop: int) -> str:
    text = tokenizer.decode(ids[drop:])
    return text.lstrip("\ufffd")  # a character cut in half at the new start is dropped


def postprocess(text: str, request: CompletionRequest) -> str:
    """The editor-ready middle from raw generated text: `truncate`, then nothing at all if only
    whitespace is left."""
    text = truncate(text, request)
    return "" if not text.strip() else text


def truncate(text: str, request: CompletionRequest) -> str:
    """The rules that end a completion early: the first line only (single-line mode) or the
    cursor's block, and no repeat of the suffix. A streaming server stops generating once one of
    them has cut (serving.FimTracker)."""
    if request.single_line:
        text = text.split("\n", 1)[0]
    else:
        text = _limit_to_block(text, request.prefix)
    return _trim_suffix_repeat(text, request.suffix)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _limit_to_block(text: str, prefix: str) -> str:
    """Cut before the first later line that dedents below the cursor's block.

    The block's indentation: the cursor line's, if it has text; the cursor's column, if the line is
    only indentation; at column 0, the last non-blank line's (one deeper if it opens a block)."""
    current = prefix.rsplit("\n", 1)[-1]
    if current.strip():
        base = _indent(current)
    elif current:
        base = len(current)
    else:
        previous = [ln for ln in prefix.split("\n")[:-1] if ln.strip()]
        if not previous:
            return text
        opens = previous[-1].rstrip().endswith((":", "{", "(", "["))
        base = _indent(previous[-1]) + opens
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and _indent(line) < base:
            return "\n".join(lines[:i])  # the suffix brings its own newline
    return text


def _trim_suffix_repeat(text: str, suffix: str) -> str:
    """Cut where the completion starts repeating the suffix."""
    next_line = next((ln.strip() for ln in suffix.split("\n") if ln.strip()), "")
    if next_line:
        lines = text.split("\n")
        for i, line in enumerate(lines[1:], start=1):
            if line.strip() == next_line:
                return "\n".join(lines[:i])
    for k in range(min(len(text), len(suffix)), 0, -1):
        if suffix[:k].strip() and text.endswith(suffix[:k]):
            return text[:-k]
    return text


def complete_batch(
    engine: Engine,
    tokenizer,
    requests: Sequence[CompletionRequest],
    *,
    max_new_tokens: int = 128,
    stop: Sequence[str] = (),
    progress: bool = False,
    **options,
) -> list[str]:
    """Middles for many FIM requests, generated together."""
    budget = engine.max_seq_len - max_new_tokens
    if budget < 8:
        raise ValueError(
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
    return [postprocess(res.text, req) for res, req in zip(results, requests, strict=True)]


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
    request = CompletionRequest(
        prefix=prefix, suffix=suffix, path=path, files=tuple(files), mode=mode, fim_mode=fim_mode
    )
    return complete_batch(engine, tokenizer, [request], **options)[0]
