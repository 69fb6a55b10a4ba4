"""SFT data for the instruction variant: chat JSONL -> padded token rows with a loss mask.

Each JSONL line is `{"messages": [{"role": "user"|"model"|"assistant"|"system", "content": ...},
...]}`. A conversation is laid out by `prompts.chat_example` (the 7B-IT template, a leading system
message folded into the first user turn), which marks the model's reply tokens and their
`<end_of_turn>` as the only tokens to learn. Key choice: one conversation per row, right-padded
with pad tokens that are never learned; conversations are not packed together, because without
per-document attention masks a packed row would let one conversation attend to another. A
conversation longer than seq_len is cut; one whose cut leaves no reply token to learn is dropped
(both counted in `SFTStats`).

    rows = sft_rows(tok, load_chat_jsonl("chat.jsonl"), seq_len=1024)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codegemma.errors import SFTDataError
from codegemma.prompts import PromptError, chat_example, fold_system
from codegemma.tokenizer import Tokenizer


@dataclass(frozen=True, kw_only=True)
class SFTStats:
    conversations: int
    rows: int
    truncated: int  # cut to seq_len, still with reply tokens to learn
    dropped: int  # cut so short that no reply token was left
    loss_tokens: int  # target positions the loss is computed on


@dataclass(frozen=True, kw_only=True)
class SFTRows:
    ids: np.ndarray  # [N, seq_len] int32, right-padded with the pad id
    loss_mask: np.ndarray  # [N, seq_len] bool: token t is a learned target (never t = 0)
    stats: SFTStats


def load_chat_jsonl(path: str | os.PathLike) -> list[list[dict[str, Any]]]:
    """The `messages` lists of a JSONL file, checked line by line."""
    p = Path(path)
    if not p.is_file():
        raise SFTDataError(f'SFT data {p} not found: give a JSONL file of {{"messages": [...]}}')
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{p}:{n}: not valid JSON ({e})") from e
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise SFTDataError(
                    f'{p}:{n}: each line must be an object with a "messages" list of '
                    f'{{"role", "content"}} objects'
                )
            out.append(messages)
    if not out:
        raise SFTDataError(f"{p} holds no conversations")
    return out


def conversation_row(
    tok: Tokenizer, messages: Sequence[Mapping[str, Any]], seq_len: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids [seq_len], loss_mask [seq_len], truncated) of one conversation."""
    ids, mask = chat_example(tok, fold_system(messages))
    truncated = len(ids) > seq_len
    ids, mask = ids[:seq_len], mask[:seq_len]
    pad = seq_len - len(ids)
    row = np.asarray(ids + [tok.special.pad] * pad, dtype=np.int32)
    learn = np.asarray(mask + [False] * pad, dtype=bool)
    learn[0] = False  # the first token is never a target (nothing precedes it)
    return row, learn, truncated


def sft_rows(
    tok: Tokenizer, conversations: Iterable[Sequence[Mapping[str, Any]]], seq_len: int
) -> SFTRows:
    rows, masks = [], []
    n = truncated = dropped = 0
    for i, messages in enumerate(conversations):
        n += 1
        try:
            row, learn, cut = conversation_row(tok, messages, seq_len)
        except PromptError as e:
            raise SFTDataError(f"conversation {i}: {e}") from e
        if not learn.any():
            dropped += 1
            continue
        truncated += cut
        rows.append(row)
        masks.append(learn)
    if not rows:
        raise SFTDataError(
            f"no conversation has a model reply within seq_len={seq_len} tokens; raise seq_len"
        )
    ids, loss_mask = np.stack(rows), np.stack(masks)
    stats = SFTStats(
        conversations=n,
        rows=len(rows),
        truncated=truncated,
        dropped=dropped,
        loss_tokens=int(loss_mask.sum()),
    )
    return SFTRows(ids=ids, loss_mask=loss_mask, stats=stats)
