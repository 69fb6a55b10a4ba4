"""The generation engine: a static KV cache of `max_batch_size` slots and continuous batching.

Token ids in, token ids (and their text, when given a tokenizer) out. Requests wait in a queue; each `step()` either
prefills waiting requests into free slots (right-padded, one forward pass, logits only at each
row's last prompt token) or runs one decode step for every active slot in a single forward pass,
each row at its own position. A finished request frees its slot at once, so a long generation never
holds up the others. `generate()` (offline batches, the evaluation) and `stream()` (one request)
are loops over `step()`; the server drives `submit()/step()/cancel()` from its scheduler thread.

Prefix caching: a freed slot keeps the keys and values of the tokens it held, and a new request
goes to the free slot sharing the longest prefix with its prompt, so only the rest is prefilled.
An editor sends one completion request per keystroke, each repeating the files and the text before
the cursor: in SPM order (suffix first) the next request differs only in its last few tokens. The
infilling benchmarks share each problem's prompt across its tasks the same way.

    engine = Engine(model, tokenizer, max_batch_size=8)
    results = engine.generate([ids_a, ids_b], SamplingParams(max_new_tokens=64))
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from codegemma.engine.sampling import (
    SamplingParams,
    apply_presence_frequency,
    apply_repetition_penalty,
    make_generator,
    sample_row,
)
from codegemma.engine.stops import StopText
from codegemma.model import GemmaForCausalLM, KVCache
from codegemma.tokenizer import TextCodec

CACHE_GRANULE = 256  # cache lengths are rounded up to this, so growing it is rare


@dataclass
class GenerationResult:
    request_id: Hashable
    prompt_tokens: int
    token_ids: list[int]  # every sampled token, a stop token included
    text: str  # decoded without special tokens, cut before a stop string
    finish_reason: str  # "stop" | "length" | "cancelled"
    stop: str | int | None = None  # the stop string or token id that ended it
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


@dataclass(frozen=True)
class Event:
    request_id: Hashable
    delta: str  # newly released text
    token_id: int | None
    result: GenerationResult | None = None  # set on the request's last event

    @property
    def finished(self) -> bool:
        return self.result is not None


@dataclass(eq=False)
class _Sequence:
    request_id: Hashable
    prompt: list[int]
    params: SamplingParams
    text: StopText
    generator: torch.Generator | None
    max_new_tokens: int
    slot: int = -1
    cached: int = 0  # leading prompt tokens already in the slot's cache (prefix caching)
    cache_valid: bool = True  # False once a failed step may have half-written its row
    generated: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # [V] bool, for the repetition penalty
    counts: torch.Tensor | None = None  # [V] float, generated tokens, for presence/frequency

    @property
    def position(self) -> int:  # where the next fed token goes in the cache
        return len(self.prompt) + len(self.generated) - 1


class Engine:
    def __init__(
        self,
        model: GemmaForCausalLM,
        tokenizer: TextCodec | None = None,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        prefill_tokens: int = 8192,
        prefix_cache: bool = True,
        min_cached_prefix: int = 32,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.prefill_tokens = max_batch_size, prefill_tokens
        self.max_seq_len = min(max_seq_len or 10**9, model.config.max_position_embeddings)
        self.device = model.model.embed_tokens.weight.device
        self.cache: KVCache | None = None
        self._waiting: deque[_Sequence] = deque()
        self._slots: list[_Sequence | None] = [None] * max_batch_size
        # A prefill that resumes mid-row needs an explicit attention mask instead of the causal
        # kernel; below this many reusable tokens that costs more than it saves.
        self.prefix_cache, self.min_cached_prefix = prefix_cache, min_cached_prefix
        self._held: list[list[int]] = [[] for _ in range(max_batch_size)]  # tokens in each row
        self.prompt_tokens_computed = self.prompt_tokens_cached = 0
        self._cancel_requests: deque[Hashable] = deque()  # appended from any thread
        self._ids = itertools.count()

    # -- queue -----------------------------------------------------------------------------
    def submit(
        self, prompt: Sequence[int], params: SamplingParams, request_id: Hashable | None = None
    ) -> Hashable:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least one token (BOS)")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.max_seq_len}; "
                "shorten it (completion.py trims the prefix from the left)"
            )
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(
                f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}"
            )
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need text: build the Engine with a tokenizer")
        request_id = next(self._ids) if request_id is None else request_id
        self._waiting.append(
            _Sequence(
                request_id=request_id,
                prompt=prompt,
                params=params,
                text=StopText(self.tokenizer, params.stop_strings),
                generator=make_generator(params, self.device),
                max_new_tokens=min(params.max_new_tokens, self.max_seq_len - len(prompt)),
            )
        )
        return request_id

    def cancel(self, request_id: Hashable) -> None:
        """Ends the request at the next step (its slot is freed then); safe from another thread."""
        self._cancel_requests.append(request_id)

    @property
    def num_active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_active > 0

    # -- stepping --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        events = self._process_cancellations()
        free = [i for i, s in enumerate(self._slots) if s is None]
        try:
            if self._waiting and free:
                return events + self._prefill(free)
            if self.num_active:
                return events + self._decode()
        except BaseException:  # a failed forward pass may have half-written any row it touched
            self._held = [[] for _ in self._held]
            for seq in self._slots:
                if seq is not None:
                    seq.cache_valid = False
            raise
        return events

    def _process_cancellations(self) -> list[Event]:
        cancelled = set()
        while self._cancel_requests:  # popleft is atomic: a concurrent cancel is never lost
            cancelled.add(self._cancel_requests.popleft())
        if not cancelled:
            return []
        events = []
        for seq in [s for s in self._waiting if s.request_id in cancelled]:
            self._waiting.remove(seq)
            events.append(self._finish(seq, "", None, "cancelled"))
        for seq in self._slots:
            if seq is not None and seq.request_id in cancelled:
                events.append(self._finish(seq, "", None, "cancelled"))
        return events

    def _prefill(self, free: list[int]) -> list[Event]:
        batch: list[_Sequence] = []
        while self._waiting and free:
            seq = self._waiting[0]
            slot, cached = self._best_slot(seq.prompt, free)
            longest = max([len(s.prompt) - s.cached for s in batch] + [len(seq.prompt) - cached])
            if batch and longest * (len(batch) + 1) > self.prefill_tokens:
                break
            self._waiting.popleft()
            free.remove(slot)
            seq.slot, seq.cached = slot, cached
            self._slots[slot], self._held[slot] = seq, []
            batch.append(seq)
        # every row's real tokens, and room for its padding, must fit in the cache
        self._ensure_cache(max(len(s.prompt) + max(s.max_new_tokens, 1) for s in batch))
        T = max(len(s.prompt) - s.cached for s in batch)
        ids = torch.full((len(batch), T), self.model.config.pad_token_id, dtype=torch.long)
        pos = torch.arange(T).repeat(len(batch), 1)
        for row, seq in enumerate(batch):
            ids[row, : len(seq.prompt) - seq.cached] = torch.tensor(seq.prompt[seq.cached :])
            pos[row] += seq.cached
        # padding past a row's end is written at positions its own tokens overwrite before they
        # are attended to; clamped, so a row resuming deep in its cache stays inside it
        pos.clamp_(max=self.cache.max_seq_len - 1)
        self.prompt_tokens_computed += sum(len(s.prompt) - s.cached for s in batch)
        self.prompt_tokens_cached += sum(s.cached for s in batch)
        logits = self.model(
            ids.to(self.device),
            pos.to(self.device),
            self.cache,
            rows=torch.tensor([s.slot for s in batch], device=self.device),
            logits_index=torch.tensor(
                [len(s.prompt) - s.cached - 1 for s in batch], device=self.device
            ),
        )[:, 0]
        return self._advance_all(batch, logits)

    def _best_slot(self, prompt: list[int], free: list[int]) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest prefix with `prompt` (the lowest
        slot on ties, so decode batches stay compact) and how many prompt tokens it saves: all
        but the last at most, whose logits are needed."""
        best, shared = free[0], 0
        if self.prefix_cache:
            for slot in free:
                n = _common_prefix(self._held[slot], prompt)
                if n > shared:
                    best, shared = slot, n
        shared = min(shared, len(prompt) - 1)
        return (best, shared) if shared >= self.min_cached_prefix else (free[0], 0)

    def _decode(self) -> list[Event]:
        active = [s for s in self._slots if s is not None]
        slots = [s.slot for s in active]
        ids = torch.tensor([[s.generated[-1]] for s in active])
        pos = torch.tensor([[s.position] for s in active])
        # Only active rows are computed and written: a free row keeps what it holds for the
        # prefix cache. Slots 0..n-1 read the cache as a view; scattered ones gather their rows.
        contiguous = slots[-1] == len(slots) - 1
        rows = slice(0, len(slots)) if contiguous else torch.tensor(slots, device=self.device)
        logits = self.model(ids.to(self.device), pos.to(self.device), self.cache, rows=rows)
        return self._advance_all(active, logits[:, 0])

    def _advance_all(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[Event]:
        """Next token for each of seqs from logits [len(seqs), V]; plain greedy rows are chosen
        together (one argmax, one device sync), the others row by row with their own RNG."""
        plain = [s.params.plain for s in seqs]
        greedy = logits.argmax(-1).tolist() if any(plain) else []
        tokens = [greedy[i] if plain[i] else self._sample(s, logits[i]) for i, s in enumerate(seqs)]
        return [self._advance(s, t) for s, t in zip(seqs, tokens, strict=True)]

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        logits = logits.float()
        if seq.params.repetition_penalty != 1.0:
            if seq.seen is None:
                seq.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                seq.seen[torch.tensor(seq.prompt, device=logits.device)] = True
            logits = apply_repetition_penalty(logits, seq.seen, seq.params.repetition_penalty)
        if seq.params.presence_penalty or seq.params.frequency_penalty:
            if seq.counts is None:
                seq.counts = torch.zeros(logits.shape[-1], device=logits.device)
                for token in seq.generated:
                    seq.counts[token] += 1
            logits = apply_presence_frequency(
                logits, seq.counts, seq.params.presence_penalty, seq.params.frequency_penalty
            )
        return sample_row(logits, seq.params, seq.generator)

    def _advance(self, seq: _Sequence, token: int) -> Event:
        """Append seq's next token and apply every stopping rule."""
        if seq.max_new_tokens <= 0:
            return self._finish(seq, seq.text.finish(), None, "length")
        seq.generated.append(token)
        if seq.seen is not None:
            seq.seen[token] = True
        if seq.counts is not None:
            seq.counts[token] += 1
        if token in seq.params.stop_token_ids:
            return self._finish(seq, seq.text.finish(), token, "stop", stop=token)
        delta, matched = seq.text.push(token)
        if matched is not None:
            return self._finish(seq, delta, token, "stop", stop=matched)
        if len(seq.generated) >= seq.max_new_tokens:
            return self._finish(seq, delta + seq.text.finish(), token, "length")
        return Event(seq.request_id, delta, token)

    def _finish(
        self,
        seq: _Sequence,
        delta: str,
        token: int | None,
        reason: str,
        stop: str | int | None = None,
    ) -> Event:
        if seq.slot >= 0:
            self._slots[seq.slot] = None
            # what the row's cache now holds: the prompt and every generated token fed back
            valid = seq.prompt + seq.generated[:-1] if seq.cache_valid else []
            self._held[seq.slot] = valid
        result = GenerationResult(
            seq.request_id, len(seq.prompt), seq.generated, seq.text.text, reason, stop, seq.cached
        )
        return Event(seq.request_id, delta, token, result)

    def _ensure_cache(self, needed: int) -> None:
        if self.cache is not None and self.cache.max_seq_len >= needed:
            return
        length = min(-(-needed // CACHE_GRANULE) * CACHE_GRANULE, self.max_seq_len)
        old, self.cache = self.cache, self.model.new_cache(self.max_batch_size, length)
        if old is not None:  # keep the active slots' keys and values
            for new_layer, old_layer in zip(self.cache.layers, old.layers, strict=True):
                new_layer.k[:, :, : old.max_seq_len] = old_layer.k
                new_layer.v[:, :, : old.max_seq_len] = old_layer.v

    # -- loops -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        *,
        progress: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt; results in prompt order."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        # similar lengths enter together: less padding in each prefill
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        ids = {self.submit(prompts[i], per_prompt[i], request_id=("generate", i)): i for i in order}
        results: list[GenerationResult | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), disable=not progress, desc="generate", unit="seq") as bar:
            while any(r is None for r in results):
                for event in self.step():
                    if event.finished and event.request_id in ids:
                        results[ids[event.request_id]] = event.result
                        bar.update(1)
        return results  # type: ignore[return-value]

    def stream(
        self, prompt: Sequence[int], params: SamplingParams = SamplingParams()
    ) -> Iterator[Event]:
        """Events of one request as they happen; the last one carries the result."""
        request_id = self.submit(prompt, params, request_id=("stream", next(self._ids)))
        try:
            while True:
                for event in self.step():
                    if event.request_id == request_id:
                        yield event
                        if event.finished:
                            return
        finally:  # the consumer stopped early: free the slot
            self.cancel(request_id)
            self._process_cancellations()


def _common_prefix(a: list[int], b: list[int], chunk: int = 256) -> int:
    """Length of the longest common prefix; whole chunks compared as slices (at C speed), since
    prompts run to thousands of tokens and every admission checks every free slot."""
    n, i = min(len(a), len(b)), 0
    while i < n and a[i : i + chunk] == b[i : i + chunk]:
        i += chunk
    while i < n and a[i] == b[i]:
        i += 1
    return min(i, n)
