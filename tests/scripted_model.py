"""A model whose output the test decides: `ScriptedModel(script)` emits `script` token by token
after any prompt (one-hot logits), so the engine, the completion API and the server can be tested
on exactly the text "the model" writes."""

from __future__ import annotations

import torch
from torch import nn

from codegemma.config import ModelConfig
from codegemma.model import KVCache


class ScriptedModel(nn.Module):
    """Emits `script` token by token after the prompt (one-hot logits), whatever the prompt."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.config = ModelConfig.preset("tiny")
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(self.config.vocab_size, 4)
        self.script = script
        self.prompt_len = 0

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_seq_len, torch.float32)

    def forward(self, ids, input_pos, cache=None, rows=None, logits_index=None):
        if logits_index is not None:  # prefill: remember where the prompt ends
            self.prompt_len = int(logits_index.max()) + 1
            pos = logits_index[:, None]
        else:
            pos = input_pos
        step = (pos - self.prompt_len + 1).clamp(0, len(self.script) - 1)
        return nn.functional.one_hot(
            torch.tensor(self.script)[step], self.config.vocab_size
        ).float()
