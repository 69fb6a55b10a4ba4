"""Log-probabilities of given tokens (OpenAI `logprobs`/`echo`, llama.cpp `n_probs`).

The engine samples without keeping its logits, so log-probabilities are computed afterwards by
teacher forcing: one forward pass over the prompt and the generated tokens, in chunks of
positions, each position's logits turned into log-probabilities in fp32 (as
lm-evaluation-harness's `hf` model and `eval/lm_harness.py` do). For greedy requests these are
the distributions the tokens were chosen from, up to floating-point differences between forward
shapes; for sampled ones they are the model's own distribution before temperature, top-k, top-p
and penalties (what OpenAI and llama.cpp report, `post_sampling_probs` aside).

`TokenScorer.score` runs on the scheduler's engine thread (`Scheduler.call`), between engine
steps, so the model is only ever used by one thread. It has its own KV cache, sized to the
sequence and dropped afterwards: a 7B model's cache of a full context is gigabytes.

    scorer = TokenScorer(model)
    scores = scorer.score(ids, start=1, top_k=5)   # one TokenScore per position 1..len(ids)-1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from codegemma.model import GemmaForCausalLM

CACHE_GRANULE = 256
LOGIT_FLOATS = 1 << 24  # logits computed at once (64 MiB in fp32)
PREFILL_CHUNK = 2048  # positions per forward where no logits are needed


@dataclass(frozen=True)
class TokenScore:
    """log P(token | the tokens before it) and the `top` most likely tokens there."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (id, logprob), most likely first


class TokenScorer:
    def __init__(self, model: GemmaForCausalLM) -> None:
        self.model = model
        self.device = model.model.embed_tokens.weight.device

    @torch.inference_mode()
    def score(self, ids: Sequence[int], *, start: int, top_k: int) -> list[TokenScore]:
        """A TokenScore for each of ids[start:] (start >= 1: the first token has no context)."""
        ids = [int(i) for i in ids]
        if not 1 <= start <= len(ids):
            raise ValueError(f"start must be in 1..{len(ids)}, got {start}")
        if start == len(ids):
            return []
        config = self.model.config
        length = min(-(-len(ids) // CACHE_GRANULE) * CACHE_GRANULE, config.max_position_embeddings)
        cache = self.model.new_cache(1, length)
        # keys and values of the tokens before start - 1, without their logits
        self._run(cache, ids, 0, start - 1, logits=False)
        width = max(1, LOGIT_FLOATS // config.vocab_size)
        scores: list[TokenScore] = []
        for at in range(start - 1, len(ids) - 1, width):
            end = min(at + width, len(ids) - 1)
            logprobs = self._run(cache, ids, at, end, logits=True)[0].float().log_softmax(-1)
            targets = torch.tensor(ids[at + 1 : end + 1], device=logprobs.device)
            chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
            if top_k:
                values, top_ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
                tops = [
                    tuple(zip(i, v, strict=True))
                    for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)
                ]
            else:
                tops = [()] * len(chosen)
            scores += [
                TokenScore(token=t, logprob=lp, top=top)
                for t, lp, top in zip(ids[at + 1 : end + 1], chosen, tops, strict=True)
            ]
        return scores

    def _run(self, cache, ids: list[int], start: int, end: int, *, logits: bool):
        """Feed ids[start:end] at their positions; logits [1, end - start, V] when asked (else
        one chunk at a time, only the last position's logits, which nobody reads)."""
        if end <= start:
            return None
        step = end - start if logits else PREFILL_CHUNK
        out = None
        for at in range(start, end, step):
            stop = min(at + step, end)
            x = torch.tensor([ids[at:stop]], device=self.device)
            pos = torch.arange(at, stop, device=self.device)[None]
            index = None if logits else torch.tensor([stop - at - 1], device=self.device)
            out = self.model(x, pos, cache, rows=slice(0, 1), logits_index=index)
        return out
