"""The card's natural-language and math benchmarks through EleutherAI's lm-evaluation-harness.

BoolQ, PIQA, TriviaQA, ARC-Challenge, HellaSwag, MMLU, WinoGrande, GSM8K and MATH are run with
lm-eval's own task definitions, prompts, few-shot sampling, answer extraction and metrics; what
this module adds is our model underneath, as the lm-eval model `codegemma`:

    run_lm_eval("path/to/codegemma-7b", ["card"], out_dir="runs/7b-card")   # or, from the shell:
    codegemma eval lm-eval --model path/to/codegemma-7b --tasks card --out runs/7b-card
    lm_eval --model codegemma --model_args pretrained=path/to/codegemma-7b --tasks boolq

`CodeGemmaLM` answers lm-eval's three request kinds the way lm-eval's `hf` model does (the same
tokens in, the same numbers out; tests/eval/test_lm_harness.py checks it against `hf`):
- `loglikelihood`: BOS + context + continuation, left-truncated to the context length. A batch's
  rows are scored in two passes over one KV cache: each distinct context is prefilled once
  (no logits), its keys and values copied to the rows of its other continuations, then every
  row's continuation is run against them and only those positions get logits, turned into
  log-probabilities in fp32. Rows whose inputs are equal (one-token choices such as " A", " B")
  are computed once.
- `loglikelihood_rolling`: `hf`'s windows (`get_rolling_token_windows`, BOS as the prefix token).
- `generate_until`: our `Engine` (continuous batching, prefix cache), greedy unless `do_sample`,
  stopping at eos and at the task's `until` strings; text is decoded and cut as `hf` does.

Nothing is downloaded: importing this module sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, data sets
come from the Hugging Face datasets cache or local files, and a missing one is an `EvalError` that
names the task, the data set id and how to put it on the machine. Guide: docs/lm_eval.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def _go_offline() -> None:
    """Hugging Face libraries never reach the network from here: the switches are read when
    `datasets` and `huggingface_hub` are imported, so they are set before lm-eval imports them,
    and set on the modules too if something imported them earlier."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


_go_offline()

import lm_eval  # noqa: E402  (after the offline switches)
from lm_eval.api.group import Group  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.api.task import Task  # noqa: E402
from lm_eval.models.utils import (  # noqa: E402
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.tasks import TaskManager  # noqa: E402

from codegemma.engine import Engine, SamplingParams  # noqa: E402
from codegemma.errors import EvalError  # noqa: E402
from codegemma.eval.lm_eval_cli import PRESETS  # noqa: E402
from codegemma.fileio import write_text_atomic  # noqa: E402
from codegemma.model import GemmaForCausalLM, KVCache  # noqa: E402
from codegemma.tokenizer import Tokenizer  # noqa: E402

log = logging.getLogger(__name__)


CACHE_GRANULE = 256  # KV-cache lengths are rounded up to this, so it is rarely reallocated
LOGIT_FLOATS = 1 << 27  # fp32 logits held at once while scoring (512 MiB)


# -- scoring continuations against a shared, prefilled context -----------------------------


@dataclass
class _Row:
    """One model input of a scoring batch: `tokens` (context + continuation[:-1], truncated) of
    which positions `start`.. need next-token log-probs, and the requests it answers."""

    tokens: list[int]
    start: int
    requests: list[tuple[int, list[int]]] = field(default_factory=list)  # (index, continuation)

    @property
    def prefix(self) -> tuple[int, ...]:
        return tuple(self.tokens[: self.start])

    @property
    def tail(self) -> list[int]:
        return self.tokens[self.start :]


def model_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """What `hf` feeds the model for one request: (context + continuation) left-truncated to
    max_length + 1 tokens, minus the last; its last len(continuation) positions predict it."""
    return (context + continuation)[-(max_length + 1) :][:-1]


class ContinuationScorer:
    """Sums of log-probabilities of continuations, batched over one KV cache (see the module
    docstring); `prefill_tokens` bounds the tokens of one prefill forward."""

    def __init__(self, model: GemmaForCausalLM, *, prefill_tokens: int = 8192) -> None:
        self.model = model.eval()
        self.prefill_tokens = prefill_tokens
        self.device = model.model.embed_tokens.weight.device
        self.cache: KVCache | None = None

    @torch.inference_mode()
    def score(
        self, requests: Sequence[tuple[list[int], list[int]]], max_length: int
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding yields it) per (context,
        continuation) pair, all in one batch: as many cache rows as distinct inputs."""
        rows = self._rows(requests, max_length)
        self._ensure_cache(len(rows), max(len(r.tokens) for r in rows))
        self._prefill_contexts(rows)
        return self._score_tails(rows, len(requests))

    @staticmethod
    def _rows(requests: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[_Row]:
        by_input: dict[tuple[int, ...], _Row] = {}
        for i, (context, continuation) in enumerate(requests):
            tokens = model_input(context, continuation, max_length)
            row = by_input.setdefault(tuple(tokens), _Row(tokens, len(tokens)))
            row.start = min(row.start, len(tokens) - len(continuation))
            row.requests.append((i, continuation))
        # longest tails first: the rows still running in a later tail chunk are rows 0..k-1
        return sorted(by_input.values(), key=lambda r: -len(r.tail))

    def _ensure_cache(self, rows: int, length: int) -> None:
        """A cache of at least `rows` rows and `length` positions (kept, and grown, across
        batches: lm-eval's order puts the longest requests first)."""
        length = min(
            -(-length // CACHE_GRANULE) * CACHE_GRANULE, self.model.config.max_position_embeddings
        )
        old = self.cache
        if old is not None and old.batch_size >= rows and old.max_seq_len >= length:
            return
        if old is not None:
            rows, length = max(rows, old.batch_size), max(length, old.max_seq_len)
        self.cache = None  # the old one is freed before the new one is allocated
        self.cache = self.model.new_cache(rows, length)

    def _prefill_contexts(self, rows: list[_Row]) -> None:
        """Keys and values of every row's prefix (`tokens[:start]`): each distinct prefix is
        computed once, in the row of its first owner, and copied to the other rows."""
        owners: dict[tuple[int, ...], int] = {}
        copies: list[tuple[int, int]] = []  # (destination row, source row)
        for i, row in enumerate(rows):
            if row.start == 0:
                continue
            owner = owners.setdefault(row.prefix, i)
            if owner != i:
                copies.append((i, owner))
        owned = sorted(owners.values(), key=lambda i: -rows[i].start)
        if not owned:
            return
        longest = rows[owned[0]].start
        step = max(1, self.prefill_tokens // len(owned))
        for at in range(0, longest, step):
            active = [i for i in owned if rows[i].start > at]  # longest first: a prefix
            width = min(step, longest - at)
            ids = torch.full((len(active), width), self.model.config.pad_token_id)
            for r, i in enumerate(active):
                piece = rows[i].tokens[at : min(at + width, rows[i].start)]
                ids[r, : len(piece)] = torch.tensor(piece)
            pos = torch.arange(at, at + width).repeat(len(active), 1)
            self.model(
                ids.to(self.device),
                pos.to(self.device),
                self.cache,
                rows=torch.tensor(active, device=self.device),
                logits_index=torch.zeros(len(active), dtype=torch.long, device=self.device),
            )
        if copies:
            dst = torch.tensor([d for d, _ in copies], device=self.device)
            src = torch.tensor([s for _, s in copies], device=self.device)
            length = max(rows[d].start for d, _ in copies)
            for layer in self.cache.layers:
                layer.k[dst, :, :length] = layer.k[src, :, :length]
                layer.v[dst, :, :length] = layer.v[src, :, :length]

    def _score_tails(self, rows: list[_Row], n_requests: int) -> list[tuple[float, bool]]:
        """Run every row's tail against its prefix, in chunks of positions so that no more than
        LOGIT_FLOATS logits exist at once, and score each request on its positions."""
        sums = [0.0] * n_requests
        greedy = [True] * n_requests
        longest = len(rows[0].tail)
        step = max(1, LOGIT_FLOATS // (self.model.config.vocab_size * len(rows)))
        for at in range(0, longest, step):
            active = [r for r in rows if len(r.tail) > at]  # rows 0..k-1 (sorted)
            width = min(step, longest - at)
            ids = torch.empty((len(active), width), dtype=torch.long)
            pos = torch.empty((len(active), width), dtype=torch.long)
            for r, row in enumerate(active):
                # past a row's end, repeat its last token at its last position: the same keys
                # and values are written there twice, and nothing else of the row is touched
                last = len(row.tail) - 1
                js = [min(j, last) for j in range(at, at + width)]
                ids[r] = torch.tensor([row.tail[j] for j in js])
                pos[r] = torch.tensor([row.start + j for j in js])
            logits = self.model(
                ids.to(self.device), pos.to(self.device), self.cache, rows=slice(0, len(active))
            )
            logits = logits.float()  # log p(t) = logit[t] - logsumexp(logits), in fp32
            lse, argmax = torch.logsumexp(logits, dim=-1), logits.argmax(-1)
            for r, row in enumerate(active):
                for index, continuation in row.requests:
                    lp, ok = _chunk_score(
                        logits[r], lse[r], argmax[r], row, continuation, at, width
                    )
                    sums[index] += lp
                    greedy[index] &= ok
        return list(zip(sums, greedy, strict=True))


def _chunk_score(
    logits: torch.Tensor,
    lse: torch.Tensor,
    argmax: torch.Tensor,
    row: _Row,
    continuation: list[int],
    at: int,
    width: int,
) -> tuple[float, bool]:
    """The part of one continuation's score that falls in tail positions at..at+width-1."""
    first = len(row.tail) - len(continuation)  # tail position predicting continuation[0]
    lo, hi = max(first, at), min(len(row.tail), at + width)
    if lo >= hi:
        return 0.0, True
    targets = torch.tensor(continuation[lo - first : hi - first], device=logits.device)
    picked = logits[lo - at : hi - at].gather(-1, targets[:, None])[:, 0] - lse[lo - at : hi - at]
    return float(picked.sum()), bool((argmax[lo - at : hi - at] == targets).all())


# -- text as lm-eval's hf model decodes it --------------------------------------------------


class _HFText:
    """Decoding as transformers does for this checkpoint: the `tokenizers` library over
    tokenizer.json, skipping the tokens that file marks special (CodeGemma's FIM sentinels are
    not marked, so they stay in the text, as in `hf`). A tokenizer.model checkpoint falls back to
    our decoder. The engine sees it through `view()`, so stop strings match the same text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._tk = None
        self.skip = set(tokenizer.special_ids)
        if tokenizer.kind == "tokenizer.json":
            import tokenizers

            self._tk = tokenizers.Tokenizer.from_file(str(tokenizer.path))
            added = self._tk.get_added_tokens_decoder()
            self.skip = {i for i, t in added.items() if t.special}

    def decode(self, ids: Sequence[int]) -> str:
        if self._tk is not None:
            return self._tk.decode(list(ids), skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self.skip])

    def view(self) -> _EngineText:
        return _EngineText(self.tokenizer, frozenset(self.skip))


@dataclass(frozen=True)
class _EngineText:
    """A `TextCodec` for the engine: our tokenizer, skipping only `skip` when asked to."""

    tokenizer: Tokenizer
    skip: frozenset[int]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        return self.tokenizer.encode(text, bos=bos)

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return self.tokenizer.decode([i for i in ids if not (skip_special and i in self.skip)])

    def stream_decoder(self, *, skip_special: bool = False) -> _SkippingDecoder:
        return _SkippingDecoder(self.tokenizer.stream_decoder(), self.skip if skip_special else ())


@dataclass
class _SkippingDecoder:
    inner: Any
    skip: frozenset[int] | tuple

    def push(self, token_id: int) -> str:
        return "" if token_id in self.skip else self.inner.push(token_id)

    def flush(self) -> str:
        return self.inner.flush()


# -- the lm-eval model ----------------------------------------------------------------------


@register_model("codegemma")
class CodeGemmaLM(TemplateLM):
    """lm-eval's model interface over `codegemma.load(...)`.

    pretrained: a checkpoint directory, a model id in the local HF cache, None (the bundled
    model) or a loaded `codegemma.CodeGemma`; dtype: of the forward (float32 by default, so
    scores are exact; log-probabilities are fp32 whatever it is); batch_size: rows per scoring
    forward and generation slots; max_length: the context (default and cap: the model's)."""

    def __init__(
        self,
        pretrained: Any = None,
        dtype: str | torch.dtype | None = "float32",
        device: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        **unused: Any,
    ) -> None:
        super().__init__()
        import codegemma

        if unused:
            log.info("codegemma lm-eval model: ignoring arguments %s", sorted(unused))
        if isinstance(pretrained, codegemma.CodeGemma):
            self.cg = pretrained
        else:
            self.cg = codegemma.load(pretrained, dtype=dtype, device=device)
        if str(batch_size).startswith("auto"):
            raise EvalError(
                "batch_size=auto is not supported by the codegemma model",
                fix="give a number, e.g. --batch-size 8",
            )
        self._batch_size = int(batch_size)
        self.tokenizer = self.cg.tokenizer
        self.add_bos_token = add_bos_token
        limit = self.cg.config.max_position_embeddings
        self._max_length = min(max_length or limit, limit)
        self._max_gen_toks = max_gen_toks
        self._text = _HFText(self.tokenizer)
        self._scorer = ContinuationScorer(self.cg.model)
        self._engine: Engine | None = None

    # -- what lm-eval asks of a model ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._scorer.device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path).replace("/", "__")

    def get_model_info(self) -> dict:
        weight = self.cg.model.model.embed_tokens.weight
        return {
            "model_path": str(self.cg.path),
            "model_dtype": str(weight.dtype),
            "model_num_parameters": sum(p.numel() for p in self.cg.model.parameters()),
        }

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Ids as `hf` makes them for Gemma: BOS first unless asked not to; a string that already
        starts with the BOS text gets the BOS token for it, not a second one."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos_text = self.tokenizer.id_to_token(self.tokenizer.bos_id)
        if add_special_tokens is None and string.startswith(bos_text):
            string, bos = string[len(bos_text) :], True
        ids = self.tokenizer.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        ids = [tokens] if isinstance(tokens, int) else list(tokens)
        return self._text.decode(ids) if skip_special_tokens else self.tokenizer.decode(ids)

    # -- loglikelihood ---------------------------------------------------------------------
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Scores in request order. Requests are ordered by lm-eval's Collator, longest context
        first and each context's continuations together, and cut into batches of at most
        batch_size distinct inputs that keep a context's continuations in one batch."""
        if not requests:
            return []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise EvalError(
                    f"a loglikelihood request has {len(context)} context and "
                    f"{len(continuation)} continuation tokens (context >= 1, "
                    f"1 <= continuation <= {self.max_length})"
                )

        def by_context(req):
            return -len(req[1]), tuple(req[1]), -len(req[2]), tuple(req[2])

        collator = Collator(requests, sort_fn=by_context)
        ordered = next(collator.get_batched(n=len(requests)))
        results: list[tuple[float, bool]] = []
        with tqdm(total=len(ordered), disable=disable_tqdm, desc="loglikelihood") as bar:
            for batch in self._batches(ordered):
                pairs = [(context, continuation) for _, context, continuation in batch]
                scores = self._scorer.score(pairs, self.max_length)
                for (request, _, _), answer in zip(batch, scores, strict=True):
                    if request is not None:  # rolling windows are cached per document
                        self.cache_hook.add_partial("loglikelihood", request, answer)
                results += scores
                bar.update(len(batch))
        return collator.get_original(results)

    def _batches(self, ordered: list) -> Iterator[list]:
        """Consecutive requests, at most batch_size distinct model inputs each; a context's
        continuations (adjacent in `ordered`) are not split unless they alone exceed it."""
        batch: list = []
        inputs: set[tuple[int, ...]] = set()
        i = 0
        while i < len(ordered):
            j = i
            while j < len(ordered) and ordered[j][1] == ordered[i][1]:
                j += 1
            group = ordered[i:j]
            keys = {tuple(model_input(c, x, self.max_length)) for _, c, x in group}
            if batch and len(inputs | keys) > self.batch_size:
                yield batch
                batch, inputs = [], set()
            for request in group:
                key = tuple(model_input(request[1], request[2], self.max_length))
                if key not in inputs and len(inputs) == self.batch_size:
                    yield batch
                    batch, inputs = [], set()
                batch.append(request)
                inputs.add(key)
            i = j
        if batch:
            yield batch

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods over `hf`'s windows: the document's ids (with BOS, as
        `hf` encodes them), predicted from a BOS prefix token, windows of max_length."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (string,) in enumerate(r.args for r in requests):
            for pair in lm_eval.utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                context, continuation = lm_eval.utils.make_disjoint_window(pair)
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores, strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.cg.model, self._text.view(), max_batch_size=self.batch_size)
        return self._engine

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Completions in request order. Requests with the same generation kwargs go to the
        engine together (lm-eval's Collator groups and orders them, longest prompt first)."""
        collator = Collator(
            [r.args for r in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        texts: list[str] = []
        for chunk in collator.get_batched(n=len(requests)):  # one chunk per kwargs group
            contexts = [context for context, _ in chunk]
            gen_kwargs = chunk[0][1]
            params, until, max_context = self._sampling(gen_kwargs)
            prompts = [self.tok_encode(c, left_truncate_len=max_context) for c in contexts]
            results = self.engine.generate(prompts, params, progress=not disable_tqdm)
            for context, result in zip(contexts, results, strict=True):
                text = postprocess_generated_text(
                    self._text.decode(result.token_ids), until, think_end_token=None
                )
                texts.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return collator.get_original(texts)

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str], int]:
        """SamplingParams, stop strings and the longest prompt for one request's kwargs, read
        as `hf` reads them (max_gen_toks and its aliases, do_sample, temperature, top_p...)."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        options = {
            key: kwargs.pop(key)
            for key in ("top_p", "top_k", "repetition_penalty", "seed")
            if key in kwargs
        }
        if kwargs:
            raise EvalError(
                f"generation kwargs {sorted(kwargs)} are not supported by the codegemma model",
                fix="supported: until, max_gen_toks (or an alias), do_sample, temperature, "
                "top_p, top_k, repetition_penalty, seed",
            )
        if max_gen >= self.max_length:
            raise EvalError(
                f"max_gen_toks {max_gen} leaves no room for a prompt in the model's "
                f"{self.max_length}-token context"
            )
        params = SamplingParams(
            max_new_tokens=max_gen,
            temperature=temperature if do_sample else 0.0,
            stop_strings=tuple(s for s in until if s),
            stop_token_ids=self._stop_ids(),
            **options,
        )
        return params, until, self.max_length - max_gen

    def _stop_ids(self) -> frozenset[int]:
        """eos, and every eos id of the checkpoint's generation_config.json (transformers'
        `generate` stops at those: e.g. <end_of_turn> for instruction-tuned checkpoints)."""
        ids = {self.tokenizer.eos_id}
        config = self.cg.path / "generation_config.json" if self.cg.path else None
        if config is not None and config.is_file():
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
            ids |= set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()
        return frozenset(ids)


# -- running lm-eval -------------------------------------------------------------------------


@dataclass
class LmEvalRun:
    """What `run_lm_eval` produced: lm-eval's results (without the per-sample records), the
    summary table, and where both were written."""

    results: dict
    table: str
    out_dir: Path


def expand_tasks(tasks: str | Sequence[str]) -> dict[str, int | None]:
    """Task names (comma-separated or a list; a preset name expands to its tasks) -> the
    preset's shots per task, None where the task's own default applies."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: dict[str, int | None] = {}
    for name in (n.strip() for n in names):
        if name in PRESETS:
            out.update(PRESETS[name])
        elif name:
            out.setdefault(name, None)
    if not out:
        raise EvalError("no lm-eval task given", fix="e.g. --tasks card or --tasks boolq,piqa")
    return out


def run_lm_eval(
    model: Any,
    tasks: str | Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    dtype: str | None = "float32",
    device: str | None = None,
    bootstrap_iters: int = 100_000,
) -> LmEvalRun:
    """Evaluate `model` (a checkpoint path or HF-cache id, None for the bundled model, a loaded
    CodeGemma, or a CodeGemmaLM) on lm-eval tasks and write results.json (lm-eval's results),
    samples_<task>.jsonl (every request and response) and summary.md (the table) to out_dir.

    num_fewshot overrides every task's shots (else the preset's, else the task's own); limit
    takes the first N documents per task (a fraction < 1: that share). Offline: a task whose data
    set is neither in the HF datasets cache nor on disk raises EvalError before any model runs."""
    shots = expand_tasks(tasks)
    manager = _task_manager(list(shots), include_path)
    loaded = [_load_task(manager, name) for name in shots]
    if num_fewshot is None:
        for name, task in zip(shots, loaded, strict=True):
            if shots[name] is not None:
                for leaf in _leaves(task):
                    leaf.set_config(key="num_fewshot", value=shots[name])
    lm = model if isinstance(model, CodeGemmaLM) else CodeGemmaLM(model, dtype, device, batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[item for task in loaded for item in (task if isinstance(task, list) else [task])],
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=True,
    )
    return _write_results(results, Path(out_dir))


def _task_manager(names: list[str], include_path: str | os.PathLike | None) -> TaskManager:
    """lm-eval's task index: the include path alone when it defines every task asked for
    (indexing lm-eval's own tasks takes seconds), else lm-eval's tasks plus the include path."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EvalError(f"--include-path {include_path} is not a directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        import difflib

        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        raise EvalError(
            f"unknown lm-eval task(s): {', '.join(unknown)}"
            + "".join(f"; {n}: did you mean {', '.join(h)}?" for n, h in hints.items() if h),
            fix=f"presets: {', '.join(PRESETS)}; `lm_eval ls tasks` lists every task; your own "
            "task YAML files go in a directory given with --include-path",
        )
    return manager


def _load_task(manager: TaskManager, name: str) -> Task | Group | list[Task]:
    """The task (or group, or a tag's tasks) `name`, its data set loaded offline."""
    try:
        loaded = manager.load([name])
    except OSError as e:  # datasets: ConnectionError (offline), FileNotFoundError
        failing = _failing_task(e)
        if failing is None:
            raise
        raise _missing_data(name, failing, e) from e
    if name in loaded["groups"]:
        return loaded["groups"][name]
    tasks = list(loaded["tasks"].values())
    return tasks[0] if len(tasks) == 1 and tasks[0].task_name == name else tasks


def _failing_task(error: BaseException) -> Task | None:
    """The lm-eval task whose data set loading raised `error`: the task of the innermost
    `download` frame in the traceback (lm-eval loads a task's data set there)."""
    found, tb = None, error.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "download" and isinstance(obj, Task):
            found = obj
        tb = tb.tb_next
    return found


def _missing_data(name: str, task: Task, error: BaseException) -> EvalError:
    config = task.config
    path, subset = config.dataset_path, config.dataset_name
    data_files = (config.dataset_kwargs or {}).get("data_files")
    where = f"{name}" + (f" (its task {config.task})" if config.task != name else "")
    if data_files:
        return EvalError(
            f"lm-eval task {where}: its data files {data_files} cannot be read: {error}",
            fix="relative data_files are resolved from the working directory; give paths that "
            "exist there, or absolute ones, in the task YAML",
        )
    dataset = path + (f" (config {subset})" if subset else "")
    return EvalError(
        f"lm-eval task {where} needs the Hugging Face data set {dataset}, which is not in the "
        f"local datasets cache ({_datasets_cache()}); nothing is downloaded at evaluation time",
        fix=f'on a machine with network access run: python -c "import datasets; '
        f"datasets.load_dataset('{path}'{f', {subset!r}' if subset else ''})\" and copy its "
        "HF_HOME (~/.cache/huggingface) here, or point HF_HOME / HF_DATASETS_CACHE at a copy",
    )


def _datasets_cache() -> str:
    import datasets.config

    return str(datasets.config.HF_DATASETS_CACHE)


def _leaves(task: Task | Group | list[Task]) -> list[Task]:
    if isinstance(task, Group):
        return task.get_all_tasks()
    return task if isinstance(task, list) else [task]


def _write_results(results: dict, out_dir: Path) -> LmEvalRun:
    from lm_eval.utils import handle_non_serializable, make_table

    samples = results.pop("samples", {})
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    out_dir.mkdir(parents=True, exist_ok=True)
    for task_name, records in samples.items():
        lines = (json.dumps(r, default=handle_non_serializable) + "\n" for r in records)
        write_text_atomic(out_dir / f"samples_{task_name}.jsonl", "".join(lines))
    text = json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
    write_text_atomic(out_dir / "results.json", text)
    write_text_atomic(out_dir / "summary.md", table)
    return LmEvalRun(results=results, table=table, out_dir=out_dir)


# -- command line ----------------------------------------------------------------------------
