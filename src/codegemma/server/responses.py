"""Response bodies and Server-Sent Events streams, in each protocol's own shape.

OpenAI streams are `data: {json}\\n\\n` events ending with `data: [DONE]`; an error after the
stream started is sent as `data: {"error": {...}}` (the `openai` client raises it). llama.cpp
streams (`/infill`) send `data: {"content": ..., "stop": false}` events and a last one with
`"stop": true` and the timings, and no `[DONE]`: Tabby's and llama.vscode's parsers read every
event as JSON.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from codegemma.engine import GenerationResult
from codegemma.server import serving
from codegemma.server.protocol import error_body
from codegemma.server.scheduler import GenerationFailed, Submission
from codegemma.server.serving import Collected, Plan

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


# -- /v1/completions -----------------------------------------------------------------------------
def completion_body(model: str, plan: Plan, done: Collected) -> dict[str, Any]:
    choices = [
        {"text": text, "index": i, "logprobs": None, "finish_reason": reason}
        for i, (text, reason) in enumerate(zip(done.texts, done.reasons, strict=True))
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


# -- /infill (llama.cpp) -------------------------------------------------------------------------
def _stop_type(result: GenerationResult | None, reason: str) -> tuple[str, str]:
    """llama.cpp's (stop_type, stopping_word)."""
    if result is None:
        return "limit", ""
    if reason == "length":
        return "limit", ""
    if isinstance(result.stop, str):
        return "word", result.stop
    return "eos", ""


def infill_body(
    model: str,
    plan: Plan,
    content: str,
    result: GenerationResult | None,
    reason: str,
    started: float,
) -> dict[str, Any]:
    elapsed_ms = (time.perf_counter() - started) * 1000
    predicted = len(result.token_ids) if result else 0
    stop_type, word = _stop_type(result, reason)
    return {
        "content": content,
        "stop": True,
        "model": model,
        "tokens_predicted": predicted,
        "tokens_evaluated": plan.prompt_tokens,
        "tokens_cached": 0,
        "truncated": False,
        "stop_type": stop_type,
        "stopping_word": word,
        "timings": {
            "prompt_n": plan.prompt_tokens,
            "predicted_n": predicted,
            "predicted_ms": elapsed_ms,
            "predicted_per_second": predicted / (elapsed_ms / 1000) if elapsed_ms > 0 else 0.0,
        },
    }


async def infill_stream(
    submission: Submission, plan: Plan, *, model: str, started: float
) -> AsyncIterator[bytes]:
    try:
        async for update in serving.run_plan(submission, plan):
            if update.finish_reason is None:
                yield sse({"content": update.text, "stop": False})
            else:
                body = infill_body(
                    model, plan, update.text, update.result, update.finish_reason, started
                )
                yield sse(body)
    except GenerationFailed as e:
        yield sse(error_body(str(e), type="server_error", code="generation_failed"))
