"""The card's natural-language and math benchmarks through EleutherAI's lm-evaluation-harness.

BoolQ, PIQA, TriviaQA, ARC-Challenge, HellaSwag, MMLU, WinoGrande, GSM8K and MATH are run with
lm-eval's own task definitions, prompts, few-shot sampling, answer extraction and metrics; what
this module adds is our model underneath, as the lm-eval model `codegemma`:

    run_lm_eval("path/to/codegemma-7b", ["card"], out_dir="runs/7b-card")   # or, from the shell:
    codegemma eval lm-eval --model path/to/codegemma-7b --tasks card --out runs/7b-card
    lm_eval --model codegemma --model_args pretrained=path/to/codegemma-7b --tasks boolq

`CodeGemmaLM` answers lm-eval's three request kinds the way lm-eval's `hf` model does (the same
tokens in, the same numbers out; tests/eval/test_lm_harness.py checks it against `hf`):
- `loglikelihood`: BOS + context + continuation, left-truncated to the context length. All of a
  call's requests are sorted by model input and packed as token trees into rows: the prefix
  two inputs share (a question's context under its choices, a task's few-shot examples under
  its questions, the whole of two equal inputs) is one set of nodes, a node at depth d sits at
  position d and attends to its ancestors, and a row holds many questions. Rows run in few,
  large forwards (a mask for tree rows; plain causal attention for rows of one sequence, such
  as rolling windows); only the positions that predict continuation tokens go through the
  output head, each once, and get fp32 log-probabilities.
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
from codegemma.model import GemmaForCausalLM  # noqa: E402
from codegemma.tokenizer import Tokenizer  # noqa: E402

log = logging.getLogger(__name__)


LOGIT_FLOATS = 1 << 27  # fp32 logits held at once while scoring (512 MiB)
ATTENTION_FLOATS = 1 << 27  # attention scores of one forward over tree-masked rows (512 MiB)


# -- scoring continuations: the requests as token trees in packed rows ------------------------


def model_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """What `hf` feeds the model for one request: (context + continuation) left-truncated to
    max_length + 1 tokens, minus the last; its last len(continuation) positions predict it."""
    return (context + continuation)[-(max_length + 1) :][:-1]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """len of the longest common prefix of two token lists (a binary search over slice
    comparisons, which run in C: no Python loop over tokens)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


Nodes = list[tuple[int, int]]  # node indices of a row, as half-open intervals


def _first(nodes: Nodes, n: int) -> Nodes:
    out = []
    for a, b in nodes:
        if n <= 0:
            break
        out.append((a, min(b, a + n)))
        n -= b - a
    return out


def _last(nodes: Nodes, n: int) -> list[int]:
    flat: list[int] = []
    for a, b in reversed(nodes):
        flat[:0] = range(max(a, b - (n - len(flat))), b)
        if len(flat) == n:
            break
    return flat


@dataclass
class _Row:
    """One model row holding a token tree. Each input added keeps the nodes it shares with the
    previous input (their longest common prefix: inputs arrive sorted, so that is the most it
    shares with any input of the row) and appends the rest as a block of new nodes. A node at
    depth d has position d and attends to its ancestors and itself."""

    tokens: list[int] = field(default_factory=list)
    blocks: list[tuple[int, int, int, Nodes]] = field(default_factory=list)  # nodes a..b-1
    # at positions p.., and the earlier nodes they see
    last: list[int] | None = None  # the input added last
    path: Nodes = field(default_factory=list)  # and its nodes
    chain: bool = True  # one sequence (each block continues the one before): causal attention

    def add(self, tokens: list[int], shared: int) -> Nodes:
        """Append `tokens`, sharing its first `shared` nodes with the last input; its nodes."""
        a, b = len(self.tokens), len(self.tokens) + len(tokens) - shared
        seen = _first(self.path, shared)
        if b > a:
            self.chain &= shared == a
            self.blocks.append((a, b, shared, seen))
            self.tokens += tokens[shared:]
        self.last, self.path = tokens, seen + [(a, b)] if b > a else seen
        return self.path

    def positions(self, width: int) -> torch.Tensor:
        pos = torch.zeros(width, dtype=torch.long)
        for a, b, p, _ in self.blocks:
            pos[a:b] = torch.arange(p, p + b - a)
        return pos

    def mask(self, width: int) -> torch.Tensor:
        """[width, width] bool: node i sees node j iff j is i or an ancestor of i; padding
        sees itself only (so that no attention row is empty)."""
        mask = torch.eye(width, dtype=torch.bool)
        for a, b, _, seen in self.blocks:
            mask[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
            for x, y in seen:
                mask[a:b, x:y] = True
        return mask


@dataclass
class _Placed:
    """Where a request's input went: its row and the nodes predicting its continuation."""

    row: int
    scored: list[int]


def plan_rows(
    inputs: Sequence[list[int]], scored: Sequence[int], row_tokens: int
) -> tuple[list[_Row], list[_Placed]]:
    """Rows for all inputs (the last scored[i] nodes of input i get log-probabilities). Inputs
    go in sorted order into the current row while it stays within row_tokens nodes, or, when
    an input shares at least half its tokens with the row's last one (the choices of one
    question), within row_tokens + the longest input; else a new row starts. So long unrelated
    inputs (rolling windows) get rows of their own, which run with plain causal attention."""
    width = row_tokens + max(len(t) for t in inputs)
    rows: list[_Row] = []
    placed: list[_Placed | None] = [None] * len(inputs)
    for i in sorted(range(len(inputs)), key=inputs.__getitem__):
        tokens, shared = inputs[i], 0
        if rows:
            shared = common_prefix(tokens, rows[-1].last)
            total = len(rows[-1].tokens) + len(tokens) - shared
            if not (total <= row_tokens or (2 * shared >= len(tokens) and total <= width)):
                shared = 0
                rows.append(_Row())
        else:
            rows.append(_Row())
        placed[i] = _Placed(len(rows) - 1, _last(rows[-1].add(tokens, shared), scored[i]))
    return rows, placed  # type: ignore[return-value]


class ContinuationScorer:
    """Sums of log-probabilities of continuations (see the module docstring).

    `plan_rows` packs the requests' inputs into rows of token trees (a question's context once
    for all its choices, a task's few-shot examples once per row, equal inputs once); rows go
    longest first into forwards of at most `rows` rows and `batch_tokens` tokens, rows of one
    sequence (plain causal attention) apart from tree rows (a mask, its scores bounded by
    ATTENTION_FLOATS). Only the hidden states of the nodes that predict continuation tokens go
    through the final norm and the output head, each once; its fp32 logits give log p(t) =
    logit[t] - logsumexp(logits)."""

    def __init__(
        self,
        model: GemmaForCausalLM,
        *,
        rows: int = 8,
        row_tokens: int | None = None,
        batch_tokens: int = 8192,
    ) -> None:
        self.model = model.eval()
        self.rows, self.batch_tokens = rows, batch_tokens
        self.row_tokens = row_tokens or default_row_tokens(model.config)
        self.device = model.model.embed_tokens.weight.device

    def score(
        self, requests: Sequence[tuple[list[int], list[int]]], max_length: int
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding yields it) per (context,
        continuation) pair, in order."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for answers in self.iter_scores(requests, max_length):
            for index, answer in answers:
                out[index] = answer
        return out

    def iter_scores(
        self, requests: Sequence[tuple[list[int], list[int]]], max_length: int
    ) -> Iterator[list[tuple[int, tuple[float, bool]]]]:
        """The answers of each forward as it is run: [(request index, answer)]."""
        if not requests:
            return
        inputs = [model_input(c, x, max_length) for c, x in requests]
        rows, placed = plan_rows(inputs, [len(x) for _, x in requests], self.row_tokens)
        owners: list[list[int]] = [[] for _ in rows]
        for index, where in enumerate(placed):
            owners[where.row].append(index)
        for forward in self._forwards(rows):
            answers = [(i, placed[i].scored, requests[i][1]) for r in forward for i in owners[r]]
            yield self._run([rows[r] for r in forward], [owners[r] for r in forward], answers)

    def _forwards(self, rows: list[_Row]) -> Iterator[list[int]]:
        """Row indices per forward: longest rows first, one-sequence rows apart from trees."""
        heads = self.model.config.num_attention_heads
        for chain in (True, False):
            group = sorted(
                (r for r in range(len(rows)) if rows[r].chain == chain),
                key=lambda r: -len(rows[r].tokens),
            )
            forward: list[int] = []
            for r in group:
                width, n = len(rows[forward[0]].tokens) if forward else 0, len(forward) + 1
                if forward and (
                    n > self.rows
                    or n * width > self.batch_tokens
                    or (not chain and n * heads * width * width > ATTENTION_FLOATS)
                ):
                    yield forward
                    forward = []
                forward.append(r)
            if forward:
                yield forward

    @torch.inference_mode()
    def _run(
        self, rows: list[_Row], owners: list[list[int]], answers: list
    ) -> list[tuple[int, tuple[float, bool]]]:
        width = max(len(row.tokens) for row in rows)
        ids = torch.full((len(rows), width), self.model.config.pad_token_id)
        for r, row in enumerate(rows):
            ids[r, : len(row.tokens)] = torch.tensor(row.tokens)
        pos = torch.stack([row.positions(width) for row in rows])
        mask = None  # rows of one sequence: causal (padding after it attends, unread)
        if not all(row.chain for row in rows):
            mask = torch.stack([row.mask(width) for row in rows])[:, None].to(self.device)
        hidden = self.model.hidden_states(
            ids.to(self.device), pos.to(self.device), attention_mask=mask
        )
        row_of = {i: r for r, indices in enumerate(owners) for i in indices}
        # the scored nodes, each once, and each (request, continuation token) pointing at one
        nodes = [row_of[i] * width + n for i, scored, _ in answers for n in scored]
        targets = torch.tensor([t for _, _, x in answers for t in x], device=self.device)
        owner = torch.tensor([k for k, (_, s, _) in enumerate(answers) for _ in s])
        unique, which = torch.tensor(nodes).unique(return_inverse=True)
        unique, which, owner = (t.to(self.device) for t in (unique, which, owner))
        picked = torch.empty(len(nodes), device=self.device)
        lse = torch.empty(len(unique), device=self.device)
        argmax = torch.empty(len(unique), dtype=torch.long, device=self.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        step = max(1, LOGIT_FLOATS // self.model.config.vocab_size)
        for lo in range(0, len(unique), step):
            hi = min(lo + step, len(unique))
            logits = self.model.output_head(hidden[unique[lo:hi]]).float()
            lse[lo:hi], argmax[lo:hi] = torch.logsumexp(logits, -1), logits.argmax(-1)
            here = ((which >= lo) & (which < hi)).nonzero()[:, 0]
            picked[here] = logits[which[here] - lo, targets[here]]
        misses = (argmax[which] != targets).float()
        sums = torch.zeros(len(answers), device=self.device).index_add_(
            0, owner, picked - lse[which]
        )
        wrong = torch.zeros(len(answers), device=self.device).index_add_(0, owner, misses)
        return [
            (i, (total, bad == 0))
            for (i, _, _), total, bad in zip(answers, sums.tolist(), wrong.tolist(), strict=True)
        ]


def default_row_tokens(config) -> int:
    """Tree nodes per row: a row's attention is computed densely, so rows are kept short enough
    that it costs at most about a quarter of the rest of a layer (per token: the projections
    and the MLP, against 4 * query width flops per node of the row), between 64 and 2048."""
    q, kv = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    d = config.hidden_size
    dense = 2 * d * (2 * q + 2 * kv) + 6 * d * config.intermediate_size
    return max(64, min(2048, dense // (16 * q)))


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
        self._scorer = ContinuationScorer(self.cg.model, rows=self._batch_size)
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
        """Scores in request order. All of them go to the scorer at once: it sorts them by
        their model input (so shared prefixes are neighbours, where `hf` sorts longest first)
        and packs them into forwards of at most batch_size rows; each forward's answers are
        cached (lm-eval's cache hook) as it finishes."""
        if not requests:
            return []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise EvalError(
                    f"a loglikelihood request has {len(context)} context and "
                    f"{len(continuation)} continuation tokens (context >= 1, "
                    f"1 <= continuation <= {self.max_length})"
                )
        pairs = [(context, continuation) for _, context, continuation in requests]
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for answers in self._scorer.iter_scores(pairs, self.max_length):
                for index, answer in answers:
                    results[index] = answer
                    if requests[index][0] is not None:  # rolling windows: cached per document
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                bar.update(len(answers))
        return results

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
