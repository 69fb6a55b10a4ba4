"""The generation engine: a static KV cache of `max_batch_size` slots and continuous batching.

Token ids in, token ids (and their text, when given a tokenizer) out. Requests wait in a queue; each `step()` either
prefills waiting requests into free slots (right-padded, one forward pass, logits only at each
row's last prompt token) or runs one decode step for every active slot in a single forward pass,
each row at its own position. A finished request frees its slot at once, so a long generation never
holds up the others. `generate()` (offline batches, the evaluation) and `stream()` (one request)
are loops over `step()`; the server drives `submit()/step()/cancel()` from its scheduler thread.

The engine owns the decode step: when it allocates its KV cache it builds kernels.step.DecodeStep
from whatever weights the model holds (fp32/bf16, or quantized blocks, quant.py), the whole step
in one kernel call on CPU, and decode steps of up to `DecodeStep.max_rows` tokens (one per row,
or a row's last token and its draft) go through it; others, and prefill, run the model's modules
(plain torch; quantized matrices through quant.py). Each prefill first checks that the model still
holds the tensors the step reads and rebuilds it if not (weights replaced, converted or moved);
weights changed in place are read as they are. Where no step can be built (no kernels, another
device, a model the kernel does not know), every forward runs the modules.

Prefix caching: a freed slot keeps the keys and values of the tokens it held, and a new request
goes to the free slot sharing the longest prefix with its prompt, so only the rest is prefilled.
An editor sends one completion request per keystroke, each repeating the files and the text before
the cursor: in SPM order (suffix first) the next request differs only in its last few tokens. The
infilling benchmarks share each problem's prompt across its tasks the same way.

Speculative decoding (speculative.py): a decode step may first draft up to `max_draft_tokens`
tokens per sequence by prompt lookup (`speculative=True`: at every step; "auto", the default:
while verify steps deliver more tokens per second than one-token steps, as timed here; False:
never; `SamplingParams.speculative=False` turns it off for one request). When any row has a
draft, the step feeds every row its last token plus its draft (right-padded, each row at its own
positions) in one forward pass (the decode step's kernel when it takes that many tokens) and
keeps, per row, the longest draft prefix the target model agrees with plus the model's next token. Keys and values written for rejected draft tokens and
padding lie beyond the row's accepted length: a query at position p attends to positions 0..p of
its row only (model.cache_mask), and the next step writes its tokens from the accepted length on
before attending, so they are overwritten before anything reads them. A step where no row has a
draft is the plain one-token step. Each token is chosen as plain
decoding chooses it and goes through the same stopping rules one by one, so results and streamed
events are plain decoding's, greedy or seeded, as far as the logits of the two forward shapes
agree. `decode_stats` counts decode steps, drafted and accepted tokens.

    engine = Engine(model, tokenizer, max_batch_size=8)
    results = engine.generate([ids_a, ids_b], SamplingParams(max_new_tokens=64))
"""

from __future__ import annotations

import itertools
import time
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
from codegemma.engine.speculative import DecodeStats, DraftLength, PromptLookup, StepRates
from codegemma.engine.stops import StopText
from codegemma.errors import UsageError
from codegemma.kernels.step import DecodeStep
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
    decode_steps: int = 0  # decode forward passes this request took part in (prefill not counted)
    draft_tokens: int = 0  # draft tokens fed for verification (speculative decoding)
    accepted_draft_tokens: int = 0  # of those, the ones the model kept


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
    lookup: PromptLookup | None = None  # n-gram index of its tokens, built at its first draft
    draft_length: DraftLength | None = None
    decode_steps: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

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
        speculative: bool | str = "auto",
        max_draft_tokens: int = 8,
    ) -> None:
        if max_batch_size < 1:
            raise UsageError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if speculative not in (True, False, "auto"):
            raise UsageError(f"speculative must be True, False or 'auto', got {speculative!r}")
        if max_draft_tokens < 1:
            raise UsageError(f"max_draft_tokens must be >= 1, got {max_draft_tokens}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.prefill_tokens = max_batch_size, prefill_tokens
        self.max_seq_len = min(max_seq_len or 10**9, model.config.max_position_embeddings)
        self.device = model.model.embed_tokens.weight.device
        self.cache: KVCache | None = None
        self._step: DecodeStep | None = None  # built with the cache, for this model and cache
        self._waiting: deque[_Sequence] = deque()
        self._slots: list[_Sequence | None] = [None] * max_batch_size
        # A prefill that resumes mid-row needs an explicit attention mask instead of the causal
        # kernel; below this many reusable tokens that costs more than it saves.
        self.prefix_cache, self.min_cached_prefix = prefix_cache, min_cached_prefix
        self._held: list[list[int]] = [[] for _ in range(max_batch_size)]  # tokens in each row
        self.prompt_tokens_computed = self.prompt_tokens_cached = 0
        self.speculative, self.max_draft_tokens = speculative, max_draft_tokens
        self.decode_stats = DecodeStats()
        self._rates = StepRates()  # speculative="auto": whether verify steps are faster here
        self._cancel_requests: deque[Hashable] = deque()  # appended from any thread
        self._ids = itertools.count()

    # -- queue -----------------------------------------------------------------------------
    def submit(
        self, prompt: Sequence[int], params: SamplingParams, request_id: Hashable | None = None
    ) -> Hashable:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UsageError("the prompt is empty: it needs at least one token (BOS)")
        if len(prompt) >= self.max_seq_len:
            raise UsageError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.max_seq_len}; "
                "shorten it (completion.py trims the prefix from the left)"
            )
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise UsageError(
                f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}"
            )
        if params.stop_strings and self.tokenizer is None:
            raise UsageError("stop strings need text: build the Engine with a tokenizer")
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
        self._check_step()
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
        start = time.perf_counter()
        active = [s for s in self._slots if s is not None]
        auto = self.speculative == "auto"
        speculate = self.speculative is True or auto and self._rates.speculate()
        drafts = [self._draft(s) if speculate else [] for s in active]
        self._count_step(active, drafts)
        if any(drafts):
            events = self._verify(active, drafts)
        else:
            ids = torch.tensor([[s.generated[-1]] for s in active])
            pos = torch.tensor([[s.position] for s in active])
            events = self._advance_all(active, self._forward(active, ids, pos)[:, 0])
        tokens = sum(e.token_id is not None for e in events)
        self.decode_stats.decode_tokens += tokens
        if auto:
            self._rates.record(any(drafts), tokens, time.perf_counter() - start)
        return events

    def _forward(self, active: list[_Sequence], ids: torch.Tensor, pos: torch.Tensor):
        """Logits [B, T, V] of a decode step. Only active rows are computed and written: a free
        row keeps what it holds for the prefix cache. Slots 0..n-1 read the cache as a view;
        scattered ones gather their rows."""
        slots = [s.slot for s in active]
        contiguous = slots[-1] == len(slots) - 1
        rows = slice(0, len(slots)) if contiguous else torch.tensor(slots, device=self.device)
        if self._step is not None and ids.numel() <= self._step.max_rows:
            return self._step(ids, pos, rows)
        return self.model(ids.to(self.device), pos.to(self.device), self.cache, rows=rows)

    def _check_step(self) -> None:
        """Rebuild the decode step where the model no longer holds the tensors it reads (or it
        has none yet: the cache is new, or the model could not be stepped before)."""
        if self._step is None or not self._step.current(self.model, self.cache):
            self._step = DecodeStep.build(self.model, self.cache)

    def _count_step(self, active: list[_Sequence], drafts: list[list[int]]) -> None:
        stats = self.decode_stats
        stats.decode_steps += 1
        stats.verify_steps += any(drafts)
        stats.sequence_steps += len(active)
        for seq, draft in zip(active, drafts, strict=True):
            seq.decode_steps += 1
            seq.draft_tokens += len(draft)
            stats.draft_tokens += len(draft)

    def _draft(self, seq: _Sequence) -> list[int]:
        """Up to the sequence's draft length of prompt-lookup tokens, never more than its
        remaining budget can take (a verify step emits up to len(draft) + 1 tokens)."""
        if not seq.params.speculative:
            return []
        room = seq.max_new_tokens - len(seq.generated) - 1
        if room < 1:
            return []
        if seq.lookup is None:
            seq.lookup = PromptLookup(seq.prompt)
            seq.draft_length = DraftLength(self.max_draft_tokens)
        seq.lookup.extend(seq.generated[len(seq.lookup) - len(seq.prompt) :])
        return seq.lookup.draft(min(room, seq.draft_length.current))

    def _verify(self, active: list[_Sequence], drafts: list[list[int]]) -> list[Event]:
        """One forward pass over each row's last token and its draft; the tokens each row keeps
        go through `_advance` one by one, as plain decoding would emit them."""
        T = 1 + max(len(d) for d in drafts)
        ids = torch.full((len(active), T), self.model.config.pad_token_id, dtype=torch.long)
        pos = torch.arange(T).repeat(len(active), 1)
        for row, (seq, draft) in enumerate(zip(active, drafts, strict=True)):
            ids[row, : 1 + len(draft)] = torch.tensor([seq.generated[-1], *draft])
            pos[row] += seq.position
        # padding lies past every row's real tokens (overwritten before it is read); clamped,
        # so a row near the end of the cache stays inside it (real positions never reach there)
        pos.clamp_(max=self.cache.max_seq_len - 1)
        logits = self._forward(active, ids, pos)
        plain = [s.params.plain for s in active]
        greedy = logits.argmax(-1).tolist() if any(plain) else []
        events = []
        for row, (seq, draft) in enumerate(zip(active, drafts, strict=True)):
            events += self._accept(seq, draft, logits[row], greedy[row] if plain[row] else None)
        return events

    def _accept(
        self, seq: _Sequence, draft: list[int], logits: torch.Tensor, argmax: list[int] | None
    ) -> list[Event]:
        """Emit seq's tokens from a verify step, one `_advance` each: logits [T, V] follow each
        fed token (the last one, then the draft's); argmax, their argmaxes for a plain greedy
        row. Every token is chosen as plain decoding chooses it (penalties see every token
        emitted before it; a sampled row draws it as sampling.draw does, which makes keeping a
        matching draft token speculative rejection sampling, see speculative.py). Stops after the
        first token that is not the draft's or when a stopping rule ends the sequence."""
        events: list[Event] = []
        kept = 0
        for i in range(len(draft) + 1):
            proposal = draft[i] if i < len(draft) else None
            token = argmax[i] if argmax is not None else self._sample(seq, logits[i])
            if token == proposal:  # counted first: the sequence's result may be made next
                kept += 1
                seq.accepted_draft_tokens += 1
                self.decode_stats.accepted_draft_tokens += 1
            events.append(self._advance(seq, token))
            if token != proposal or events[-1].finished:
                break
        if draft:
            seq.draft_length.update(len(draft), kept)
        return events

    def _advance_all(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[Event]:
        """Next token for each of seqs from logits [len(seqs), V]; plain greedy rows are chosen
        together (one argmax, one device sync), the others row by row with their own RNG."""
        plain = [s.params.plain for s in seqs]
        greedy = logits.argmax(-1).tolist() if any(plain) else []
        tokens = [greedy[i] if plain[i] else self._sample(s, logits[i]) for i, s in enumerate(seqs)]
        return [self._advance(s, t) for s, t in zip(seqs, tokens, strict=True)]

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        return sample_row(self._penalized(seq, logits), seq.params, seq.generator)

    def _penalized(self, seq: _Sequence, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] as float, with seq's penalties for what it has seen and generated so far."""
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
        return logits

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
            seq.request_id,
            len(seq.prompt),
            seq.generated,
            seq.text.text,
            reason,
            stop,
            seq.cached,
            decode_steps=seq.decode_steps,
            draft_tokens=seq.draft_tokens,
            accepted_draft_tokens=seq.accepted_draft_tokens,
        )
        return Event(seq.request_id, delta, token, result)

    def _ensure_cache(self, needed: int) -> None:
        """A cache of at least `needed` positions in the model's compute dtype (a model converted
        since, e.g. model.to(torch.bfloat16), gets a new one; its rows are converted)."""
        cache, dtype = self.cache, getattr(self.model, "compute_dtype", None)
        if (
            cache is not None
            and cache.max_seq_len >= needed
            and (dtype is None or cache.layers[0].k.dtype == dtype)
        ):
            return
        if cache is not None:
            needed = max(needed, cache.max_seq_len)
        length = min(-(-needed // CACHE_GRANULE) * CACHE_GRANULE, self.max_seq_len)
        self._step = None  # it reads the old cache's buffers
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
            raise UsageError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
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
