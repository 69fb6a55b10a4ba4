"""Sampling parameters and the next-token choice: greedy, or seeded temperature/top-k/top-p.

One `SamplingParams` per request, so a batch can mix greedy and sampled rows. Sampling draws from
the request's own `torch.Generator`: a seeded request gives the same tokens whatever else shares
its batch. Repetition penalty is CTRL's (as in transformers): seen tokens' positive logits are
divided by the penalty, negative ones multiplied; it counts the prompt too. Presence and frequency
penalties are OpenAI's: a token's logit drops by presence_penalty once it has been generated, and
by frequency_penalty for each time it has been generated (the generated tokens only, as OpenAI and
vLLM count them); negative values encourage repeats. `speculative` lets the engine draft and
verify several tokens per step for the request (speculative.py); it never changes greedy output,
nor the distribution of sampled output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from codegemma.errors import UsageError
from codegemma.options import option


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = option(128, "tokens to generate at most")
    temperature: float = option(0.0, "0 = greedy")
    top_k: int = option(0, "sample from the k most likely tokens (0 = off)")
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)")
    repetition_penalty: float = option(1.0, "CTRL-style penalty on seen tokens (1 = off)")
    presence_penalty: float = option(0.0, "OpenAI presence penalty (0 = off)")
    frequency_penalty: float = option(0.0, "OpenAI frequency penalty (0 = off)")
    seed: int | None = option(None, "seed of the sampler (none: unseeded)")
    stop_token_ids: frozenset[int] = field(default_factory=frozenset, metadata={"cli": False})
    stop_strings: tuple[str, ...] = option((), cli=False)
    speculative: bool = option(
        True,
        "draft tokens by prompt lookup and verify them in one step where the engine speculates "
        "(the output is the same; off: one token per step)",
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise UsageError(f"{name} must be a finite number, got {getattr(self, name)}")
        if any(not s for s in self.stop_strings):
            raise UsageError("stop strings must be non-empty")
        object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Greedy with no penalty: the next token is the argmax of the raw logits."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
        )


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits [V] float, seen [V] bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(
    logits: Tensor, counts: Tensor, presence: float, frequency: float
) -> Tensor:
    """OpenAI's penalties: logits [V] float, counts [V] of each token in the generated text."""
    return logits - presence * (counts > 0) - frequency * counts


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus. logits [V] float."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One next token from logits [V] (penalties already applied): the argmax when greedy, else
    a draw from `target_probs`."""
    if params.greedy:
        return int(_clean(logits).argmax())
    return draw(target_probs(logits, params), generator)


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a sampled row draws from, float64 [V]: temperature, then top-k and top-p.
    Valid but extreme parameters must not break it: the math is done in float64 (a temperature
    of 1e-300 is 0 in float32, and x / 0 is NaN), NaN logits count as impossible, +inf ones as
    certain, and the best logit is moved to 0 before scaling, so it stays finite and keeps the
    probability mass."""
    logits = _clean(logits)
    logits = filter_logits((logits - logits.max()) / params.temperature, params.top_k, params.top_p)
    return logits.softmax(-1)


def draw(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token from probs [V] by inverse transform sampling: a single uniform u, then the first
    token whose cumulative probability exceeds u. Exactly one draw per token, so the n-th token
    of a seeded request always uses the n-th uniform of its generator, however many tokens each
    step produced (speculative.py relies on this)."""
    u = torch.rand((), generator=generator, device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, u * cdf[-1], right=True)
    last = torch.searchsorted(
        cdf, cdf[-1]
    )  # the last token with probability (u * total rounded up)
    return int(torch.minimum(index, last))


def _clean(logits: Tensor) -> Tensor:
    logits = torch.nan_to_num(logits.double(), nan=float("-inf"), neginf=float("-inf"))
    if not torch.isfinite(logits).any():
        raise UsageError("the model produced no finite logit (all NaN or -inf): check the weights")
    return logits
