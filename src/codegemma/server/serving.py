"""From a validated request to engine jobs, and from engine events to response text.

`plan_completion`, `plan_chat`, `plan_infill` and `plan_llama_completion` turn a request into a
`Plan`: one `Choice` (prompt ids + SamplingParams + how to post-process) per sequence to
generate. They raise `APIError` (400) naming the parameter at fault. FIM prompts and
post-processing are completion.py's: requests with `suffix`, llama.cpp `/infill`, and prompts of
`/v1/completions` or `/completion` written in CodeGemma's textual FIM layout
(`prompts.parse_fim_text`: what Continue sends for a model whose name contains "codegemma", what
Tabby's llama.cpp binding sends with a CodeGemma template) are all completed as FIM. `/infill`
prompts are fitted as llama.cpp fits them (`prompts.fit_infill_prompt`). Other prompts are plain
continuations with BOS.

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
of the block, a line repeating the suffix, a repetition loop): no tokens are generated that would
be thrown away.
llama.cpp's `n_indent` and `t_max_predict_ms` (`OutputLimits`) act on the raw text before that,
and end the sequence the way llama.cpp's server does; `ignore_eos` turns off every rule that
would end it before `n_predict` tokens (stop tokens, the FIM rules' early cancel).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from codegemma import completion, middle, prompts
from codegemma.engine import GenerationResult, SamplingParams
from codegemma.middle import FimRequest
from codegemma.prompts import ContextFile, PromptError
from codegemma.server import protocol
from codegemma.server.protocol import APIError
from codegemma.server.scheduler import SequenceTiming, Submission
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
    slots: int = 1  # engine slots (llama.cpp's `id_slot` names one of them)

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


@dataclass(frozen=True)
class Limits:
    """llama.cpp's output limits of one request (0 = off)."""

    n_indent: int = 0
    t_max_predict_ms: int = 0

    def __bool__(self) -> bool:
        return bool(self.n_indent or self.t_max_predict_ms)


@dataclass(frozen=True, kw_only=True)
class Choice:
    prompt_ids: list[int]
    params: SamplingParams
    fim: FimRequest | None = None  # FIM post-processing, None for plain text
    echo: str = ""  # sent before the generated text (`echo`)
    bos_added: bool = False  # prompt_ids[0] is a BOS the server put before a text prompt
    limits: Limits = Limits()
    keep_going: bool = False  # ignore_eos: post-processing never ends the sequence early
    reply: bool = False  # a reply (chat): a repetition loop is cut (middle.ReplyGuard)


@dataclass(frozen=True, kw_only=True)
class Plan:
    choices: list[Choice]
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))
    logprobs: int | None = None  # top-k log-probabilities to report per token (None: none)
    score_prompt: bool = False  # report the prompt's tokens too (`echo` with `logprobs`)
    truncated: bool = False  # the prompt was cut to fit the context
    copies: int = 1  # results per choice: a greedy choice asked for n times is generated once

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


def _fim_budget(ctx: ServingContext, max_tokens: int, param: str) -> int:
    """Prompt tokens a FIM request generating `max_tokens` (request field `param`) may use."""
    budget = min(ctx.max_seq_len - max_tokens, ctx.max_prompt_tokens)
    if budget < MIN_FIM_BUDGET:
        raise APIError(
            400,
            f"{param}={max_tokens} leaves no room for a FIM prompt in the "
            f"{ctx.max_seq_len}-token context",
            param=param,
            code="context_length_exceeded",
        )
    return budget


def _fim_ids(ctx: ServingContext, request: FimRequest, max_tokens: int, param: str) -> list[int]:
    budget = _fim_budget(ctx, max_tokens, param)
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
    if req.logprobs is not None and req.stream:
        raise APIError(
            400,
            "logprobs cannot be combined with stream on this server (they are computed once the "
            "completion is done); leave out stream",
            param="logprobs",
        )
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
            choices.append(dataclasses.replace(choice, params=params))
    return Plan(
        choices=choices,
        prompt_tokens=prompt_tokens,
        logprobs=req.logprobs,
        score_prompt=req.echo and req.logprobs is not None,
    )


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
    return Choice(prompt_ids=ids, params=params, echo=echo, bos_added=isinstance(prompt, str))


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
            reply=True,
        )
        for i in range(req.n)
    ]
    return Plan(choices=choices, prompt_tokens=len(ids))


def _n_predict(ctx: ServingContext, req: protocol.LlamaCppRequest) -> int:
    return _limit_tokens(
        ctx, None if req.n_predict < 0 else req.n_predict, ctx.settings.max_tokens, "n_predict"
    )


def _check_slot(ctx: ServingContext, req: protocol.LlamaCppRequest) -> None:
    if req.id_slot >= ctx.slots:
        raise APIError(
            400,
            f"id_slot={req.id_slot} names no slot: this server has {ctx.slots} (0.."
            f"{ctx.slots - 1}); send -1 (any slot)",
            param="id_slot",
            code="invalid_value",
        )


@dataclass(frozen=True)
class LlamaPrompt:
    """One prompt of a llama.cpp request, ready to generate from."""

    ids: list[int]
    fim: FimRequest | None = None
    bos_added: bool = False


def _llama_plan(
    ctx: ServingContext,
    req: protocol.LlamaCppRequest,
    prompts_: list[LlamaPrompt],
    n_predict: int,
    truncated: bool = False,
) -> Plan:
    """`n_cmpl` choices per prompt; greedy ones are generated once and copied (they are equal)."""
    _check_slot(ctx, req)
    distinct = 1 if req.temperature == 0 else req.n_cmpl
    _check_choices(ctx, len(prompts_) * req.n_cmpl)
    stop_ids = frozenset() if req.ignore_eos else prompts.fim_stop_ids(ctx.tokenizer)
    choices = []
    for prompt in prompts_:
        single_line = prompt.fim is not None and prompt.fim.single_line
        stops = list(req.stop) + (["\n"] if single_line and not req.ignore_eos else [])
        choices += [
            Choice(
                prompt_ids=prompt.ids,
                params=req.to_sampling_params(
                    max_new_tokens=n_predict,
                    stop_token_ids=stop_ids,
                    stop_strings=stops,
                    seed_offset=i,
                ),
                fim=prompt.fim,
                bos_added=prompt.bos_added,
                limits=Limits(req.n_indent, req.t_max_predict_ms),
                keep_going=req.ignore_eos,
            )
            for i in range(distinct)
        ]
    return Plan(
        choices=choices,
        prompt_tokens=sum(len(p.ids) for p in prompts_),
        logprobs=req.n_probs or None,
        truncated=truncated,
        copies=req.n_cmpl // distinct,
    )


def plan_infill(ctx: ServingContext, req: protocol.InfillRequest) -> Plan:
    """llama.cpp's /infill: the context files (`input_extra`) in CodeGemma's multi-file layout
    before the FIM prompt, fitted as llama.cpp fits them (`prompts.fit_infill_prompt`); the files
    get at most half the longest prompt, whatever the request, so a warm-up (`n_predict: 0`) and
    the completions after it begin with the same files."""
    n_predict = _n_predict(ctx, req)
    fim = FimRequest(
        prefix=req.input_prefix + req.prompt,
        suffix=req.input_suffix,
        files=tuple(ContextFile(path=c.filename, text=c.text) for c in req.input_extra),
        fim_mode=ctx.settings.fim_mode,
    )
    budget = _fim_budget(ctx, n_predict, "n_predict")
    reachable = _within_reach(fim, ctx.chars_for(budget))
    try:
        fitted = prompts.fit_infill_prompt(
            ctx.tokenizer,
            reachable.prefix,
            reachable.suffix,
            reachable.files,
            mode=fim.fim_mode,
            budget=budget,
            files_budget=ctx.max_prompt_tokens // 2,
        )
    except PromptError as e:
        raise APIError(400, str(e), param="n_predict", code="context_length_exceeded") from None
    truncated = fitted.truncated or reachable != fim
    return _llama_plan(ctx, req, [LlamaPrompt(fitted.ids, fim)], n_predict, truncated)


def plan_llama_completion(ctx: ServingContext, req: protocol.LlamaCompletionRequest) -> Plan:
    """llama.cpp's /completion: a text gets BOS; token ids (and texts mixed into them) are used
    as given; a text in CodeGemma's textual FIM layout is completed as FIM."""
    n_predict = _n_predict(ctx, req)
    planned: list[LlamaPrompt] = []
    for prompt in req.prompts():
        layout = prompts.parse_fim_text(prompt) if isinstance(prompt, str) else None
        if layout is not None:
            fim = FimRequest(prefix=layout[0], suffix=layout[1], fim_mode=ctx.settings.fim_mode)
            planned.append(LlamaPrompt(_fim_ids(ctx, fim, n_predict, "n_predict"), fim))
            continue
        if isinstance(prompt, str):
            _refuse_if_too_long(ctx, prompt, "prompt")
            ids = ctx.tokenizer.encode(prompt, bos=True)
        else:
            ids = []
            for part in prompt:
                if isinstance(part, int):
                    ids.append(part)
                else:
                    _refuse_if_too_long(ctx, part, "prompt")
                    ids += ctx.tokenizer.encode(part)
            if max(ids) >= ctx.vocab_size:
                raise APIError(
                    400,
                    f"token id {max(ids)} is invalid: {protocol.TOKEN_IDS} {ctx.vocab_size}",
                    param="prompt",
                    code="invalid_value",
                )
        _check_length(ctx, len(ids), n_predict, "prompt")
        planned.append(LlamaPrompt(ids, bos_added=isinstance(prompt, str)))
    return _llama_plan(ctx, req, planned, n_predict)


# -- running -------------------------------------------------------------------------------------
class TextTracker:
    """Plain text: every delta is released as it comes."""

    def __init__(self) -> None:
        self.text = ""
        self.cut = False

    def push(self, delta: str) -> str:
        self.text += delta
        return delta

    def finish(self, delta: str, exhausted: bool = False) -> str:
        return self.push(delta)


class ReplyTracker:
    """A reply: released as far as no repetition loop can take it back; `cut` once a loop is
    found (what follows would be cut)."""

    def __init__(self) -> None:
        self.guard, self.text = middle.ReplyGuard(), ""

    @property
    def cut(self) -> bool:
        return self.guard.looping

    def push(self, delta: str) -> str:
        released = self.guard.push(delta)
        self.text += released
        return released

    def finish(self, delta: str, exhausted: bool = False) -> str:
        released = self.guard.finish(delta, exhausted=exhausted)
        self.text += released
        return released


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
        repetition = middle.repetition(self.raw)  # a loop found is cut for good too
        self.cut = repetition.loop is not None or (
            end < len(self.raw) and self.raw[end] == "\n" and self.raw.find("\n", end + 1) >= 0
        )
        # The last line (and its newline: a later cut drops it) may still change, and so may
        # what a repetition loop still growing at the end would take.
        if not self.cut:
            stable = processed[: max(processed.rfind("\n", 0, repetition.settled), 0)]
            # Two rules act on the end of the final text: it may start repeating the suffix
            # (trimmed), or be whitespace only (dropped). Hold back what either could still take.
            stable = stable[: len(stable) - middle.suffix_overlap(stable, self.request.suffix)]
            if not stable.strip():
                return ""
            processed = stable
        return self._release(processed)

    def finish(self, delta: str, exhausted: bool = False) -> str:
        self.raw += delta
        return self._release(middle.clean(self.raw, self.request, exhausted=exhausted))

    def _release(self, stable: str) -> str:
        if len(stable) <= len(self.text) or not stable.startswith(self.text):
            return ""  # nothing new (or a tail rule trimmed sent text, which cannot be unsent)
        delta, self.text = stable[len(self.text) :], stable
        return delta


class OutputLimits:
    """llama.cpp's `n_indent` and `t_max_predict_ms`, applied to the raw generated text as its
    server applies them (server-context.cpp, `process_token`):

    - n_indent: every line after the first must start with at least n_indent spaces or tabs;
      the first line that does not (a blank line included) ends the completion, which keeps that
      line's indentation and nothing after it.
    - t_max_predict_ms: a token whose text has a newline, generated more than this long after
      the first token, is the last one.

    `push(delta)` returns the part of the delta to keep and whether the completion has ended."""

    def __init__(self, limits: Limits, first_token_at: Callable[[], float | None]) -> None:
        self.limits, self.first_token_at = limits, first_token_at
        self.raw, self._line = "", 0  # where the search for the next unchecked line starts

    def push(self, delta: str) -> tuple[str, bool]:
        before = len(self.raw)
        self.raw += delta
        if self.limits.n_indent:
            cut = self._indent_cut()
            if cut is not None:
                return self.raw[before:cut], True
        if self.limits.t_max_predict_ms and "\n" in delta:
            start = self.first_token_at()
            if (
                start is not None
                and time.perf_counter() - start > self.limits.t_max_predict_ms / 1e3
            ):
                return delta, True
        return delta, False

    def _indent_cut(self) -> int | None:
        raw = self.raw
        while (newline := raw.find("\n", self._line)) >= 0:
            start = end = newline + 1
            while end < len(raw) and raw[end] in " \t":
                end += 1
            if end == len(raw):  # the line has no character after its indentation yet
                return None
            if end - start < self.limits.n_indent:
                return end
            self._line = start
        return None


@dataclass(frozen=True)
class Update:
    index: int
    text: str
    finish_reason: str | None = None
    result: GenerationResult | None = None
    token_ids: tuple[int, ...] = ()  # the generated ids this update covers
    limited: bool = False  # an OutputLimits rule ended the sequence (llama.cpp's "limit")


def finish_reason(
    result: GenerationResult, tracker: TextTracker | ReplyTracker | FimTracker
) -> str:
    if tracker.cut or (isinstance(tracker, FimTracker) and tracker.text != tracker.raw):
        return "stop"  # post-processing ended it
    return "length" if result.finish_reason == "cancelled" else result.finish_reason


@dataclass
class _Run:
    """One choice being generated: its text tracker, limits and the ids it has kept."""

    tracker: TextTracker | ReplyTracker | FimTracker
    limits: OutputLimits | None
    keep_going: bool
    tokens: list[int] = field(default_factory=list)
    reported: int = 0  # tokens[:reported] went out with earlier updates
    ended: bool = False  # a limit ended it: later events are dropped

    def new_tokens(self) -> tuple[int, ...]:
        new, self.reported = tuple(self.tokens[self.reported :]), len(self.tokens)
        return new

    def take(self, delta: str, token: int | None) -> tuple[str, bool]:
        """The part of an event's text to keep, and whether a limit has just ended the run."""
        if self.ended:
            return "", False
        if token is not None:
            self.tokens.append(token)
        if self.limits is None:
            return delta, False
        delta, self.ended = self.limits.push(delta)
        return delta, self.ended


def first_token_clock(timing: SequenceTiming) -> Callable[[], float | None]:
    return lambda: timing.prefill_end


async def run_plan(submission: Submission, plan: Plan) -> AsyncIterator[Update]:
    """Updates of every choice, in the order they happen; each choice ends with one whose
    finish_reason is set."""
    runs = [
        _Run(
            tracker=FimTracker(c.fim) if c.fim else ReplyTracker() if c.reply else TextTracker(),
            limits=OutputLimits(c.limits, first_token_clock(submission.timings[i]))
            if c.limits
            else None,
            keep_going=c.keep_going,
        )
        for i, c in enumerate(plan.choices)
    ]
    async for index, event in submission.events():
        run = runs[index]
        delta, ended = run.take(event.delta, event.token_id)
        if event.finished:
            text = run.tracker.finish(delta, event.result.finish_reason == "length")
            reason = "length" if run.ended else finish_reason(event.result, run.tracker)
            yield Update(index, text, reason, event.result, run.new_tokens(), run.ended)
            continue
        text = run.tracker.push(delta)
        if ended or (run.tracker.cut and not run.keep_going):
            submission.cancel(index)  # its final event follows
        if text:
            yield Update(index, text, token_ids=run.new_tokens())


@dataclass
class Collected:
    texts: list[str]
    reasons: list[str]
    results: list[GenerationResult]
    tokens: list[list[int]] = field(default_factory=list)  # the generated ids kept, per choice
    limited: list[bool] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results if r is not None)

    def choice(self, i: int) -> Collected:
        """Choice i alone."""
        return Collected(
            [self.texts[i]],
            [self.reasons[i]],
            [self.results[i]],
            [self.tokens[i]],
            [self.limited[i]],
        )


async def collect(submission: Submission, plan: Plan) -> Collected:
    n = len(plan.choices)
    texts, reasons, results = [c.echo for c in plan.choices], [""] * n, [None] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    limited = [False] * n
    async for update in run_plan(submission, plan):
        texts[update.index] += update.text
        tokens[update.index] += update.token_ids
        if update.finish_reason is not None:
            reasons[update.index], results[update.index] = update.finish_reason, update.result
            limited[update.index] = update.limited
    return Collected(texts, reasons, results, tokens, limited)  # type: ignore[arg-type]


def encode_plain(tok: TextCodec, text: str) -> list[int]:
    """Text as text: special-token strings in it are text too (`TextCodec.encode`)."""
    return tok.encode(text)


def encode_special(tok: TextCodec, text: str) -> list[int]:
    """Text in which the special tokens' strings ("<eos>", "<|fim_prefix|>", ...) stand for
    the tokens, as llama.cpp's /tokenize reads it by default (`parse_special`)."""
    specials = {tok.decode([i]): i for i in vars(tok.special).values() if i is not None}
    specials = {text_: i for text_, i in specials.items() if text_}
    if not specials:
        return tok.encode(text)
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    ids: list[int] = []
    at = 0
    for m in pattern.finditer(text):
        ids += tok.encode(text[at : m.start()]) + [specials[m.group()]]
        at = m.end()
    return ids + tok.encode(text[at:])


def not_generated(plan: Plan) -> Collected:
    """What `collect` gives for a plan whose choices generate nothing (max_tokens 0)."""
    n = len(plan.choices)
    return Collected(
        [c.echo for c in plan.choices], ["length"] * n, [None] * n, [[]] * n, [False] * n
    )  # type: ignore[list-item]
