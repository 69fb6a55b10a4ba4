"""From a validated request to engine jobs, and from engine events to response text.

`plan_completion`, `plan_chat` and `plan_infill` turn a request into a `Plan`: one `Choice` (prompt
ids + SamplingParams + how to post-process) per sequence to generate. They raise `APIError` (400)
naming the parameter at fault. FIM prompts and post-processing are completion.py's: requests with
`suffix`, llama.cpp `/infill`, and `/v1/completions` prompts written in CodeGemma's textual FIM
layout (`prompts.parse_fim_text`: what Continue sends for a model whose name contains "codegemma")
are all completed as FIM. Other prompts are plain continuations with BOS.

Untrusted text is bounded before it is tokenized: no token covers more than
`ServingContext.chars_per_token` characters (the tokenizer's longest piece), so at most
`max_prompt_chars` characters of any text can reach a prompt. A longer plain prompt is refused
after tokenizing only that many characters; a FIM request keeps only the end of its prefix, the
start of its suffix and the last context files that could fit, which is what fitting it into the
budget would keep anyway. No request costs more tokenizer time than the longest prompt that fits.

`run_plan` drives a submission's events through a per-choice text tracker and yields `Update`s
(text to send, finish reason). For FIM the tracker releases only whole lines of the
post-processed text while generating, so a streamed completion matches the non-streamed one, and
it cancels the sequence as soon as post-processing has cut the completion for good (a dedent out
of the block, a line repeating the suffix): no tokens are generated that would be thrown away.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from codegemma import completion, middle, prompts
from codegemma.engine import GenerationResult, SamplingParams
from codegemma.middle import FimRequest
from codegemma.prompts import ContextFile, PromptError
from codegemma.server import protocol
from codegemma.server.protocol import APIError
from codegemma.server.scheduler import Submission
from codegemma.server.settings import ServerSettings
from codegemma.tokenizer import TextCodec

MIN_FIM_BUDGET = 8  # a FIM prompt needs its sentinels and a few tokens of context


@dataclass(frozen=True, kw_only=True)
class ServingContext:
    """What planning needs to know: the tokenizer, the model's limits, the server's settings."""

    tokenizer: TextCodec
    max_seq_len: int
    vocab_size: int
    settings: ServerSettings
    capacity: int  # sequences the scheduler can ever hold at once (slots + queue)
    chars_per_token: int  # the most characters one token covers (see `longest_piece`)

    @property
    def max_prompt_tokens(self) -> int:
        limit = self.settings.max_prompt_tokens or self.max_seq_len - 1
        return min(limit, self.max_seq_len - 1)

    @property
    def max_prompt_chars(self) -> int:
        """More characters than any text of `max_prompt_tokens` tokens can have."""
        return self.chars_for(self.max_prompt_tokens)

    def chars_for(self, tokens: int) -> int:
        """A text longer than this has more than `tokens` tokens."""
        return (tokens + 1) * self.chars_per_token


def longest_piece(tokenizer: TextCodec) -> int:
    """The most characters one token of `tokenizer` decodes to: a bound on the characters it covers
    in encoded text, as long as the tokenizer's normalizer does not shrink text (Gemma's only turns
    spaces into its space marker)."""
    return max(1, max(len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)))


@dataclass(frozen=True, kw_only=True)
class Choice:
    prompt_ids: list[int]
    params: SamplingParams
    fim: FimRequest | None = None  # FIM post-processing, None for plain text
    echo: str = ""  # sent before the generated text (`echo`)


@dataclass(frozen=True, kw_only=True)
class Plan:
    choices: list[Choice]
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def jobs(self) -> list[tuple[list[int], SamplingParams]]:
        return [(c.prompt_ids, c.params) for c in self.choices]


# -- planning ------------------------------------------------------------------------------------
def _limit_tokens(ctx: ServingContext, value: int | None, default: int, param: str) -> int:
    tokens = default if value is None else value
    if tokens > ctx.settings.max_tokens:
        raise APIError(
            400,
            f"{param}={tokens} is above this server's limit of {ctx.settings.max_tokens}",
            param=param,
            code="invalid_value",
        )
    return tokens


def _check_choices(ctx: ServingContext, count: int) -> None:
    if count > ctx.settings.max_n:
        raise APIError(
            400,
            f"the request asks for {count} sequences (n x prompts); the limit is "
            f"{ctx.settings.max_n}",
            param="n",
            code="invalid_value",
        )
    if count > ctx.capacity:  # would be refused with 503 however long the client waited
        raise APIError(
            400,
            f"the request asks for {count} sequences (n x prompts) but this server holds at most "
            f"{ctx.capacity} at once (its slots plus its queue); lower n",
            param="n",
            code="invalid_value",
        )


def _check_length(ctx: ServingContext, prompt_tokens: int, max_tokens: int, param: str) -> None:
    if prompt_tokens > ctx.max_prompt_tokens or prompt_tokens + max_tokens > ctx.max_seq_len:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx.max_seq_len} tokens (prompts at most "
            f"{ctx.max_prompt_tokens}); you requested {prompt_tokens + max_tokens} tokens "
            f"({prompt_tokens} in the prompt, {max_tokens} for the completion). Shorten the "
            "prompt or lower max_tokens.",
            param=param,
            code="context_length_exceeded",
        )


def _refuse_if_too_long(ctx: ServingContext, text: str, param: str) -> None:
    """400 for a text that cannot fit in a prompt, having tokenized at most `max_prompt_chars` of
    it. (Should a tokenizer that shrinks text find that many characters to fit, the caller goes
    on to tokenize the whole text, as it would have anyway.)"""
    cap = ctx.max_prompt_chars
    if len(text) <= cap:
        return
    head = len(ctx.tokenizer.encode(text[:cap]))
    if head > ctx.max_prompt_tokens:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx.max_seq_len} tokens (prompts at most "
            f"{ctx.max_prompt_tokens}); the prompt has {len(text)} characters and its first {cap} "
            f"alone are {head} tokens. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def _within_reach(request: FimRequest, chars: int) -> FimRequest:
    """`request` without the text that cannot reach a FIM prompt of at most `chars` characters'
    worth of tokens: the prefix before its last `chars` characters, the suffix after its first
    `chars`, and the leading context files that would be dropped (build_prompt drops files from
    the front until the prompt fits, and files of more characters than `chars` never fit)."""
    files = list(request.files)
    size = sum(len(f.path) + len(f.text) for f in files)
    while files and size > chars:
        size -= len(files[0].path) + len(files[0].text)
        files.pop(0)
    return dataclasses.replace(
        request, prefix=request.prefix[-chars:], suffix=request.suffix[:chars], files=tuple(files)
    )


def _fim_ids(ctx: ServingContext, request: FimRequest, max_tokens: int, param: str) -> list[int]:
    budget = min(ctx.max_seq_len - max_tokens, ctx.max_prompt_tokens)
    if budget < MIN_FIM_BUDGET:
        raise APIError(
            400,
            f"max_tokens={max_tokens} leaves no room for a FIM prompt in the "
            f"{ctx.max_seq_len}-token context",
            param=param,
            code="context_length_exceeded",
        )
    try:
        return completion.build_prompt(
            ctx.tokenizer, _within_reach(request, ctx.chars_for(budget)), budget
        )
    except (ValueError, PromptError) as e:
        raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None


def plan_completion(ctx: ServingContext, req: protocol.CompletionRequest) -> Plan:
    max_tokens = _limit_tokens(
        ctx, req.max_tokens, ctx.settings.default_completion_tokens, "max_tokens"
    )
    texts = req.prompts()
    _check_choices(ctx, len(texts) * req.n)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (or be left out)", param="best_of")
    choices, prompt_tokens = [], 0
    for prompt in texts:
        choice = _completion_choice(ctx, req, prompt, max_tokens)
        prompt_tokens += len(choice.prompt_ids)
        for i in range(req.n):
            params = req.to_sampling_params(
                max_new_tokens=max_tokens,
                stop_token_ids=choice.params.stop_token_ids,
                stop_strings=choice.params.stop_strings,
                seed_offset=i,
            )
            choices.append(
                Choice(
                    prompt_ids=choice.prompt_ids, params=params, fim=choice.fim, echo=choice.echo
                )
            )
    return Plan(choices=choices, prompt_tokens=prompt_tokens)


def _completion_choice(
    ctx: ServingContext, req: protocol.CompletionRequest, prompt: str | list[int], max_tokens: int
) -> Choice:
    """The prompt ids, stops and post-processing of one prompt (sampling is set by the caller)."""
    layout = (
        prompts.parse_fim_text(prompt) if isinstance(prompt, str) and req.suffix is None else None
    )
    if req.suffix is not None or layout is not None:
        return _fim_choice(ctx, req, prompt, layout, max_tokens)
    tok = ctx.tokenizer
    if isinstance(prompt, str):
        _refuse_if_too_long(ctx, prompt, "prompt")
        ids = tok.encode(prompt, bos=True)
    else:
        if max(prompt) >= ctx.vocab_size:
            raise APIError(
                400,
                f"token id {max(prompt)} is invalid: {protocol.TOKEN_IDS} {ctx.vocab_size}",
                param="prompt",
                code="invalid_value",
            )
        ids = list(prompt)
    _check_length(ctx, len(ids), max_tokens, "prompt")
    echo = (prompt if isinstance(prompt, str) else tok.decode(prompt)) if req.echo else ""
    params = SamplingParams(
        stop_token_ids=prompts.fim_stop_ids(tok), stop_strings=tuple(req.stop_strings())
    )
    return Choice(prompt_ids=ids, params=params, echo=echo)


def _fim_choice(
    ctx: ServingContext,
    req: protocol.CompletionRequest,
    prompt: str | list[int],
    layout: tuple[str, str] | None,
    max_tokens: int,
) -> Choice:
    """A completion request with `suffix`, or a prompt in the textual FIM layout."""
    if req.echo:
        raise APIError(
            400,
            "echo cannot be combined with suffix (FIM): the prompt is not "
            "the text before the completion",
            param="echo",
        )
    if not isinstance(prompt, str):
        raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
    prefix, suffix = layout or (prompt, req.suffix or "")
    fim = FimRequest(
        prefix=prefix, suffix=suffix, mode=req.completion_mode, fim_mode=ctx.settings.fim_mode
    )
    ids = _fim_ids(ctx, fim, max_tokens, "max_tokens")
    stops = req.stop_strings() + (["\n"] if fim.single_line else [])
    params = SamplingParams(
        stop_token_ids=prompts.fim_stop_ids(ctx.tokenizer), stop_strings=tuple(stops)
    )
    return Choice(prompt_ids=ids, params=params, fim=fim)


def plan_chat(ctx: ServingContext, req: protocol.ChatCompletionRequest) -> Plan:
    _check_choices(ctx, req.n)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in req.messages
    ]
    _refuse_if_too_long(ctx, "".join(m["content"] for m in messages), "messages")
    try:
        ids = prompts.chat_prompt(ctx.tokenizer, prompts.fold_system(messages))
    except PromptError as e:
        raise APIError(400, str(e), param="messages") from None
    room = max(0, ctx.max_seq_len - len(ids))
    max_tokens = _limit_tokens(
        ctx, req.token_limit, min(ctx.settings.max_tokens, room), "max_completion_tokens"
    )
    _check_length(ctx, len(ids), max_tokens, "messages")
    stop_ids = prompts.chat_stop_ids(ctx.tokenizer)
    choices = [
        Choice(
            prompt_ids=ids,
            params=req.to_sampling_params(
                max_new_tokens=max_tokens,
                stop_token_ids=stop_ids,
                stop_strings=req.stop_strings(),
                seed_offset=i,
            ),
        )
        for i in range(req.n)
    ]
    return Plan(choices=choices, prompt_tokens=len(ids))


def plan_infill(ctx: ServingContext, req: protocol.InfillRequest) -> Plan:
    n_predict = _limit_tokens(
        ctx, None if req.n_predict < 0 else req.n_predict, ctx.settings.max_tokens, "n_predict"
    )
    fim = FimRequest(
        prefix=req.input_prefix + req.prompt,
        suffix=req.input_suffix,
        files=tuple(ContextFile(path=c.filename, text=c.text) for c in req.input_extra),
        fim_mode=ctx.settings.fim_mode,
    )
    ids = _fim_ids(ctx, fim, n_predict, "n_predict")
    if n_predict == 0:  # llama.vscode's cache warm-up: nothing to generate, nothing to cache
        return Plan(choices=[], prompt_tokens=len(ids))
    stops = list(req.stop) + (["\n"] if fim.single_line else [])
    params = req.to_sampling_params(
        max_new_tokens=n_predict,
        stop_token_ids=prompts.fim_stop_ids(ctx.tokenizer),
        stop_strings=stops,
    )
    return Plan(choices=[Choice(prompt_ids=ids, params=params, fim=fim)], prompt_tokens=len(ids))


# -- running -------------------------------------------------------------------------------------
class TextTracker:
    """Plain text: every delta is released as it comes."""

    def __init__(self) -> None:
        self.text = ""
        self.cut = False

    def push(self, delta: str) -> str:
        self.text += delta
        return delta

    def finish(self, delta: str) -> str:
        return self.push(delta)


class FimTracker:
    """FIM text: releases whole lines of the post-processed completion; `cut` once a
    post-processing rule has ended the completion for good."""

    def __init__(self, request: FimRequest) -> None:
        self.request, self.raw, self.text, self.cut = request, "", "", False

    def push(self, delta: str) -> str:
        self.raw += delta
        processed = middle.clean(self.raw, self.request)
        # Rules that cut at a line boundary do so for good once the offending line is complete
        # (measured before the whitespace-only rule, which more text can still undo).
        end = len(middle.truncate(self.raw, self.request))
        self.cut = (
            end < len(self.raw) and self.raw[end] == "\n" and self.raw.find("\n", end + 1) >= 0
        )
        # The last line (and its newline: a later cut drops it) may still change.
        if not self.cut:
            stable = processed[: max(processed.rfind("\n"), 0)]
            # Two rules act on the end of the final text: it may start repeating the suffix
            # (trimmed), or be whitespace only (dropped). Hold back what either could still take.
            stable = stable[: len(stable) - middle.suffix_overlap(stable, self.request.suffix)]
            if not stable.strip():
                return ""
            processed = stable
        return self._release(processed)

    def finish(self, delta: str) -> str:
        self.raw += delta
        return self._release(middle.clean(self.raw, self.request))

    def _release(self, stable: str) -> str:
        if len(stable) <= len(self.text) or not stable.startswith(self.text):
            return ""  # nothing new (or a tail rule trimmed sent text, which cannot be unsent)
        delta, self.text = stable[len(self.text) :], stable
        return delta


@dataclass(frozen=True)
class Update:
    index: int
    text: str
    finish_reason: str | None = None
    result: GenerationResult | None = None


def finish_reason(result: GenerationResult, tracker: TextTracker | FimTracker) -> str:
    if tracker.cut or (isinstance(tracker, FimTracker) and tracker.text != tracker.raw):
        return "stop"  # post-processing ended it
    return "length" if result.finish_reason == "cancelled" else result.finish_reason


async def run_plan(submission: Submission, plan: Plan) -> AsyncIterator[Update]:
    """Updates of every choice, in the order they happen; each choice ends with one whose
    finish_reason is set."""
    trackers = [FimTracker(c.fim) if c.fim else TextTracker() for c in plan.choices]
    async for index, event in submission.events():
        tracker = trackers[index]
        if event.finished:
            text = tracker.finish(event.delta)
            reason = finish_reason(event.result, tracker)
            yield Update(index, text, reason, event.result)
            continue
        text = tracker.push(event.delta)
        if tracker.cut:
            submission.cancel(index)  # its final event follows
        if text:
            yield Update(index, text)


@dataclass
class Collected:
    texts: list[str]
    reasons: list[str]
    results: list[GenerationResult]

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results)


async def collect(submission: Submission, plan: Plan) -> Collected:
    n = len(plan.choices)
    texts, reasons, results = [c.echo for c in plan.choices], [""] * n, [None] * n
    async for update in run_plan(submission, plan):
        texts[update.index] += update.text
        if update.finish_reason is not None:
            reasons[update.index], results[update.index] = update.finish_reason, update.result
    return Collected(texts, reasons, results)  # type: ignore[arg-type]
