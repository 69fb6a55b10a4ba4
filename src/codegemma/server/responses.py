"""Response bodies and Server-Sent Events streams, in each protocol's own shape.

OpenAI streams are `data: {json}\\n\\n` events ending with `data: [DONE]`; an error after the
stream started is sent as `data: {"error": {...}}` (the `openai` client raises it). llama.cpp
streams (`/infill`, `/completion`) send `data: {"content": ..., "stop": false}` events and a last
one with `"stop": true` and the timings, and no `[DONE]`: Tabby's and llama.vscode's parsers read
every event as JSON.

Log-probabilities (scoring.py) come in OpenAI's legacy completions shape (`logprobs.tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`; with `echo`, the prompt's tokens first, the first
of them null) and in llama.cpp's `completion_probabilities`. A token's text is what it adds to
the decoded text (`token_pieces`), so the tokens of a choice concatenate to its text; the
generated ones include the stop token, whose text is empty.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from codegemma.engine import GenerationResult
from codegemma.server import serving
from codegemma.server.protocol import LlamaCppRequest, error_body
from codegemma.server.scheduler import GenerationFailed, SequenceTiming, Submission
from codegemma.server.scoring import TokenScore
from codegemma.server.serving import Choice, Collected, Plan
from codegemma.tokenizer import TextCodec

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- tokens as text ------------------------------------------------------------------------------
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_pieces(tok: TextCodec, ids: Sequence[int], *, skip_special: bool) -> list[str]:
    """The text each token adds to `tok.decode(ids)`: they concatenate to it (a character split
    over byte tokens belongs to the token that completes it)."""
    decoder = tok.stream_decoder(skip_special=skip_special)
    pieces = [decoder.push(i) for i in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


def token_bytes(tok: TextCodec, token: int) -> bytes:
    """One token's own bytes (a byte-fallback token's single byte)."""
    id_to_token = getattr(tok, "id_to_token", None)
    if id_to_token is not None and (m := BYTE_PIECE.fullmatch(id_to_token(token))):
        return bytes([int(m[1], 16)])
    return tok.decode([token]).encode("utf-8")


def _valid_text(data: bytes) -> str:
    """llama.cpp's `validate_utf8`: the text of the valid UTF-8 in `data`."""
    return data.decode("utf-8", errors="ignore")


# -- /v1/completions -----------------------------------------------------------------------------
def openai_logprobs(
    tok: TextCodec,
    choice: Choice,
    text: str,
    generated: Sequence[int],
    scores: Sequence[TokenScore],
    *,
    score_prompt: bool,
) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object of one choice whose `text` came from `generated`;
    `scores` cover the prompt's tokens after the first (with score_prompt), then `generated`."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    if score_prompt:
        ids = choice.prompt_ids
        if choice.bos_added:  # not part of the echoed prompt text
            tokens += ["", *token_pieces(tok, ids[1:], skip_special=False)]
        else:
            tokens += token_pieces(tok, ids, skip_special=False)
        token_logprobs.append(None)
        top_logprobs.append(None)
    tokens += token_pieces(tok, generated, skip_special=True)
    for score in scores:
        token_logprobs.append(score.logprob)
        top: dict[str, float] = {}
        for token, logprob in score.top:
            top.setdefault(tok.decode([token]), logprob)
        top.setdefault(tok.decode([score.token]), score.logprob)
        top_logprobs.append(top)
    offsets, at = [], 0
    for piece in tokens:
        offsets.append(min(at, len(text)))
        at += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def completion_body(
    model: str, plan: Plan, done: Collected, logprobs: Sequence[dict | None] = ()
) -> dict[str, Any]:
    logprobs = list(logprobs) or [None] * len(done.texts)
    choices = [
        {"text": text, "index": i, "logprobs": lp, "finish_reason": reason}
        for i, (text, reason, lp) in enumerate(zip(done.texts, done.reasons, logprobs, strict=True))
    ]
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": plan.created,
        "model": model,
        "choices": choices,
        "usage": usage(plan.prompt_tokens, done.completion_tokens),
    }


def chat_body(model: str, plan: Plan, done: Collected) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": reason,
        }
        for i, (text, reason) in enumerate(zip(done.texts, done.reasons, strict=True))
    ]
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": plan.created,
        "model": model,
        "choices": choices,
        "usage": usage(plan.prompt_tokens, done.completion_tokens),
    }


async def openai_stream(
    submission: Submission, plan: Plan, *, model: str, chat: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed completion or chat completion."""
    base = {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": plan.created,
        "model": model,
    }

    def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> bytes:
        if chat:
            delta = (
                {"role": "assistant", "content": text or ""}
                if first
                else ({"content": text} if text else {})
            )
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": reason}
        return sse({**base, "choices": [choice], **({"usage": None} if include_usage else {})})

    for i, c in enumerate(plan.choices):
        if chat or c.echo:
            yield chunk(i, c.echo, None, first=True)
    completion_tokens = 0
    try:
        async for update in serving.run_plan(submission, plan):
            if update.text:
                yield chunk(update.index, update.text, None)
            if update.finish_reason is not None:
                completion_tokens += len(update.result.token_ids)
                yield chunk(update.index, None, update.finish_reason)
    except GenerationFailed as e:
        yield sse(error_body(str(e), type="server_error", code="generation_failed"))
        return
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(plan.prompt_tokens, completion_tokens)})
    yield DONE


# -- /infill, /completion (llama.cpp) -----------------------------------------------------------
def completion_probabilities(
    tok: TextCodec, generated: Sequence[int], scores: Sequence[TokenScore]
) -> list[dict[str, Any]]:
    """llama.cpp's `completion_probabilities` (not `post_sampling_probs`): per generated token
    its id, text, bytes and log-probability, and the `n_probs` most likely tokens there."""

    def entry(token: int, data: bytes, logprob: float) -> dict[str, Any]:
        return {"id": token, "token": _valid_text(data), "bytes": list(data), "logprob": logprob}

    pieces = token_pieces(tok, generated, skip_special=True)
    return [
        {
            **entry(score.token, piece.encode("utf-8"), score.logprob),
            "top_logprobs": [entry(t, token_bytes(tok, t), lp) for t, lp in score.top],
        }
        for piece, score in zip(pieces, scores, strict=True)
    ]


def stop_type(
    result: GenerationResult | None, limited: bool, stops: Sequence[str]
) -> tuple[str, str]:
    """llama.cpp's (stop_type, stopping_word): "word" for one of the request's stop strings,
    "limit" for n_predict, n_indent and t_max_predict_ms, "eos" for a stop token and for the FIM
    rules (the line or block at the cursor is complete)."""
    if limited or result is None:
        return "limit", ""
    if isinstance(result.stop, str) and result.stop in stops:
        return "word", result.stop
    if result.finish_reason == "length":
        return "limit", ""
    return "eos", ""


def _rate(count: int, ms: float) -> tuple[float, float]:
    """(milliseconds per token, tokens per second), 0 where undefined."""
    per_token = ms / count if count else 0.0
    per_second = 1e3 * count / ms if ms > 0 else 0.0
    return per_token, per_second


def llama_timings(
    prompt_tokens: int,
    result: GenerationResult | None,
    timing: SequenceTiming | None,
    predicted: int,
) -> dict[str, Any]:
    """llama.cpp's `timings`: prompt_n tokens were computed in prompt_ms (the prefill step),
    cache_n came from the prefix cache; predicted_n tokens took predicted_ms, from the end of the
    prefill (which chose the first) to the last; draft_n/draft_n_accepted when drafts ran."""
    cached = result.cached_tokens if result is not None else 0
    prompt_n = prompt_tokens - cached
    prompt_ms = predicted_ms = 0.0
    if timing is not None and timing.prefill_end is not None:
        prompt_ms = (timing.prefill_end - (timing.prefill_start or timing.prefill_end)) * 1e3
        if predicted and timing.finished is not None:
            predicted_ms = (timing.finished - timing.prefill_end) * 1e3
    prompt_per_token, prompt_per_second = _rate(prompt_n, prompt_ms)
    predicted_per_token, predicted_per_second = _rate(predicted, predicted_ms)
    timings: dict[str, Any] = {
        "cache_n": cached,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_per_token,
        "prompt_per_second": prompt_per_second,
        "predicted_n": predicted,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_per_token,
        "predicted_per_second": predicted_per_second,
    }
    if result is not None and result.draft_tokens > 0:
        timings["draft_n"] = result.draft_tokens
        timings["draft_n_accepted"] = result.accepted_draft_tokens
    return timings


def select_fields(body: dict[str, Any], paths: Sequence[str] | None) -> dict[str, Any]:
    """llama.cpp's `response_fields`: only the named fields, a path such as "timings/prompt_n"
    taken from inside `timings` and keyed by the whole path; missing ones are left out."""
    if paths is None:
        return body
    selected = {}
    for path in paths:
        value: Any = body
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            selected[path] = value
    return selected


def llama_body(
    *,
    model: str,
    req: LlamaCppRequest,
    plan: Plan,
    tok: TextCodec,
    index: int,
    choice: Choice,
    content: str,
    result: GenerationResult | None,
    tokens: Sequence[int],
    limited: bool,
    timing: SequenceTiming | None,
    probs: Sequence[TokenScore] | None,
    stream: bool = False,
) -> dict[str, Any]:
    """The final result of one llama.cpp completion in its server's shape
    (`to_json_non_oaicompat`), before `response_fields`."""
    kind, word = stop_type(result, limited, req.stop)
    body: dict[str, Any] = {
        "index": index,
        "content": content,
        "tokens": list(tokens) if req.return_tokens and not stream else [],
        "id_slot": req.id_slot,
        "stop": True,
        "model": model,
        "tokens_predicted": len(tokens),
        "tokens_evaluated": len(choice.prompt_ids),
        "generation_settings": {**req.settings(), "model": model},
        "prompt": tok.decode(choice.prompt_ids),
        "has_new_line": "\n" in (result.text if result is not None else ""),
        "truncated": plan.truncated,
        "stop_type": kind,
        "stopping_word": word,
        "tokens_cached": result.cached_tokens if result is not None else 0,
        "timings": llama_timings(len(choice.prompt_ids), result, timing, len(tokens)),
    }
    if probs is not None:
        body["completion_probabilities"] = completion_probabilities(tok, tokens, probs)
    return body


def llama_partial(
    plan: Plan, id_slot: int, index: int, text: str, ids: Sequence[int], predicted: int
) -> bytes:
    """A streamed llama.cpp event before the end (its server's partial result)."""
    return sse(
        {
            "index": index,
            "content": text,
            "tokens": list(ids),
            "stop": False,
            "id_slot": id_slot,
            "tokens_predicted": predicted,
            "tokens_evaluated": len(plan.choices[index // plan.copies].prompt_ids),
        }
    )


async def llama_stream(
    submission: Submission,
    plan: Plan,
    id_slot: int,
    final: Callable[[int, Collected], Awaitable[list[dict]]],
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed llama.cpp completion: a partial event per update, then for
    each choice the final bodies that `final(choice index, its Collected)` makes (it scores the
    tokens when asked). Copies of a greedy choice get the same events, under their own index."""
    tokens: list[list[int]] = [[] for _ in plan.choices]
    try:
        async for update in serving.run_plan(submission, plan):
            i = update.index
            tokens[i] += update.token_ids
            if update.finish_reason is None:
                for copy in range(plan.copies):
                    index = i * plan.copies + copy
                    yield llama_partial(
                        plan, id_slot, index, update.text, update.token_ids, len(tokens[i])
                    )
                continue
            done = Collected(
                [update.text],
                [update.finish_reason],
                [update.result],
                [tokens[i]],
                [update.limited],
            )
            for body in await final(i, done):
                yield sse(body)
    except GenerationFailed as e:
        yield sse(error_body(str(e), type="server_error", code="generation_failed"))
