"""Wire types of the server: pydantic request models, the OpenAI error shape.

Request models list their fields in the order of OpenAI's API reference; our extensions come last,
under an `# -- extensions` line. The OpenAI models are strict (`extra="forbid"`, no "5" -> 5
coercion) as OpenAI's own API is: a misspelt parameter is a 400 naming it, not silently ignored.
Parameters OpenAI defines that this server cannot honour are accepted only at their neutral value
and refused otherwise. The llama.cpp models (`/infill`, `/completion`, `/tokenize`) are lenient
(`extra="ignore"`, lax types) as llama.cpp's server is, because its clients (llama.vscode,
llama.vim, Tabby) send server-specific knobs (`t_max_prompt_ms`, `dry_*`, `lora`, ...); the fields
this server reads are declared, and docs/serving.md says which of them only tune llama.cpp.

Every text field rejects strings that are not valid Unicode (a JSON `\\ud800` escape decodes to a
lone surrogate that no tokenizer can encode). Errors leave the server as
`{"error": {"message", "type", "param", "code"}}`, the shape the `openai` client parses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from codegemma.engine import SamplingParams

INT64 = 2**63
UINT64 = 2**64
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # OpenAI allows 5 for completions; vLLM's default limit is 20


class APIError(Exception):
    """An error answered to the client as an OpenAI error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "is not valid Unicode text (it contains an unpaired surrogate escape such as "
            "\\ud800); send UTF-8 text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _check_stops(stop: Text | list[Text] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    return stops


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("model", check_fields=False)
    @classmethod
    def _model_not_empty(cls, model: str | None) -> str | None:
        if model is not None and not model.strip():
            raise ValueError("must name the served model (see GET /v1/models) or be left out")
        return model

    @field_validator("seed", check_fields=False)
    @classmethod
    def _seed_in_range(cls, seed: int | None) -> int | None:
        if seed is not None and not -INT64 <= seed < INT64:
            raise ValueError("must be a 64-bit signed integer")
        return seed

    @field_validator("logit_bias", check_fields=False)
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        return bias

    def stop_strings(self) -> list[str]:
        return _check_stops(self.stop)

    def to_sampling_params(
        self,
        *,
        max_new_tokens: int,
        stop_token_ids: frozenset[int],
        stop_strings: Sequence[str] = (),
        seed_offset: int = 0,
    ) -> SamplingParams:
        """The engine's parameters for one choice; choice i of `n` samples with seed + i."""
        seed = self.seed
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if seed is None else (seed + seed_offset) % UINT64,
            stop_token_ids=stop_token_ids,
            stop_strings=tuple(stop_strings),
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


Prompt = Text | list[Text] | list[int] | list[list[int]]
TOKEN_IDS = "token ids are non-negative integers below the vocabulary size"
# What a field of a union type may be, for the 400 of a value that matches none of its members.
SHAPES = {
    "prompt": "must be a text, a list of texts, a list of token ids (non-negative integers) or a "
    "list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": 'must be a string or a list of {"type": "text", "text": ...} parts',
}


def _check_prompt(prompt: Any) -> Any:
    """A non-empty prompt whose token ids (if any) are non-negative; ids at or above the
    vocabulary size are refused when planning, where the vocabulary is known."""
    if isinstance(prompt, str):
        return prompt
    if not prompt or any(p == [] for p in prompt):
        raise ValueError("must be a non-empty text, list of texts or list of token ids")
    id_lists = (
        [prompt] if isinstance(prompt[0], int) else [p for p in prompt if isinstance(p, list)]
    )
    for ids in id_lists:
        bad = next((i for i in ids if i < 0), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is invalid: {TOKEN_IDS}")
    return prompt


class CompletionRequest(_OpenAIRequest):
    """POST /v1/completions. With `suffix`, fill-in-the-middle between prompt and suffix."""

    model: str | None = Field(None, description="the served model id; optional")
    prompt: Prompt = Field(..., description="text, a list of texts, token ids, or lists of ids")
    best_of: int | None = Field(None, ge=1, description="only 1 or equal to n is accepted")
    echo: bool = False
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="per generated repeat")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="log-probabilities of each token and its top-k"
    )
    max_tokens: int | None = Field(None, ge=0, description="default 16")
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="once generated")
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: Text | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # -- extensions (vLLM's names where vLLM has one) ------------------------------------------
    top_k: int = Field(0, ge=0, description="extension: 0 = off")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension: 1 = off")
    completion_mode: Literal["auto", "line", "block"] = Field(
        "auto", description="extension: FIM post-processing, single line or block (auto: by cursor)"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_ids(cls, prompt: Any) -> Any:
        return _check_prompt(prompt)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Any) -> Any:
        _check_stops(stop)
        return stop

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return [x if isinstance(x, str) else list(x) for x in p]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "model"]
    content: Text | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]


class ChatCompletionRequest(_OpenAIRequest):
    """POST /v1/chat/completions, through Gemma's chat template (system folded into user)."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = Field(None, description="the served model id; optional")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="per generated repeat")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    logprobs: Literal[False] | None = Field(None, description="not supported")
    max_completion_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0, description="deprecated alias")
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="once generated")
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")
    tool_choice: Literal["none"] | None = None
    user: str | None = None
    # -- extensions ------------------------------------------------------------------------------
    top_k: int = Field(0, ge=0, description="extension: 0 = off")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension: 1 = off")

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list | None) -> list | None:
        if tools:
            raise ValueError("tool calling is not supported by this server; leave tools out")
        return tools

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Any) -> Any:
        _check_stops(stop)
        return stop

    @property
    def token_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class ExtraChunk(BaseModel):
    """One `input_extra` entry: another file (or a chunk of one) shown before the prefix."""

    model_config = ConfigDict(extra="ignore")
    filename: Text = ""
    text: Text


# llama.cpp's names for the samplers this server implements, in `samplers` lists and in its
# one-character form ("kp"); the others (dry, typ_p, min_p, xtc, infill, ...) have nothing to turn
# off here. Temperature is not switched by the list: see docs/serving.md.
SAMPLER_NAMES = {"top_k": "top_k", "k": "top_k", "top_p": "top_p", "p": "top_p"}
SAMPLER_NAMES |= {"penalties": "penalties", "e": "penalties"}


class LlamaCppRequest(BaseModel):
    """What llama.cpp's `/completion` and `/infill` share, with its names. Differences in
    defaults: temperature 0 (greedy), not 0.8; top_k 0 and top_p 1 (off), not 40 and 0.95."""

    model_config = ConfigDict(extra="ignore")
    n_predict: int = Field(-1, ge=-1, description="-1 = the server's limit; 0 = prompt only")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="default 0 (greedy), not 0.8")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int = Field(-1, ge=-1, lt=UINT64, description="-1 = random")
    stop: list[Text] = Field(default_factory=list)
    stream: bool = False
    n_indent: int = Field(0, ge=0, description="end at a line indented less than this")
    t_max_predict_ms: int = Field(0, ge=0, description="end at a newline after this time")
    n_probs: int = Field(0, ge=0, le=MAX_LOGPROBS, description="completion_probabilities")
    post_sampling_probs: bool = False
    ignore_eos: bool = Field(False, description="generate exactly n_predict tokens")
    samplers: list[str] | str | None = Field(None, description="which samplers may act")
    cache_prompt: bool = True
    id_slot: int = Field(-1, ge=-1)
    return_tokens: bool = False
    response_fields: list[str] | None = None
    n_cmpl: int = Field(1, ge=1, description="completions of the prompt")
    # constraints this server cannot apply: refused unless empty, rather than silently ignored
    grammar: Any = Field(None, description="not supported: must be empty")
    json_schema: Any = Field(None, description="not supported: must be empty")
    logit_bias: Any = Field(None, description="not supported: must be empty")

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: list[str]) -> list[str]:
        return _check_stops(stop)

    @field_validator("grammar", "json_schema", "logit_bias")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("is not supported by this server; leave it out")
        return value

    @field_validator("post_sampling_probs")
    @classmethod
    def _pre_sampling_only(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "is not supported: n_probs reports the model's log-probabilities before "
                "sampling; leave post_sampling_probs out"
            )
        return value

    def enabled(self, sampler: str) -> bool:
        """Whether `samplers` lets one of ours act: all do when the list is left out."""
        if self.samplers is None:
            return True
        names = list(self.samplers) if isinstance(self.samplers, str) else self.samplers
        return sampler in {SAMPLER_NAMES.get(n) for n in names}

    def to_sampling_params(
        self,
        *,
        max_new_tokens: int,
        stop_token_ids: frozenset[int],
        stop_strings: Sequence[str],
        seed_offset: int = 0,
    ) -> SamplingParams:
        penalties = self.enabled("penalties")
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k if self.enabled("top_k") else 0,
            top_p=self.top_p if self.enabled("top_p") else 1.0,
            repetition_penalty=self.repeat_penalty if penalties else 1.0,
            presence_penalty=self.presence_penalty if penalties else 0.0,
            frequency_penalty=self.frequency_penalty if penalties else 0.0,
            seed=None if self.seed < 0 else (self.seed + seed_offset) % UINT64,
            stop_token_ids=stop_token_ids,
            stop_strings=tuple(stop_strings),
        )

    def settings(self) -> dict[str, Any]:
        """The `generation_settings` of a response: the fields as this server used them."""
        return {
            "n_predict": self.n_predict,
            "seed": self.seed,
            "temperature": self.temperature,
            "top_k": self.top_k if self.enabled("top_k") else 0,
            "top_p": self.top_p if self.enabled("top_p") else 1.0,
            "repeat_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "stop": list(self.stop),
            "n_indent": self.n_indent,
            "t_max_predict_ms": self.t_max_predict_ms,
            "n_probs": self.n_probs,
            "ignore_eos": self.ignore_eos,
            "stream": self.stream,
            "samplers": [s for s in ("penalties", "top_k", "top_p") if self.enabled(s)]
            + ["temperature"],
        }


class InfillRequest(LlamaCppRequest):
    """POST /infill. `prompt` is text typed after `input_prefix` (llama.vscode and llama.vim send
    the cursor line there), so the prefix the model completes is input_prefix + prompt."""

    input_prefix: Text = ""
    input_suffix: Text = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: Text = ""


LlamaPrompt = Text | list[int | Text]


class LlamaCompletionRequest(LlamaCppRequest):
    """POST /completion: llama.cpp's raw completion. `prompt` is a text, token ids, a list mixing
    both (one prompt), or a list of texts or of such lists (one result per prompt)."""

    prompt: LlamaPrompt | list[LlamaPrompt]

    @field_validator("prompt")
    @classmethod
    def _prompt_ids(cls, prompt: Any) -> Any:
        for p in cls._split(prompt):
            if p == "" or p == []:
                raise ValueError("must be a non-empty text or list of token ids")
            bad = next(
                (i for i in ([] if isinstance(p, str) else p) if isinstance(i, int) and i < 0), None
            )
            if bad is not None:
                raise ValueError(f"token id {bad} is invalid: {TOKEN_IDS}")
        return prompt

    @staticmethod
    def _split(prompt: Any) -> list[str | list[int | str]]:
        if isinstance(prompt, str):
            return [prompt]
        if prompt and any(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # one prompt mixing ids and texts
        return [p if isinstance(p, str) else list(p) for p in prompt] or [[]]

    def prompts(self) -> list[str | list[int | str]]:
        return self._split(self.prompt)


class TokenizeRequest(BaseModel):
    """POST /tokenize: llama.cpp's fields (`content`, `add_special`), or vLLM's (`prompt`,
    `add_special_tokens`), which lm-evaluation-harness's remote tokenizer sends."""

    model_config = ConfigDict(extra="ignore")
    content: Text | None = None
    prompt: Text | None = None
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    parse_special: bool = True
    with_pieces: bool = False

    def text(self) -> str:
        if self.content is None and self.prompt is None:
            raise APIError(400, "send the text to tokenize as `content`", param="content")
        return self.content if self.content is not None else self.prompt  # type: ignore[return-value]

    @property
    def bos(self) -> bool:
        return bool(self.add_special or self.add_special_tokens)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int] = Field(..., description="token ids")
