"""Server settings: a frozen, keyword-only dataclass validated on construction.

    settings = ServerSettings(served_model_name="codegemma-2b", api_key=os.environ.get(...))

The command line (cli.py) builds one from its flags and the CODEGEMMA_API_KEY variable.
"""

from __future__ import annotations

from dataclasses import dataclass

API_KEY_ENV = "CODEGEMMA_API_KEY"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    served_model_name: str = "codegemma"
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer`
    max_queue: int = 64  # sequences that may wait for a slot; beyond: 503 + Retry-After
    max_tokens: int = 1024  # the largest max_tokens / n_predict a request may ask for
    default_completion_tokens: int = 16  # OpenAI's default max_tokens for /v1/completions
    max_prompt_tokens: int | None = None  # None: the context length minus one
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 8  # choices per request (n x number of prompts)
    retry_after_s: int = 1
    fim_mode: str = "psm"  # FIM prompt layout: psm (CodeGemma's documented one) or spm

    def __post_init__(self) -> None:
        if not self.served_model_name.strip():
            raise ValueError("served_model_name must not be empty")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when given (leave it out to disable auth)")
        for name in ("max_tokens", "default_completion_tokens", "max_body_bytes", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.retry_after_s < 0:
            raise ValueError("max_queue and retry_after_s must be >= 0")
        if self.fim_mode not in ("psm", "spm"):
            raise ValueError(f"fim_mode must be psm or spm, got {self.fim_mode!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
