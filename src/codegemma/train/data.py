"""Training data: row sources, a deterministic sample order, and per-rank micro-batches.

A source is a list of fixed-length rows, each with a loss mask over its tokens (pretraining:
every token after the first; SFT: the model's reply tokens). Inputs are a row's first T-1 tokens,
targets the row shifted by one, and a target whose mask is False is ignored (-100).

Key choice: the order is a pure function. Epoch e visits the rows in the permutation drawn from
`numpy.random.default_rng([seed, e])`, and the run consumes that stream of samples in order, so
global sample k is `perm(k // N)[k % N]`. The only data state is the number of samples consumed,
saved in every checkpoint, and a resumed run continues at exactly the next sample. The samples of
one optimizer step are laid out as [micro-step][rank][row]: rank r's micro-batch m holds samples
`base + (m * world + r) * B + j`, so each rank reads only its own slice, and one process with
`grad_accum = A * world` sees exactly the same global batch as `world` processes with A.

Repository masking (`bos_id` given, TrainConfig.repo_mask): a pretraining row holds
`<bos> repository sample <eos>` runs back to back, so each `<bos>` starts a new segment. The
batch then carries per-row segment ids and positions that restart at every segment, the model
attends within segments only, and a target that is a `<bos>` is ignored (it would be predicted
from the previous repository). A batch whose rows are each one segment carries neither, and the
model runs its plain causal path: bit for bit what it computes without repository masking.

    loader = Loader(source, seed=0, micro_batch_size=8, world_size=2, rank=1, bos_id=2)
    batch = loader.micro_batch(samples_seen=0, micro_step=0)   # .inputs, .targets [B, T-1]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from codegemma.data.shards import open_shards
from codegemma.errors import TrainDataError
from codegemma.tokenizer import Tokenizer
from codegemma.train.sft import load_chat_jsonl, sft_rows

IGNORE = -100  # cross_entropy's ignore_index


class RowSource(Protocol):
    seq_len: int

    def __len__(self) -> int: ...

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids [seq_len], loss mask [seq_len] or None for "every token after the first")."""
        ...


class ShardSource:
    """Rows of a prepared token-shard directory (pretraining), read through memmaps."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        expect_tokenizer: str | None = None,
        expect_seq_len: int | None = None,
    ) -> None:
        self.shards = open_shards(
            directory, expect_tokenizer=expect_tokenizer, expect_seq_len=expect_seq_len
        )
        self.seq_len = self.shards.seq_len
        self.vocab_size = int(self.shards.manifest["tokenizer"].get("vocab_size", 0))

    def __len__(self) -> int:
        return len(self.shards)

    def row(self, i: int) -> tuple[np.ndarray, None]:
        return np.asarray(self.shards[i]), None


class ArraySource:
    """Rows held in memory (SFT conversations), with their loss masks."""

    def __init__(self, ids: np.ndarray, loss_mask: np.ndarray) -> None:
        if ids.shape != loss_mask.shape or ids.ndim != 2:
            raise TrainDataError(f"ids {ids.shape} and loss_mask {loss_mask.shape} must be [N, T]")
        self.ids, self.loss_mask = ids, loss_mask
        self.seq_len = ids.shape[1]

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[i], self.loss_mask[i]


class Subset:
    """Rows [start, stop) of another source (how a held-out tail is split off)."""

    def __init__(self, source: RowSource, start: int, stop: int) -> None:
        self.source, self.start, self.n = source, start, stop - start
        self.seq_len = source.seq_len

    def __len__(self) -> int:
        return self.n

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.source.row(self.start + i)


def open_source(
    task: str, path: str | os.PathLike, tok: Tokenizer, seq_len: int | None
) -> RowSource:
    """Pretraining shards (checked against the tokenizer) or SFT chat JSONL (tokenized now)."""
    if task == "pretrain":
        if not Path(path).is_dir():
            raise TrainDataError(
                f"pretraining data {path} is not a directory: give the output of "
                f'`codegemma data prepare` (or set task = "sft" for chat JSONL)'
            )
        return ShardSource(path, expect_tokenizer=tok.fingerprint, expect_seq_len=seq_len)
    assert seq_len is not None  # TrainConfig requires seq_len for sft
    rows = sft_rows(tok, load_chat_jsonl(path), seq_len)
    return ArraySource(rows.ids, rows.loss_mask)


def split_holdout(source: RowSource, holdout: int) -> tuple[RowSource, RowSource]:
    if holdout >= len(source):
        raise TrainDataError(
            f"eval_holdout={holdout} leaves no training data ({len(source)} sequences); "
            f"lower it or give eval_data"
        )
    n = len(source) - holdout
    return Subset(source, 0, n), Subset(source, n, len(source))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True, kw_only=True)
class MicroBatch:
    inputs: Tensor  # [B, T-1] int64
    targets: Tensor  # [B, T-1] int64, IGNORE where no loss
    # repository masking, only when some row holds several segments: [B, T-1] int64 each
    segment_ids: Tensor | None = None
    positions: Tensor | None = None

    @property
    def loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def repository_segments(inputs: Tensor, bos_id: int) -> tuple[Tensor, Tensor]:
    """(segment ids, positions), both [B, T], of packed rows `inputs` [B, T].

    Every `<bos>` starts a new segment and position 0; tokens before a row's first `<bos>` (a
    repository continued from the previous row) form segment 0, counted from the row's start."""
    starts = inputs == bos_id
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    last_start = torch.where(starts, index, 0).cummax(dim=1).values
    return starts.cumsum(dim=1), index - last_start


def collate(
    rows: list[tuple[np.ndarray, np.ndarray | None]], bos_id: int | None = None
) -> MicroBatch:
    """A micro-batch of rows; with `bos_id`, repository-masked (see the module docstring)."""
    ids = torch.from_numpy(np.stack([np.asarray(r, dtype=np.int64) for r, _ in rows]))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].clone()
    for b, (_, mask) in enumerate(rows):
        if mask is not None:
            targets[b, ~torch.from_numpy(np.asarray(mask[1:], dtype=bool))] = IGNORE
    if bos_id is None:
        return MicroBatch(inputs=inputs, targets=targets)
    targets[targets == bos_id] = IGNORE
    if not bool((inputs[:, 1:] == bos_id).any()):  # every row is one segment: plain causal
        return MicroBatch(inputs=inputs, targets=targets)
    segment_ids, positions = repository_segments(inputs, bos_id)
    return MicroBatch(inputs=inputs, targets=targets, segment_ids=segment_ids, positions=positions)


class Loader:
    """This rank's micro-batches of the deterministic sample stream (see the module docstring)."""

    def __init__(
        self,
        source: RowSource,
        *,
        seed: int,
        micro_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        bos_id: int | None = None,
    ) -> None:
        if len(source) == 0:
            raise TrainDataError(
                "the training data has no sequences",
                fix="check the data path, or prepare data with at least one row "
                "(codegemma data prepare)",
            )
        self.source, self.seed, self.batch = source, seed, micro_batch_size
        self.world_size, self.rank, self.bos_id = world_size, rank, bos_id
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def global_batch(self, grad_accum: int) -> int:
        return self.batch * grad_accum * self.world_size

    def sample_index(self, k: int) -> int:
        """Row of the source that global sample k reads."""
        n = len(self.source)
        epoch = k // n
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(n, self.seed, epoch)
        return int(self._order[k % n])

    def sample_ids(self, samples_seen: int, micro_step: int) -> list[int]:
        first = samples_seen + (micro_step * self.world_size + self.rank) * self.batch
        return [first + j for j in range(self.batch)]

    def micro_batch(self, samples_seen: int, micro_step: int) -> MicroBatch:
        ks = self.sample_ids(samples_seen, micro_step)
        return collate([self.source.row(self.sample_index(k)) for k in ks], self.bos_id)


def eval_batches(
    source: RowSource,
    *,
    micro_batch_size: int,
    max_batches: int,
    world_size: int,
    rank: int,
    bos_id: int | None = None,
) -> list[MicroBatch]:
    """The fixed held-out batches of this rank: the first rows of `source`, in order.

    Every rank gets the same number of batches (collectives in FSDP's forward need it); rows past
    the end of the source are present but fully masked, so they add nothing to the loss."""
    per_round = micro_batch_size * world_size
    rounds = min(max_batches, -(-len(source) // per_round))
    out = []
    for m in range(rounds):
        rows = []
        for j in range(micro_batch_size):
            i = m * per_round + rank * micro_batch_size + j
            if i < len(source):
                rows.append(source.row(i))
            else:
                ids, _ = source.row(0)
                rows.append((ids, np.zeros(len(ids), dtype=bool)))
        out.append(collate(rows, bos_id))
    return out
