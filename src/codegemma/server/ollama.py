"""Ollama's API (docs/api.md of ollama/ollama), which many editor plugins speak: POST /api/generate
(completion and, with `suffix`, fill-in-the-middle), POST /api/chat, GET /api/tags, POST /api/show,
GET /api/version and GET /api/ps, as an APIRouter the app includes (`router(state)`).

Each request becomes the request the OpenAI routes take (`protocol.CompletionRequest`,
`protocol.ChatCompletionRequest`) and is planned by the same planners (serving.py), so FIM prompts,
prompt fitting, post-processing, sampling and scheduling are those of every other protocol; only
the wire format is Ollama's: NDJSON streams (on unless `"stream": false`), nanosecond durations,
`{"error": "..."}` bodies with Ollama's statuses (400, 404 for an unknown model, 503 when full).

What a /api/generate request becomes (docs/serving.md has the table of options):
- with `suffix` (an empty one too, unlike Ollama): FIM between `prompt` and `suffix` in the
  model's FIM layout (`template`, `system`, `context` do not apply);
- `raw`: the prompt as the model's tokens, special-token strings included (as llama.cpp reads a
  raw prompt); a raw prompt in CodeGemma's textual FIM layout is FIM (what Continue sends through
  this route for a model it does not know to take `suffix`);
- otherwise the model's template, as Ollama applies it: Gemma's chat turns (`system` folded into
  the first) for a chat model, the text itself for a pretrained one; or the request's `template`
  (its `{{ .Prompt }}`, `{{ .System }}` and `{{ if .X }}..{{ else }}..{{ end }}`). `context` (the
  token ids an earlier response returned) goes before it.
Replies that are not FIM middles (generate without suffix, chat) lose a repetition loop as they
stream (serving.ReplyTracker); FIM middles get every FIM rule (serving.FimTracker).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import codegemma
from codegemma import prompts
from codegemma.checkpoint import not_a_chat_model
from codegemma.engine import GenerationResult
from codegemma.gguf import is_gguf
from codegemma.quant import QuantizedMatrix
from codegemma.server import protocol, serving
from codegemma.server.protocol import APIError
from codegemma.server.scheduler import GenerationFailed, Submission
from codegemma.server.serving import Plan, ServingContext
from codegemma.tokenizer import SPECIAL_STRINGS

if TYPE_CHECKING:
    from codegemma.server.app import ServerState

# Ollama's sampling defaults (its Modelfile defaults), used where a request leaves an option out.
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P = 0.8, 40, 0.9
OPTION_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
FIM_TEMPLATE = "<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>"
CHAT_TEMPLATE = (
    "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
    "<start_of_turn>model\n"
)
STOPS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>")
NEVER = "2262-04-11T23:47:16Z"  # expires_at of a model that is never unloaded (Go's max time)


# -- wire types ------------------------------------------------------------------------------------
class _Lenient(BaseModel):
    """Ollama's requests, read as its Go server reads them: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


class Options(_Lenient):
    """The runtime options that apply; the others (num_ctx, num_thread, mirostat, ...) are
    accepted and ignored."""

    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[protocol.Text] | protocol.Text | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def sampling(self) -> dict[str, Any]:
        """The OpenAI request's sampling fields, with Ollama's defaults."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            "top_k": DEFAULT_TOP_K if self.top_k is None else self.top_k,
            "top_p": DEFAULT_TOP_P if self.top_p is None else self.top_p,
            "seed": None if self.seed is None or self.seed < 0 else self.seed,
            "stop": stop or None,
            "repetition_penalty": self.repeat_penalty or 1.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
        }


class _GenerationRequest(_Lenient):
    model: str = ""
    stream: bool = True
    options: Options = Field(default_factory=Options)
    keep_alive: float | str | None = None  # the model is always loaded: only 0 is looked at
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    logprobs: bool | None = None

    def unsupported(self) -> str | None:
        if self.format:
            return "format (JSON mode, structured outputs) is not supported by this server"
        if self.think not in (None, False, ""):
            return f'"{self.model}" does not support thinking'
        if self.logprobs:
            return "logprobs are not supported on /api routes; use /v1/completions"
        return None

    @property
    def unloads(self) -> bool:
        return str(self.keep_alive).strip() in ("0", "0.0", "0s", "0m", "0h")


class GenerateRequest(_GenerationRequest):
    prompt: protocol.Text = ""
    suffix: protocol.Text | None = None
    system: protocol.Text = ""
    template: protocol.Text = ""
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: protocol.Text = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatRequest(_GenerationRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class ShowRequest(_Lenient):
    model: str = ""
    name: str = ""  # the older name of `model` (Continue still sends it)
    verbose: bool = False


class OllamaError(Exception):
    """An error answered as Ollama answers it: `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


# -- planning --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Planned:
    plan: Plan
    context: bool  # return `context` (Ollama does unless raw)


def plan_generate(ctx: ServingContext, req: GenerateRequest, chat: bool) -> Planned:
    n = req.options.num_predict
    if req.suffix is not None or (req.raw and prompts.parse_fim_text(req.prompt) is not None):
        # FIM (an empty suffix too); the prompt is fitted around the tokens to generate
        limit = min(ctx.settings.max_tokens, ctx.max_seq_len // 2)  # half the context at most
        tokens = limit if n is None or n < 0 else min(n, limit)
        fim = serving.plan_completion(ctx, _completion(req, req.prompt, max_tokens=tokens))
        return Planned(fim, context=not req.raw)
    plan = _stop_at_turn_end(ctx, _fit(ctx, _reply_plan(ctx, req, chat), n))
    choices = [dataclasses.replace(c, reply=True) for c in plan.choices]  # no repetition loop
    return Planned(dataclasses.replace(plan, choices=choices), context=not req.raw)


def _reply_plan(ctx: ServingContext, req: GenerateRequest, chat: bool) -> Plan:
    """The plan of a generate request that is no FIM, its tokens to generate still open."""
    context = _context_ids(ctx, req.context)  # (raw mode takes none)
    if req.raw or req.template:  # text in which special-token strings are the tokens
        text = req.prompt if req.raw else render_template(req.template, req.prompt, req.system)
        prompt: str | list[int] = text
        if _has_special(text):
            serving._refuse_if_too_long(ctx, text, "prompt")
            prompt = serving.encode_special(ctx.tokenizer, text)
            prompt = context + prompt if context else _with_bos(ctx, prompt)
        elif context:
            prompt = context + ctx.tokenizer.encode(text)
    elif chat:
        messages = [*([("system", req.system)] if req.system else []), ("user", req.prompt)]
        plan = serving.plan_chat(ctx, _chat(req, messages))
        if not context:
            return plan
        # the earlier conversation's ids, then this turn without its BOS
        return _with_prompt(ctx, plan, context + plan.choices[0].prompt_ids[1:])
    else:
        prompt = context + ctx.tokenizer.encode(req.prompt) if context else req.prompt
    return serving.plan_completion(ctx, _completion(req, prompt, max_tokens=0))


def plan_chat(ctx: ServingContext, req: ChatRequest) -> Planned:
    for m in req.messages:
        if m.role == "tool" or m.tool_calls:
            raise APIError(400, "tool messages are not supported by this server", param="messages")
        if m.images:
            raise APIError(400, "this model does not support images", param="messages")
    plan = serving.plan_chat(ctx, _chat(req, [(m.role, m.content) for m in req.messages]))
    return Planned(_fit(ctx, plan, req.options.num_predict), context=False)


def _completion(req: GenerateRequest, prompt: str | list[int], *, max_tokens: int):
    fields = dict(prompt=prompt, suffix=req.suffix, max_tokens=max_tokens)
    return _request(protocol.CompletionRequest, fields | req.options.sampling())


def _chat(req: _GenerationRequest, messages: list[tuple[str, str]]):
    fields = dict(messages=[{"role": r, "content": c} for r, c in messages])
    return _request(protocol.ChatCompletionRequest, fields | req.options.sampling())


def _request(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    """The OpenAI request of an Ollama one; an option out of range is a 400 naming it."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        error = e.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "options"
        where = "" if name in ("prompt", "messages", "suffix") else "options."
        raise APIError(
            400, f"invalid {where}{OPTION_NAMES.get(name, name)}: {error['msg']}", param=name
        ) from None


def _fit(ctx: ServingContext, plan: Plan, num_predict: int | None) -> Plan:
    """Generate num_predict tokens; all that fit (up to the server's limit) when it is left out or
    negative, Ollama's "until the context is full"; more than fit is as many as fit."""
    room = ctx.max_seq_len - len(plan.choices[0].prompt_ids)
    limit = min(ctx.settings.max_tokens, room)
    tokens = limit if num_predict is None or num_predict < 0 else min(num_predict, limit)
    return _with_params(plan, max_new_tokens=tokens)


def _stop_at_turn_end(ctx: ServingContext, plan: Plan) -> Plan:
    """A reply also ends at <end_of_turn> (Ollama's CodeGemma models list it among their stops)."""
    stops = plan.choices[0].params.stop_token_ids | prompts.chat_stop_ids(ctx.tokenizer)
    return _with_params(plan, stop_token_ids=stops)


def _with_params(plan: Plan, **changes: Any) -> Plan:
    choices = [
        dataclasses.replace(c, params=dataclasses.replace(c.params, **changes))
        for c in plan.choices
    ]
    return dataclasses.replace(plan, choices=choices)


def _with_prompt(ctx: ServingContext, plan: Plan, ids: list[int]) -> Plan:
    if len(ids) > ctx.max_prompt_tokens:
        raise APIError(
            400,
            f"the context and prompt are {len(ids)} tokens; this model takes at most "
            f"{ctx.max_prompt_tokens}. Start a new conversation (leave out context).",
            param="context",
        )
    choices = [dataclasses.replace(c, prompt_ids=ids) for c in plan.choices]
    return dataclasses.replace(plan, choices=choices, prompt_tokens=len(ids))


def _context_ids(ctx: ServingContext, context: list[int] | None) -> list[int]:
    ids = list(context or [])
    bad = next((i for i in ids if not 0 <= i < ctx.vocab_size), None)
    if bad is not None:
        raise APIError(
            400, f"context holds token id {bad}: {protocol.TOKEN_IDS} {ctx.vocab_size}", "context"
        )
    return ids


def _with_bos(ctx: ServingContext, ids: list[int]) -> list[int]:
    bos = ctx.tokenizer.special.bos
    return ids if ids[:1] == [bos] else [bos, *ids]


def _has_special(text: str) -> bool:
    """`text` names a special token ("<bos>", "<start_of_turn>", ...), which a raw or templated
    prompt means as the token."""
    return "<" in text and any(s in text for s in SPECIAL_STRINGS.values())


TEMPLATE_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
TEMPLATE_FIELD = re.compile(r"\.(Prompt|System|Suffix|Response)")


def render_template(template: str, prompt: str, system: str) -> str:
    """A request's Go template, for what a completion needs of one: `{{ .Prompt }}`, `{{ .System
    }}` (`.Suffix` and `.Response` are empty) and `{{ if .X }}..{{ else }}..{{ end }}`, nested or
    not. Anything else is a 400 naming it."""
    values = {"Prompt": prompt, "System": system, "Suffix": "", "Response": ""}
    out: list[str] = []
    shown = [True]  # whether the text at this depth of `if` is rendered
    at = 0
    for action in TEMPLATE_ACTION.finditer(template):
        if all(shown):
            out.append(template[at : action.start()])
        at = action.end()
        words = action.group(1).split()
        field = TEMPLATE_FIELD.fullmatch(words[-1]) if words else None
        if len(words) == 1 and field:
            out.append(values[field.group(1)] if all(shown) else "")
        elif len(words) == 2 and words[0] == "if" and field:
            shown.append(bool(values[field.group(1)]))
        elif words == ["else"] and len(shown) > 1:
            shown[-1] = not shown[-1]
        elif words == ["end"] and len(shown) > 1:
            shown.pop()
        else:
            raise APIError(
                400,
                f"template action {action.group(0)!r} is not supported: this server renders "
                "{{ .Prompt }}, {{ .System }} and {{ if .X }}..{{ else }}..{{ end }}; send the "
                "prompt already templated with raw: true instead",
                param="template",
            )
    if len(shown) > 1:
        raise APIError(400, "template has an {{ if }} without its {{ end }}", param="template")
    if all(shown):
        out.append(template[at:])
    return "".join(out)


# -- running ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    text: str = ""
    reason: str = "stop"
    result: GenerationResult | None = None


async def _pieces(submission: Submission, plan: Plan, outcome: Outcome) -> AsyncIterator[str]:
    """The text of the plan's one choice as it may be sent; `outcome` is filled in at the end."""
    async for update in serving.run_plan(submission, plan):
        if update.finish_reason is not None:
            outcome.reason, outcome.result = update.finish_reason, update.result
        outcome.text += update.text
        if update.text:
            yield update.text


class OllamaRoutes:
    """The routes' shared work: parse, check the model, plan, submit, answer."""

    def __init__(self, state: ServerState) -> None:
        from codegemma.server import app as server_app  # the app imports this module

        self.state, self.until_done = state, server_app._until_done
        self.name = state.model_id if ":" in state.model_id else f"{state.model_id}:latest"
        self.chat = _is_chat_model(state)
        self.created = _timestamp()

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        body = await request.body()
        if not body.strip():
            raise OllamaError(400, "missing request body")
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "body"
            raise OllamaError(400, f"invalid request body: {where}: {error['msg']}") from None

    def check_model(self, model: str) -> None:
        if model.lower() not in (self.state.model_id.lower(), self.name.lower()):
            raise OllamaError(404, f"model '{model}' not found")

    async def run(
        self,
        request: Request,
        body: _GenerationRequest,
        planned: Planned,
        started: float,
        frame: Callable[[str], dict[str, Any]],
    ) -> Response:
        """Generate, then answer one JSON object or an NDJSON stream; `frame(text)` makes the
        body that carries some text (the route's `response` or `message`)."""
        plan = planned.plan
        if plan.choices[0].params.max_new_tokens == 0:
            done = self.done(planned, None, Outcome(reason="length"), started)
            return (
                JSONResponse(frame("") | done) if not body.stream else _ndjson([frame("") | done])
            )
        submission = self.state.submit(plan)
        outcome = Outcome()
        if not body.stream:
            work = _drain(_pieces(submission, plan, outcome))
            await self.until_done(request, submission, work)
            done = self.done(planned, submission, outcome, started)
            return JSONResponse(frame(outcome.text) | done)

        async def lines() -> AsyncIterator[dict[str, Any]]:
            try:
                async for text in _pieces(submission, plan, outcome):
                    yield frame(text) | {"done": False}
                yield frame("") | self.done(planned, submission, outcome, started)
            except GenerationFailed as e:
                yield {"error": str(e)}
            finally:
                submission.cancel()

        return _ndjson(lines())

    def done(
        self, planned: Planned, submission: Submission | None, outcome: Outcome, started: float
    ) -> dict[str, Any]:
        """The fields of the last object: why it ended, the context and Ollama's counts and
        durations (nanoseconds): load (until the model began on the prompt: planning and waiting
        for a slot), prompt evaluation (the prefill step), evaluation (the rest)."""
        now = time.perf_counter()
        choice, result = planned.plan.choices[0], outcome.result
        timing = submission.timings[0] if submission is not None else None
        prefill_start = timing.prefill_start if timing and timing.prefill_start else now
        prefill_end = timing.prefill_end if timing and timing.prefill_end else prefill_start
        finished = timing.finished if timing and timing.finished else now
        cached = result.cached_tokens if result is not None else 0
        fields: dict[str, Any] = {"done": True, "done_reason": outcome.reason}
        if planned.context:
            fields["context"] = choice.prompt_ids + self.state.tokenizer.encode(outcome.text)
        return fields | {
            "total_duration": _ns(now - started),
            "load_duration": _ns(prefill_start - started),
            "prompt_eval_count": len(choice.prompt_ids) - cached,
            "prompt_eval_duration": _ns(prefill_end - prefill_start),
            "eval_count": len(result.token_ids) if result is not None else 0,
            "eval_duration": _ns(finished - prefill_end),
        }

    def head(self, model: str) -> dict[str, Any]:
        return {"model": model, "created_at": _timestamp()}


def router(state: ServerState) -> APIRouter:
    """Ollama's routes over the app's state (its scheduler, planning context and metrics)."""
    routes, api = OllamaRoutes(state), APIRouter()

    async def answer(work) -> Response:
        try:
            return await work
        except OllamaError as e:
            return e.response()
        except APIError as e:  # the planners' and the scheduler's errors, in Ollama's shape
            return OllamaError(e.status, e.message, e.headers).response()
        except GenerationFailed as e:
            return OllamaError(500, str(e)).response()

    @api.post("/api/generate", response_model=None)
    async def generate(request: Request) -> Response:
        return await answer(_generate(routes, request))

    @api.post("/api/chat", response_model=None)
    async def chat(request: Request) -> Response:
        return await answer(_chat_route(routes, request))

    @api.post("/api/show", response_model=None)
    async def show(request: Request) -> Response:
        return await answer(_show(routes, request))

    @api.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_model_entry(routes) | {"modified_at": routes.created}]}

    @api.get("/api/ps")
    async def ps() -> dict[str, Any]:
        entry = _model_entry(routes)
        device = next(state.engine.model.parameters()).device
        vram = entry["size"] if device.type == "cuda" else 0
        extra = {"expires_at": NEVER, "size_vram": vram, "context_length": state.ctx.max_seq_len}
        return {"models": [entry | extra]}

    @api.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": codegemma.__version__}

    return api


async def _generate(routes: OllamaRoutes, request: Request) -> Response:
    started = time.perf_counter()
    body = await routes.parse(request, GenerateRequest)
    routes.check_model(body.model)
    problem = body.unsupported() or ("this model does not support images" if body.images else None)
    if problem:
        raise OllamaError(400, problem)
    if body.raw and (body.template or body.system or body.context):
        raise OllamaError(400, "raw mode does not support template, system, or context")
    if not body.prompt and body.suffix is None:  # Ollama's load / unload request
        reason = "unload" if body.unloads else "load"
        return JSONResponse(
            routes.head(body.model) | {"response": "", "done": True, "done_reason": reason}
        )
    planned = await routes.state.plan(lambda ctx, req: plan_generate(ctx, req, routes.chat), body)

    def frame(text: str) -> dict[str, Any]:
        return routes.head(body.model) | {"response": text}

    return await routes.run(request, body, planned, started, frame)


async def _chat_route(routes: OllamaRoutes, request: Request) -> Response:
    started = time.perf_counter()
    body = await routes.parse(request, ChatRequest)
    routes.check_model(body.model)
    problem = body.unsupported() or (
        f'"{body.model}" does not support tools' if body.tools else None
    )
    if problem:
        raise OllamaError(400, problem)
    if not body.messages:
        reason = "unload" if body.unloads else "load"
        message = {"role": "assistant", "content": ""}
        return JSONResponse(
            routes.head(body.model) | {"message": message, "done_reason": reason, "done": True}
        )
    planned = await routes.state.plan(plan_chat, body)

    def frame(text: str) -> dict[str, Any]:
        return routes.head(body.model) | {"message": {"role": "assistant", "content": text}}

    return await routes.run(request, body, planned, started, frame)


async def _show(routes: OllamaRoutes, request: Request) -> Response:
    body = await routes.parse(request, ShowRequest)
    routes.check_model(body.model or body.name)
    state = routes.state
    config = state.engine.model.config
    template = (
        "{{ if .Suffix }}"
        + FIM_TEMPLATE
        + "{{ else }}"
        + (CHAT_TEMPLATE if routes.chat else "{{ .Prompt }}")
        + "{{ end }}"
    )
    parameters = [("num_ctx", str(state.ctx.max_seq_len))]
    parameters += [
        ("stop", json.dumps(s)) for s in STOPS + (("<end_of_turn>",) if routes.chat else ())
    ]
    entry = _model_entry(routes)
    info = {
        "general.architecture": "gemma",
        "general.name": state.model_id,
        "general.parameter_count": _parameters(state),
        "gemma.context_length": state.ctx.max_seq_len,
        "gemma.embedding_length": config.hidden_size,
        "gemma.block_count": config.num_hidden_layers,
        "gemma.feed_forward_length": config.intermediate_size,
        "gemma.attention.head_count": config.num_attention_heads,
        "gemma.attention.head_count_kv": config.num_key_value_heads,
        "gemma.attention.key_length": config.head_dim,
        "gemma.attention.value_length": config.head_dim,
        "gemma.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "gemma.rope.freq_base": config.rope_theta,
        "tokenizer.ggml.bos_token_id": state.tokenizer.special.bos,
        "tokenizer.ggml.eos_token_id": state.tokenizer.special.eos,
        "tokenizer.ggml.padding_token_id": state.tokenizer.special.pad,
    }
    lines = "".join(f"PARAMETER {k} {v}\n" for k, v in parameters)
    modelfile = (
        f"# Modelfile of {state.model_id}, served by codegemma\nFROM {state.model_id}\n"
        f'TEMPLATE """{template}"""\n{lines}'
    )
    return JSONResponse(
        {
            "modelfile": modelfile,
            "parameters": "\n".join(f"{k:<30} {v}" for k, v in parameters),
            "template": template,
            "details": entry["details"],
            "model_info": info,
            "capabilities": ["completion", "insert"],
            "modified_at": routes.created,
        }
    )


def _model_entry(routes: OllamaRoutes) -> dict[str, Any]:
    """/api/tags' and /api/ps's entry of the served model."""
    state = routes.state
    model = state.engine.model
    params = _parameters(state)
    size = _weight_bytes(model)
    config = json.dumps(model.config.to_hf_dict(), sort_keys=True)
    return {
        "name": routes.name,
        "model": routes.name,
        "size": size,
        "digest": hashlib.sha256(f"{routes.name}\n{config}\n{size}".encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf" if is_gguf(_model_path(state)) else "safetensors",
            "family": "gemma",
            "families": ["gemma"],
            "parameter_size": _human(params),
            "quantization_level": _quantization(model),
        },
    }


def _parameters(state: ServerState) -> int:
    return state.engine.model.config.num_parameters  # quantized weights are buffers


def _weight_bytes(model) -> int:
    """Bytes of the weights: the parameters, and the block buffers of quantized matrices."""
    tensors = [*model.parameters()]
    tensors += [m.weight for m in model.modules() if isinstance(m, QuantizedMatrix)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _quantization(model) -> str:
    quantized = next((m for m in model.modules() if isinstance(m, QuantizedMatrix)), None)
    if quantized is not None:
        return quantized.format.name.upper()
    dtype = next(model.parameters()).dtype
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(
        str(dtype).removeprefix("torch."), str(dtype)
    )


def _human(count: int) -> str:
    """Ollama's parameter_size: 8.0B, 137M."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{unit}" if unit == "B" else f"{count / scale:.0f}{unit}"
    return str(count)


def _model_path(state: ServerState) -> Path:
    path = Path(getattr(state.tokenizer, "path", "") or ".")
    return path if is_gguf(path) else path.parent


def _is_chat_model(state: ServerState) -> bool:
    """A chat model gets Gemma's chat turns around a templated prompt, as Ollama gives an
    instruct model its chat template."""
    path = _model_path(state)
    return path.exists() and not_a_chat_model(state.model_id, path) is None


async def _drain(pieces: AsyncIterator[str]) -> None:
    async for _ in pieces:
        pass


def _ndjson(lines) -> StreamingResponse:
    async def encoded() -> AsyncIterator[bytes]:
        if isinstance(lines, list):
            for line in lines:
                yield json.dumps(line).encode() + b"\n"
            return
        async for line in lines:
            yield json.dumps(line).encode() + b"\n"

    return StreamingResponse(encoded(), media_type="application/x-ndjson")


def _timestamp() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))
