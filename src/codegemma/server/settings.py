"""Server settings: a frozen, keyword-only dataclass validated on construction, and the one source
of `codegemma serve`'s flags for them (cli.py generates one flag per field, with this help).

    settings = ServerSettings(served_model_name="codegemma-2b", api_key=os.environ.get(...))

Timeouts and limits (docs/serving.md has the table):
- `header_timeout_s`: the request line and headers must arrive within this time of the connection
  opening (or of the previous response on a kept-alive connection); else 408 and close.
- `body_timeout_s`: the whole body must arrive within this time of the headers; else 408 and close.
  The default lets a client on a slow link (about 1 Mbit/s) send a body at the size limit.
- `keep_alive_s`: an idle kept-alive connection is closed after this time (uvicorn's default).
"""

from __future__ import annotations

from dataclasses import dataclass

from codegemma.errors import UsageError
from codegemma.options import option

API_KEY_ENV = "CODEGEMMA_API_KEY"
FIM_MODES = ("psm", "spm")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    served_model_name: str = option(
        "codegemma", "the model id in /v1/models and responses", cli=False
    )
    api_key: str | None = option(
        None,
        f"require `Authorization: Bearer KEY` on every route but /health (default: ${API_KEY_ENV} "
        "if set, else no key)",
        cli=False,
    )
    max_queue: int = option(
        64, "sequences that may wait for a slot; beyond that: 503 + Retry-After"
    )
    max_tokens: int = option(1024, "the largest max_tokens / n_predict a request may ask for")
    default_completion_tokens: int = option(
        16, "max_tokens of a /v1/completions request that leaves it out, as in OpenAI's API"
    )
    max_prompt_tokens: int | None = option(
        None, "longest prompt in tokens (none: the context length minus one)"
    )
    max_body_bytes: int = option(4 * 1024 * 1024, "larger request bodies get 413")
    max_n: int = option(8, "most sequences one request may ask for (n x number of prompts)")
    retry_after_s: int = option(1, "the Retry-After of a 503 (seconds)")
    fim_mode: str = option(
        "psm",
        "FIM prompt layout; spm (suffix first) lets the prefix cache reuse nearly the whole "
        "prompt from one keystroke to the next",
        choices=FIM_MODES,
    )
    header_timeout_s: float = option(
        10.0, "seconds a client has to send the request line and headers; then 408"
    )
    body_timeout_s: float = option(
        60.0, "seconds a client has to send the whole request body; then 408"
    )
    keep_alive_s: float = option(5.0, "seconds an idle kept-alive connection stays open")

    def __post_init__(self) -> None:
        if not self.served_model_name.strip():
            raise UsageError(
                "served_model_name must not be empty", fix="pass --served-model-name NAME"
            )
        if self.api_key is not None and not self.api_key:
            raise UsageError(
                "api_key must not be empty",
                fix=f"pass a key with --api-key (or ${API_KEY_ENV}), or leave both out to serve "
                "without one",
            )
        for name in ("max_tokens", "default_completion_tokens", "max_body_bytes", "max_n"):
            _at_least(self, name, 1)
        for name in ("max_queue", "retry_after_s"):
            _at_least(self, name, 0)
        if self.max_prompt_tokens is not None:
            _at_least(self, "max_prompt_tokens", 1)
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise UsageError(
                    f"{name} must be > 0 seconds, got {getattr(self, name)}",
                    fix=f"pass --{_flag(name)} with a positive number of seconds",
                )
        if self.fim_mode not in FIM_MODES:
            raise UsageError(
                f"fim_mode must be psm or spm, got {self.fim_mode!r}",
                fix="pass --fim-mode psm (CodeGemma's documented layout) or --fim-mode spm",
            )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _at_least(settings: ServerSettings, name: str, low: int) -> None:
    value = getattr(settings, name)
    if value < low:
        raise UsageError(
            f"{name} must be >= {low}, got {value}", fix=f"pass --{_flag(name)} {low} or more"
        )
