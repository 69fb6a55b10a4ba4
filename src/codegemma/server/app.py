"""The FastAPI app: OpenAI- and llama.cpp-compatible routes over one scheduler thread.

    from codegemma.server import ServerSettings, app_for_model, create_app, uvicorn_config
    app = app_for_model(codegemma.load("path/to/model"))          # named after its directory
    app = create_app(engine, ServerSettings(served_model_name="cg-2b"))   # or any Engine
    uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=8000)).run()
    # or: codegemma serve --model ...

Routes: POST /v1/completions (+ `suffix` for FIM, `logprobs`, `echo`), POST
/v1/chat/completions, GET /v1/models; llama.cpp's POST /infill, /completion, /tokenize,
/detokenize, GET /props, /slots; vLLM's GET /tokenizer_info (lm-evaluation-harness's remote
tokenizer); GET /health, GET /metrics (Prometheus). Handlers validate, plan (serving.py;
tokenization runs in a worker thread, off the event loop), submit to the scheduler (503 +
Retry-After when full), then answer JSON or SSE (responses.py); log-probabilities are computed
afterwards on the engine thread (scoring.py). A client that disconnects has its sequences
cancelled: streams through the generator's `finally`, plain requests by a watcher on the ASGI
receive channel; llama.cpp's cache warm-ups (`n_predict: 0`) run to their end regardless. Pure-ASGI middlewares, outermost first: metrics (status and
latency per route, streams timed to their end), API key (401, `hmac.compare_digest`, before any of
the body is read), body checks (413 over the size limit, 408 if the body does not arrive within
`body_timeout_s`, 400 if not UTF-8). Every error body has OpenAI's shape; an error answered before
the body was read closes the connection (`Connection: close`), so the unread body is never
waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from codegemma.engine import Engine
from codegemma.errors import UsageError
from codegemma.server import ollama, protocol, responses, serving
from codegemma.server.prometheus import SchedulerMetrics, ServerMetrics
from codegemma.server.protocol import SHAPES, APIError, error_body
from codegemma.server.scheduler import GenerationFailed, Overloaded, Scheduler, Submission
from codegemma.server.scoring import TokenScore, TokenScorer
from codegemma.server.serving import Collected, Plan, ServingContext, longest_piece
from codegemma.server.settings import ServerSettings
from codegemma.server.transport import timeout_error
from codegemma.tokenizer import TextCodec

if TYPE_CHECKING:
    from codegemma.api import CodeGemma

log = logging.getLogger("codegemma.server")
OPEN_PATHS = frozenset({"/health"})  # reachable without the API key (load balancers, editors)


class ServerState:
    """What the routes share: context for planning, the scheduler, metrics, the model id."""

    def __init__(self, engine: Engine, tokenizer: TextCodec, settings: ServerSettings) -> None:
        self.settings, self.model_id = settings, settings.served_model_name
        self.engine, self.tokenizer = engine, tokenizer
        scheduler_metrics = SchedulerMetrics()
        self.scheduler = Scheduler(engine, max_queue=settings.max_queue, events=scheduler_metrics)
        self.metrics = ServerMetrics(
            scheduler_metrics, load=self.scheduler.load, decode_stats=lambda: engine.decode_stats
        )
        self.scorer = TokenScorer(engine.model)
        self.ctx = ServingContext(
            tokenizer=tokenizer,
            max_seq_len=engine.max_seq_len,
            vocab_size=min(engine.model.config.vocab_size, tokenizer.vocab_size),
            settings=settings,
            capacity=self.scheduler.capacity,
            chars_per_token=longest_piece(tokenizer),
            slots=self.scheduler.slots,
        )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_id}`",
                param="model",
                code="model_not_found",
            )

    async def plan(self, planner: Callable[..., Plan], body: Any) -> Plan:
        return await run_in_threadpool(planner, self.ctx, body)

    def submit(self, plan: Plan) -> Submission:
        try:
            return self.scheduler.submit(plan.jobs())
        except Overloaded as e:
            raise self._overloaded(e) from None

    def _overloaded(self, e: Overloaded) -> APIError:
        self.metrics.rejected.inc()
        return APIError(
            503,
            str(e),
            code="server_overloaded",
            type="server_error",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    async def score(self, plan: Plan, index: int, generated: list[int]) -> list[TokenScore]:
        """Log-probabilities of choice `index`'s generated tokens (and of its prompt's, after
        the first, when the plan scores the prompt), `plan.logprobs` most likely ones each."""
        prompt = plan.choices[index].prompt_ids
        ids = prompt + generated
        start = 1 if plan.score_prompt else len(prompt)
        if start >= len(ids):
            return []
        top_k = plan.logprobs or 0
        try:
            work = self.scheduler.call(lambda: self.scorer.score(ids, start=start, top_k=top_k))
        except Overloaded as e:
            raise self._overloaded(e) from None
        return await work


def app_for_model(cg: CodeGemma, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving a `codegemma.load()` result; by default named after its directory."""
    if settings is None:
        settings = ServerSettings(served_model_name=cg.path.name if cg.path else "codegemma")
    return create_app(cg.engine, settings)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `engine` (built with a tokenizer) with `settings` (default: the defaults)."""
    if engine.tokenizer is None:
        raise UsageError(
            "the server needs text: the Engine has no tokenizer",
            fix="build it with one: Engine(model, tokenizer, ...)",
        )
    settings = settings or ServerSettings()
    state = ServerState(engine, engine.tokenizer, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        yield
        await run_in_threadpool(state.scheduler.stop)

    app = FastAPI(title="codegemma", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    _add_exception_handlers(app)
    _add_routes(app, state)
    app.include_router(ollama.router(state))  # Ollama's /api routes (ollama.py)
    # the last added runs first: metrics, then the API key, then the body checks
    app.add_middleware(
        BodyMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


# -- routes --------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, state: ServerState) -> None:
    _add_generation_routes(app, state)
    _add_llama_routes(app, state)
    _add_tokenizer_routes(app, state)
    _add_info_routes(app, state)


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    async def openai_route(body, request: Request, planner, *, chat: bool, render) -> Response:
        """The two OpenAI routes differ only in planning, `chat` framing and the body."""
        state.check_model(body.model)
        plan = await state.plan(planner, body)
        if not chat and not body.stream and all(c.params.max_new_tokens == 0 for c in plan.choices):
            done = serving.not_generated(plan)  # max_tokens 0: the prompt only (echo, logprobs)
        else:
            submission = state.submit(plan)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = responses.openai_stream(
                    submission, plan, model=state.model_id, chat=chat, include_usage=include_usage
                )
                return _sse(stream, submission)
            done = await _until_done(request, submission, serving.collect(submission, plan))
        return JSONResponse(await render(plan, done))

    async def render_completion(plan: Plan, done: Collected) -> dict[str, Any]:
        logprobs = []
        if plan.logprobs is not None:
            for i, choice in enumerate(plan.choices):
                scores = await state.score(plan, i, done.tokens[i])
                logprobs.append(
                    responses.openai_logprobs(
                        state.tokenizer,
                        choice,
                        done.texts[i],
                        done.tokens[i],
                        scores,
                        score_prompt=plan.score_prompt,
                    )
                )
        return responses.completion_body(state.model_id, plan, done, logprobs)

    async def render_chat(plan: Plan, done: Collected) -> dict[str, Any]:
        return responses.chat_body(state.model_id, plan, done)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: protocol.CompletionRequest, request: Request) -> Response:
        return await openai_route(
            body, request, serving.plan_completion, chat=False, render=render_completion
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request) -> Response:
        return await openai_route(body, request, serving.plan_chat, chat=True, render=render_chat)


def _add_llama_routes(app: FastAPI, state: ServerState) -> None:
    async def llama_route(body: protocol.LlamaCppRequest, request: Request, planner) -> Response:
        """/infill and /completion: plan, generate, score if `n_probs`, answer llama.cpp's
        result (an array for several); a warm-up (`n_predict: 0`) only prefills."""
        plan = await state.plan(planner, body)
        submission = state.submit(plan)

        async def final(i: int, done: Collected) -> list[dict[str, Any]]:
            """The result bodies of choice i (one per copy), from its Collected."""
            probs = await state.score(plan, i, done.tokens[0]) if plan.logprobs else None
            bodies = []
            for copy in range(plan.copies):
                full = responses.llama_body(
                    model=state.model_id,
                    req=body,
                    plan=plan,
                    tok=state.tokenizer,
                    index=i * plan.copies + copy,
                    choice=plan.choices[i],
                    content=done.texts[0],
                    result=done.results[0],
                    tokens=done.tokens[0],
                    limited=done.limited[0],
                    timing=submission.timings[i],
                    probs=probs,
                    stream=body.stream,
                )
                bodies.append(responses.select_fields(full, body.response_fields))
            return bodies

        if body.stream:
            stream = responses.llama_stream(submission, plan, body.id_slot, final)
            return _sse(stream, submission)
        if body.n_predict == 0:  # a cache warm-up must fill the cache even if the client leaves
            done = await serving.collect(submission, plan)
        else:
            done = await _until_done(request, submission, serving.collect(submission, plan))
        bodies = [b for i in range(len(plan.choices)) for b in await final(i, done.choice(i))]
        return JSONResponse(bodies[0] if len(bodies) == 1 else bodies)

    @app.post("/infill", response_model=None)
    async def infill(body: protocol.InfillRequest, request: Request) -> Response:
        return await llama_route(body, request, serving.plan_infill)

    @app.post("/completion", response_model=None)
    async def completion(body: protocol.LlamaCompletionRequest, request: Request) -> Response:
        return await llama_route(body, request, serving.plan_llama_completion)

    @app.get("/props")
    async def props() -> dict[str, Any]:
        return {
            "default_generation_settings": _slot(state, 0, None),
            "total_slots": state.scheduler.slots,
            "model_path": state.model_id,
            "chat_template": "",
            "modalities": {"vision": False, "audio": False},
            "build_info": f"codegemma {app.version}",
        }

    @app.get("/slots", response_model=None)
    async def slots(fail_on_no_slot: int = 0) -> Response:
        live = [p for p in state.scheduler.progress() if p.active]
        listed = [
            _slot(state, i, live[i] if i < len(live) else None)
            for i in range(state.scheduler.slots)
        ]
        if fail_on_no_slot and len(live) >= state.scheduler.slots:
            raise APIError(503, "no slot is available", code="no_slot_available")
        return JSONResponse(listed)


def _slot(state: ServerState, slot: int, progress) -> dict[str, Any]:
    """One llama.cpp /slots entry: the engine's slots are interchangeable, so the busy ones are
    listed first, each with the sequence it holds."""
    busy = progress is not None
    entry = {
        "id": slot,
        "id_task": progress.group if busy else -1,
        "n_ctx": state.ctx.max_seq_len,
        "speculative": state.engine.speculative is not False,
        "is_processing": busy,
        "params": protocol.InfillRequest().settings(),
    }
    if busy:
        entry["next_token"] = {
            "has_next_token": True,
            "has_new_line": progress.has_new_line,
            "n_remain": progress.max_new_tokens - progress.generated,
            "n_decoded": progress.generated,
        }
    else:
        entry["next_token"] = {
            "has_next_token": False,
            "has_new_line": False,
            "n_remain": -1,
            "n_decoded": 0,
        }
    return entry


def _add_tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    tok = state.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: protocol.TokenizeRequest) -> dict[str, Any]:
        text = body.text()
        encode = serving.encode_special if body.parse_special else serving.encode_plain
        ids = await run_in_threadpool(encode, tok, text)
        if body.bos:
            ids = [tok.special.bos, *ids]
        if not body.with_pieces:
            return {"tokens": ids}
        pieces = []
        for i in ids:
            data = responses.token_bytes(tok, i)
            try:
                pieces.append({"id": i, "piece": data.decode("utf-8")})
            except UnicodeDecodeError:
                pieces.append({"id": i, "piece": list(data)})
        return {"tokens": pieces}

    @app.post("/detokenize")
    async def detokenize(body: protocol.DetokenizeRequest) -> dict[str, Any]:
        bad = next((i for i in body.tokens if not 0 <= i < state.ctx.vocab_size), None)
        if bad is not None:
            raise APIError(
                400,
                f"token id {bad} is invalid: {protocol.TOKEN_IDS} {state.ctx.vocab_size}",
                param="tokens",
                code="invalid_value",
            )
        text = tok.decode(body.tokens)
        return {"content": text, "prompt": text}  # llama.cpp's key, and vLLM's

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        sp = tok.special
        return {
            "tokenizer_class": "codegemma",
            "bos_token": tok.decode([sp.bos]),
            "eos_token": tok.decode([sp.eos]),
            "pad_token": tok.decode([sp.pad]),
            "model_max_length": state.ctx.max_seq_len,
        }


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        state.check_model(model)
        return _model_card(state)

    @app.get("/health")
    async def health() -> JSONResponse:
        load = state.scheduler.load()
        ok = state.scheduler.alive or load.in_flight == 0  # started lazily: not running is fine
        body = {
            "status": "ok" if ok else "error",
            "model": state.model_id,
            "slots_idle": load.slots - load.active,
            "slots_processing": load.active,
            "queue_depth": load.queue_depth,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "codegemma",
        "max_model_len": state.ctx.max_seq_len,
    }


def _sse(
    stream: AsyncIterator[bytes], submission: Submission, timer: asyncio.TimerHandle | None = None
) -> StreamingResponse:
    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        finally:  # the client went away (the task is cancelled) or the stream ended
            if timer is not None:
                timer.cancel()
            submission.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(guarded(), media_type="text/event-stream", headers=headers)


async def _until_done(request: Request, submission: Submission, work: Awaitable):
    """Await `work`; if the client disconnects first, cancel the submission and stop."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # client gone (or we are being cancelled)
            submission.cancel()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, GenerationFailed):
                await task
    if not task.done() or task.cancelled():
        raise APIError(499, "the client closed the request", code="client_closed_request")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- errors --------------------------------------------------------------------------------------
REQUIRED = {  # the body fields each route cannot do without, for the 400 of an empty body
    path: [name for name, f in model.model_fields.items() if f.is_required()]
    for path, model in (
        ("/v1/completions", protocol.CompletionRequest),
        ("/v1/chat/completions", protocol.ChatCompletionRequest),
        ("/infill", protocol.InfillRequest),
        ("/completion", protocol.LlamaCompletionRequest),
        ("/tokenize", protocol.TokenizeRequest),
        ("/detokenize", protocol.DetokenizeRequest),
    )
}


def _add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(GenerationFailed)
    async def generation_failed(request: Request, exc: GenerationFailed) -> JSONResponse:
        body = error_body(str(exc), type="server_error", code="generation_failed")
        return JSONResponse(body, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if exc.body in (None, b""):  # FastAPI reads an empty body as a missing one
            return JSONResponse(_empty_body(request.url.path), status_code=400)
        return JSONResponse(_validation_body(exc.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse it
            return JSONResponse(_unparsable_body(exc.__cause__), status_code=400)
        detail = exc.detail if isinstance(exc.detail, str) else "request error"
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(
            error_body(detail, type=kind, code=code),
            status_code=exc.status_code,
            headers=exc.headers,
        )


def _empty_body(path: str) -> dict[str, Any]:
    required = REQUIRED.get(path)
    needs = f" (required: {', '.join(required)})" if required else ""
    return error_body(
        f"The request body is empty; send a JSON object{needs}.",
        type="invalid_request_error",
        param=required[0] if required else None,
        code="missing_body",
    )


def _unparsable_body(cause: BaseException) -> dict[str, Any]:
    if isinstance(cause, RecursionError):
        message = (
            "The request body is not valid JSON for this server: its arrays or objects are nested "
            "too deeply to parse; flatten them."
        )
    elif isinstance(cause, UnicodeDecodeError):
        message = "The request body is not valid UTF-8; JSON must be sent as UTF-8."
    else:
        message = f"The request body could not be parsed as JSON ({type(cause).__name__})."
    return error_body(message, type="invalid_request_error", code="invalid_json")


def _validation_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        return error_body(
            f"The request body is not valid JSON ({reason}).",
            type="invalid_request_error",
            code="invalid_json",
        )
    path = _field_path(first)
    param = ".".join(path) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    field = _field_path(first, items=False)
    tried = [e for e in errors if _field_path(e, items=False) == field]
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: {param}"
    elif len(tried) > 1 and field and field[-1] in SHAPES:  # the value matched no union member
        message = f"Invalid value for '{param}': {SHAPES[field[-1]]}"
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return error_body(message, type="invalid_request_error", param=param, code="invalid_value")


def _field_path(error: dict[str, Any], *, items: bool = True) -> list[str]:
    """The location of an error as field names (and list indices, with `items`). Union members
    show up in pydantic's location as type names ("str", "list[int]", "function-after[...]"):
    they are dropped, and so are indices that follow one (they index the member, not the body)."""
    loc = tuple(error.get("loc", ()))
    path: list[str] = []
    in_member = False
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, str) and (any(c in part for c in "[]") or part in ("str", "int")):
            in_member = True
        elif isinstance(part, int):
            if items and not in_member:
                path.append(str(part))
        else:
            path.append(part)
            in_member = False
    return path


# -- middleware ----------------------------------------------------------------------------------
async def _send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None):
    response = JSONResponse(body, status_code=status, headers=headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class MetricsMiddleware:
    """Counts requests and errors and times them (to the last body byte) per route."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            endpoint = self._endpoint(scope)
            self.metrics.requests.inc(endpoint=endpoint, status=str(status))
            if status >= 400:
                self.metrics.errors.inc(endpoint=endpoint, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - started, endpoint=endpoint)

    @staticmethod
    def _endpoint(scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else "other"  # unknown paths: bounded label set


class BodyMiddleware:
    """Reads the body once, within `timeout_s` of the headers (else 408): 413 for bodies over
    `max_bytes` (announced by Content-Length or streamed); 400 for a JSON body that is not UTF-8
    (RFC 8259), which JSON parsers would report as a vaguer error. A body without a JSON content
    type is read as JSON (see `_as_json`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except TimeoutError:
            return await _send_unread(send, 408, timeout_error("body"))
        if body is None:  # the client went away
            return
        if len(body) > self.max_bytes:
            return await self._too_large(send)
        scope = _as_json(scope, headers)
        if not _is_utf8(body) and b"json" in dict(scope["headers"])[b"content-type"]:
            message = "The request body is not valid UTF-8; JSON must be sent as UTF-8."
            return await _send_json(
                send,
                400,
                error_body(message, type="invalid_request_error", code="invalid_encoding"),
            )
        replay = {"type": "http.request", "body": body, "more_body": False}
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return replay
            return await receive()  # after the body: disconnect notifications

        await self.app(scope, replay_receive, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The body, or None if the client disconnected; stops one chunk past `max_bytes`."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes or not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        message = f"The request body is larger than this server's limit of {self.max_bytes} bytes."
        body = error_body(message, type="invalid_request_error", code="request_too_large")
        await _send_unread(send, 413, body)


async def _send_unread(send: Send, status: int, body: dict, headers: dict | None = None) -> None:
    """An error answered before the request body was read in full: the connection is closed
    after it, so the server neither waits for the rest nor reads it as the next request."""
    await _send_json(send, status, body, {**(headers or {}), "Connection": "close"})


LOOSE_TYPES = (b"", b"application/x-www-form-urlencoded", b"text/plain")


def _as_json(scope: Scope, headers: dict[bytes, bytes]) -> Scope:
    """Bodies sent without a JSON content type (`curl -d` sends form-urlencoded) are read as
    JSON, as llama.cpp does; multipart and other explicit types are left to fail validation."""
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if content_type not in LOOSE_TYPES:
        return scope
    rest = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*rest, (b"content-type", b"application/json")]}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but /health, compared in constant time,
    before anything else looks at the request (its body is never read without the key)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        body = error_body(
            "Incorrect API key provided: send it as `Authorization: Bearer <key>`.",
            type="invalid_request_error",
            code="invalid_api_key",
        )
        if _has_body(scope):
            return await _send_unread(send, 401, body, {"WWW-Authenticate": "Bearer"})
        await _send_json(send, 401, body, {"WWW-Authenticate": "Bearer"})


def _has_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
