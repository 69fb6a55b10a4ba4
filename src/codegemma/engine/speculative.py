"""Speculative decoding by prompt lookup: drafts from the sequence's own tokens, verified exactly.

Code repeats itself: a completion often copies a run of tokens from the file above, from the
suffix (which a FIM prompt already holds), from a context file or from what it generated a few
lines back. Prompt lookup decoding (Saxena 2023, "prompt lookup decoding"; llama.cpp's lookup
decoding) drafts without a draft model: it finds the longest trailing n-gram of the sequence's
tokens (n = `max_ngram` down to `min_ngram`) that occurred before, and proposes the k tokens that
followed it there (`PromptLookup`). The engine feeds the last token plus the draft in one forward
pass and keeps the longest prefix the target model agrees with, plus the model's own next token,
so one pass over the weights yields between 1 and k + 1 tokens. Whether that is faster than k + 1
one-token steps depends on the model and the machine (`StepRates` measures it for the engine's
"auto" setting).

Verification is exact (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023). Greedy rows keep a draft token when it is the argmax. For sampled
rows the draft is a point mass q on token x, so standard speculative rejection sampling keeps x
with probability p(x) under the target distribution p (after penalties, temperature, top-k,
top-p) and otherwise samples from the residual norm(max(p - q, 0)), which is p with x removed,
renormalised. The engine implements it as a coupling: it draws the position's token t from p as
plain decoding does (sampling.draw: one uniform per token, inverse transform) and keeps the
draft when t == x. P(t == x) = p(x), and given t != x, t follows p restricted to tokens other
than x, renormalised: the residual. Since the n-th token of a request always uses the n-th
uniform of its generator, a seeded request gets the very tokens plain decoding gives it (up to
floating-point differences in the logits between the one-token and the verify forward), not only
the same distribution.

The draft length adapts per sequence as in transformers' assisted generation ("heuristic"
schedule): two more after a draft accepted in full, one fewer after a rejection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from codegemma.errors import UsageError

MAX_NGRAM, MIN_NGRAM = 3, 1
CANDIDATES, CONTEXT = 16, 32  # occurrences compared per draft; tokens compared before each


class PromptLookup:
    """An n-gram index over one sequence's tokens: `draft(k)` proposes up to k tokens.

    For each n-gram length the index keeps where each n-gram occurred, as the index of the token
    that followed it; an n-gram enters only once its follower is known, so the sequence's
    trailing n-gram only ever matches an earlier occurrence. Of the occurrences of the longest
    trailing n-gram found, the draft follows the one whose preceding tokens agree longest with the
    sequence's (the most similar context: the same statement in a similar line), the most recent
    on ties. Appending a token costs one dict update per n-gram length."""

    def __init__(
        self,
        tokens: Sequence[int] = (),
        max_ngram: int = MAX_NGRAM,
        min_ngram: int = MIN_NGRAM,
        candidates: int = CANDIDATES,
        context: int = CONTEXT,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise UsageError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.candidates, self.context = candidates, context
        self.tokens: list[int] = []
        self._followers: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: {} for n in range(min_ngram, max_ngram + 1)
        }
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        seq = self.tokens
        for token in tokens:
            end = len(seq)
            for n, followers in self._followers.items():
                if end >= n:
                    followers.setdefault(tuple(seq[end - n : end]), []).append(end)
            seq.append(int(token))

    def draft(self, k: int) -> list[int]:
        """k tokens that followed the best earlier occurrence of the longest trailing n-gram that
        occurred before; [] when none did (or k < 1)."""
        if k < 1:
            return []
        seq = self.tokens
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            found = self._followers[n].get(tuple(seq[-n:]))
            if found:
                start = max(found[-self.candidates :], key=lambda f: (self._agreement(f, n), f))
                return self._copy(start, k)
        return []

    def _copy(self, start: int, k: int) -> list[int]:
        """k tokens from start on; past the sequence's end the copy continues from its own
        beginning, as if the draft were already appended (a pattern of period p repeats on
        beyond the p tokens that follow its previous occurrence)."""
        seq, draft = self.tokens, []
        for i in range(start, start + k):
            draft.append(seq[i] if i < len(seq) else draft[i - len(seq)])
        return draft

    def _agreement(self, follower: int, n: int) -> int:
        """How many tokens before the occurrence ending at follower agree with those before the
        sequence's trailing n-gram (up to `context`)."""
        seq, a, b, count = self.tokens, follower - n - 1, len(self.tokens) - n - 1, 0
        while count < self.context and a >= 0 and seq[a] == seq[b]:
            a, b, count = a - 1, b - 1, count + 1
        return count


@dataclass
class DraftLength:
    """The adaptive number of tokens to draft for one sequence, within 1..maximum."""

    maximum: int
    current: int = 0

    def __post_init__(self) -> None:
        self.current = self.current or self.maximum

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            step = 2 if accepted == drafted else -1
            self.current = max(1, min(self.maximum, self.current + step))


@dataclass
class DecodeStats:
    """What the decode steps did, summed over every sequence (prefill not included).

    decode_steps: forward passes of the target model in decode; verify_steps: those of them that
    verified drafts (several tokens per row); sequence_steps: one per sequence per decode step;
    decode_tokens: tokens those steps produced; draft_tokens: draft tokens fed for verification;
    accepted_draft_tokens: draft tokens the target model kept."""

    decode_steps: int = 0
    verify_steps: int = 0
    sequence_steps: int = 0
    decode_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def tokens_per_step(self) -> float:
        """Tokens each sequence got per decode step (1.0 without speculation)."""
        return self.decode_tokens / self.sequence_steps if self.sequence_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0


class StepRates:
    """Whether verify steps pay here: moving averages of the tokens per second that one-token
    steps and verify steps deliver, as the engine times them. A verify step costs more than a
    one-token step (several positions, the module path instead of kernels.DecodeStep on CPU); it
    pays when its tokens per step make up for that, which depends on the model, the machine and
    how repetitive the text is. `speculate()` measures one-token steps first, then verify steps,
    then picks the faster kind, and tries the slower one again every `probe_every` steps so a
    change (new requests, longer contexts) is noticed. Only speed depends on it, never output."""

    def __init__(self, probe_every: int = 32, smoothing: float = 0.25) -> None:
        self.probe_every, self.smoothing = probe_every, smoothing
        self.plain: float | None = None  # tokens per second of one-token steps
        self.verify: float | None = None  # of verify steps
        self._since_probe = 0

    def record(self, verified: bool, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-9)
        old = self.verify if verified else self.plain
        new = rate if old is None else old + self.smoothing * (rate - old)
        if verified:
            self.verify = new
        else:
            self.plain = new

    def speculate(self) -> bool:
        if self.plain is None or self.verify is None:
            return self.plain is not None
        faster = self.verify >= self.plain
        self._since_probe += 1
        if self._since_probe >= self.probe_every:
            self._since_probe = 0
            return not faster
        return faster
