"""`codegemma.load()`: one object holding config, model, tokenizer and a generation engine.

    import codegemma
    cg = codegemma.load("path/to/codegemma-2b")          # or "google/codegemma-2b" from the HF cache
    cg.complete("def add(a, b):\\n    return ", "\\n")   # -> "a + b"
    cg.model(input_ids)                                   # logits [B, T, vocab]

With no path, the model bundled with the package (src/codegemma/assets/) is loaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from codegemma import completion, prompts
from codegemma.checkpoint import load_checkpoint, parse_dtype, resolve_model
from codegemma.config import ModelConfig
from codegemma.engine import Engine, GenerationResult, SamplingParams
from codegemma.errors import CheckpointError
from codegemma.middle import FimRequest, ReplyGuard
from codegemma.model import GemmaForCausalLM
from codegemma.prompts import ContextFile
from codegemma.quant import quantize_model
from codegemma.tokenizer import Tokenizer

BUNDLED_MODEL = Path(__file__).parent / "assets" / "codegemma-tiny"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class CodeGemma:
    config: ModelConfig
    model: GemmaForCausalLM
    tokenizer: Tokenizer
    path: Path | None = None
    max_batch_size: int = 8
    _engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch_size=self.max_batch_size)
        return self._engine

    # -- FIM completion (middle only) ------------------------------------------------------
    def complete(
        self,
        prefix: str,
        suffix: str = "",
        *,
        path: str | None = None,
        files: Sequence[ContextFile | Mapping] = (),
        mode: str = "auto",
        fim_mode: str = "psm",
        **options,
    ) -> str:
        """The middle between `prefix` and `suffix`. mode: auto | line | block; fim_mode: the
        prompt layout, psm (CodeGemma's documented one) or spm; options: max_new_tokens,
        temperature, top_p, top_k, repetition_penalty, presence_penalty, frequency_penalty,
        seed, stop (extra stop strings)."""
        request = dict(
            prefix=prefix, suffix=suffix, path=path, files=files, mode=mode, fim_mode=fim_mode
        )
        return self.complete_batch([request], **options)[0]

    def complete_batch(self, requests: Sequence[Mapping | FimRequest], **options) -> list[str]:
        reqs = [
            r
            if isinstance(r, FimRequest)
            else FimRequest(**{**r, "files": tuple(r.get("files", ()))})
            for r in requests
        ]
        return completion.complete_batch(self.engine, self.tokenizer, reqs, **options)

    # -- plain continuation ----------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], **options) -> str:
        """Text continuing `prompt` (a string gets BOS prepended; ids are used as given)."""
        return self.generate_batch([prompt], **options)[0]

    def generate_batch(
        self,
        prompts_: Sequence[str | Sequence[int]],
        *,
        stop: Sequence[str] = (),
        progress: bool = False,
        **options,
    ) -> list[str]:
        return [
            r.text for r in self.generate_results(prompts_, stop=stop, progress=progress, **options)
        ]

    def generate_results(
        self,
        prompts_: Sequence[str | Sequence[int]],
        *,
        stop: Sequence[str] = (),
        progress: bool = False,
        **options,
    ) -> list[GenerationResult]:
        ids = [
            self.tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts_
        ]
        stop_ids = options.pop("stop_token_ids", prompts.fim_stop_ids(self.tokenizer))
        params = SamplingParams(stop_strings=tuple(stop), stop_token_ids=stop_ids, **options)
        return self.engine.generate(ids, params, progress=progress)

    # -- chat (instruction-tuned checkpoints) ----------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, str]], **options) -> str:
        """The model's reply, without a repetition loop (generation stops once one is found)."""
        ids = prompts.chat_prompt(self.tokenizer, prompts.fold_system(list(messages)))
        params = SamplingParams(stop_token_ids=prompts.chat_stop_ids(self.tokenizer), **options)
        guard, reply = ReplyGuard(), ""
        with contextlib.closing(self.engine.stream(ids, params)) as events:
            for event in events:
                if event.result is None:
                    reply += guard.push(event.delta)
                else:
                    exhausted = event.result.finish_reason == "length"
                    reply += guard.finish(event.delta, exhausted=exhausted)
                if guard.looping:
                    break  # the rest would be cut; closing the stream frees the slot
        return reply


def load(
    path_or_id: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    *,
    max_batch_size: int = 8,
    quantize: str | None = None,
) -> CodeGemma:
    """Load a Hugging Face Gemma checkpoint directory, a model id from the local HF cache, a GGUF
    file, an Ollama model (`ollama:codegemma:2b`), or (no argument) the bundled model. Never
    touches the network.

    quantize="q8_0" or "q4_0" quantizes every float matrix at load (ggml's block formats,
    quant.py; computing in `dtype`); a GGUF's quantized tensors stay as they are."""
    if path_or_id is None:
        if not (BUNDLED_MODEL / "config.json").is_file():
            raise CheckpointError(
                f"no model given and the bundled model is missing at {BUNDLED_MODEL}",
                fix="pass a model directory (--model DIR), or build the bundled model: make model",
            )
        path_or_id = BUNDLED_MODEL
    path = resolve_model(path_or_id)
    device = device or default_device()
    # quantizing reads the float weights on the CPU (where they are memory-mapped) first
    model, config, tokenizer = load_checkpoint(
        path, dtype=parse_dtype(dtype), device="cpu" if quantize else device
    )
    if quantize:
        model = quantize_model(model, quantize).to(device)
    return CodeGemma(
        config=config,
        model=model.eval(),
        tokenizer=tokenizer,
        path=path,
        max_batch_size=max_batch_size,
    )
