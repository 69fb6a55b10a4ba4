"""The training loop: pretraining on token shards or SFT on chat data, single process or torchrun.

`train(cfg)` builds everything from a TrainConfig, resumes from the newest checkpoint in
`cfg.run_dir` that passes its checks (run_checkpoint.py) if there is one, and runs `max_steps`
optimizer steps. One step: the step's micro-batches (this rank's slice of the global batch),
attention within each repository sample of a packed row (`repo_mask`, data.py), forward under
autocast (bf16 on GPU, fp32 on CPU; FSDP2 casts through its own policy),
next-token cross entropy summed over the target tokens and divided by the number of target
tokens in the whole global batch (all ranks, all micro-steps), so a token weighs the same however
the batch is split; then gradient clipping and AdamW with the lr of `schedule.lr_at(step)`.

Key choice: everything a resumed run needs is in the checkpoint (weights, optimizer state, step,
samples consumed); the schedule and the data order are pure functions of those, so on CPU in fp32
a resumed run's losses equal an uninterrupted run's bit for bit.

    from codegemma.train.config import TrainConfig
    from codegemma.train.trainer import train
    result = train(TrainConfig(run_dir="runs/tiny", preset="tiny", data="data/out", max_steps=200))
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codegemma.checkpoint import load_model, resolve_model
from codegemma.config import ModelConfig
from codegemma.errors import ConfigError, TrainCheckpointError, TrainConfigError, TrainDataError
from codegemma.model import GemmaForCausalLM
from codegemma.tokenizer import Tokenizer
from codegemma.train import run_checkpoint as ckpt
from codegemma.train.config import TrainConfig
from codegemma.train.data import (
    IGNORE,
    Loader,
    MicroBatch,
    RowSource,
    eval_batches,
    open_source,
    split_holdout,
)
from codegemma.train.metrics import MetricsLogger, flops_per_token, peak_flops
from codegemma.train.parallelize import (
    World,
    all_sum,
    barrier,
    broadcast_object,
    close_world,
    grad_norm_value,
    grad_sync,
    init_world,
    parallelize,
)
from codegemma.train.schedule import lr_at

STATE_VERSION = ckpt.STATE_VERSION


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None  # the last logged training loss
    eval_loss: float | None  # the last held-out loss
    checkpoint: Path | None  # the newest complete checkpoint
    resumed_from: int | None  # the step this invocation resumed from


@dataclass(kw_only=True)
class Run:
    """Everything the loop works with. `step` and `samples_seen` are what checkpoints record."""

    cfg: TrainConfig
    world: World
    model: GemmaForCausalLM  # the model itself (FSDP2 shards it in place)
    module: nn.Module  # what the forward runs on: `model` or its DDP wrapper
    optimizer: torch.optim.Optimizer
    loader: Loader
    eval_batches: list[MicroBatch]
    tokenizer_dir: Path
    dtype: torch.dtype  # compute dtype
    autocast: Callable[[], contextlib.AbstractContextManager]
    step: int = 0
    samples_seen: int = 0
    resumed_from: int | None = None
    # since the last log line: summed CE of this rank, global target tokens, last grad norm
    ce_sum: Tensor | None = None
    tokens: Tensor | None = None
    grad_norm: Tensor | None = None
    last_log_time: float = 0.0
    last_log_step: int = 0
    start_time: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    flops_per_token: float = 0.0
    peak: tuple[float, str] = (0.0, "")


def train(cfg: TrainConfig) -> TrainResult:
    world = init_world(cfg.device)
    try:
        return _run(cfg, world)
    finally:
        close_world(world)


# -- setup ------------------------------------------------------------------------------------
def resolve_tokenizer(cfg: TrainConfig) -> Path:
    """cfg.tokenizer, else init_from's tokenizer files, else the shards' manifest's tokenizer.

    init_from may be a directory or a model id in the local Hugging Face cache (offline)."""
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    if cfg.init_from:
        model_dir = resolve_model(cfg.init_from)
        if any((model_dir / f).is_file() for f in ckpt.TOKENIZER_FILES):
            return model_dir
    if cfg.task == "pretrain":
        from codegemma.data.shards import load_manifest

        recorded = load_manifest(Path(cfg.data))["tokenizer"].get("path")
        if recorded and Path(recorded).exists():
            return Path(recorded)
    raise TrainConfigError(
        "no tokenizer found: none is set, init_from has no tokenizer files and the data's "
        "manifest names none that exists",
        fix='set tokenizer = "path/to/tokenizer_dir" (the one the data was prepared with); '
        "checkpoints carry it so that they load as models",
    )


def build_model(cfg: TrainConfig, tok: Tokenizer) -> GemmaForCausalLM:
    """An fp32 model on CPU: a fresh one (preset or config.json, seeded init) or the weights of
    an existing checkpoint."""
    if cfg.init_from:
        model, config = load_model(resolve_model(cfg.init_from), dtype=torch.float32)
    else:
        config = _fresh_config(cfg).replace(torch_dtype="float32")
        with torch.device("meta"):
            model = GemmaForCausalLM(config)
        model.to_empty(device="cpu")
        model.init_weights(std=cfg.init_std, seed=cfg.seed)
        model.reset_buffers("cpu")
    if tok.vocab_size > config.vocab_size:
        raise TrainConfigError(
            f"the tokenizer {tok.path} has {tok.vocab_size} tokens but the model only "
            f"{config.vocab_size} embeddings",
            fix="use a tokenizer of at most that size, or a model whose vocab_size covers it",
        )
    return model.train()


def _fresh_config(cfg: TrainConfig) -> ModelConfig:
    if cfg.preset is not None:
        return ModelConfig.preset(cfg.preset)
    path = Path(cfg.model_config)
    if path.is_dir():
        return ModelConfig.load(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainConfigError(
            f"model_config {path} is not a readable config.json ({e})",
            fix="point model_config at a Hugging Face config.json (or its directory), or set "
            "preset",
        ) from e
    if not isinstance(data, dict):
        raise ConfigError(f"model_config {path} is not a JSON object of Gemma config fields")
    return ModelConfig.from_hf_dict(data)


def load_sources(cfg: TrainConfig, tok: Tokenizer) -> tuple[RowSource, RowSource | None]:
    train_src = open_source(cfg.task, cfg.data, tok, cfg.seq_len)
    if cfg.eval_data and cfg.eval_holdout:
        raise TrainConfigError(
            "eval_data and eval_holdout are both set", fix="set one of them, not both"
        )
    if cfg.eval_holdout:
        return split_holdout(train_src, cfg.eval_holdout)
    if cfg.eval_data:
        return train_src, open_source(cfg.task, cfg.eval_data, tok, train_src.seq_len)
    return train_src, None


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only: none on norms or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = name.endswith(("norm.weight", "embed_tokens.weight", "lm_head.weight"))
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True
    )


def compute_dtype(cfg: TrainConfig, world: World) -> torch.dtype:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and world.device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


# -- one step -----------------------------------------------------------------------------------
def loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed next-token cross entropy in fp32 over the targets that are not IGNORE."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def forward(module: nn.Module, batch: MicroBatch, device: torch.device) -> Tensor:
    """Logits of a micro-batch: attention within each repository sample when the batch carries
    segments (data.collate), the model's plain causal path otherwise."""
    inputs = batch.inputs.to(device, non_blocking=True)
    if batch.segment_ids is None:
        return module(inputs)
    return module(
        inputs,
        input_pos=batch.positions.to(device, non_blocking=True),
        segment_ids=batch.segment_ids.to(device, non_blocking=True),
    )


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[MicroBatch],
    *,
    world: World,
    autocast: Any,
    grad_clip: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(summed CE of this rank, target tokens of the global batch, grad norm before clipping)."""
    dev = world.device
    local = torch.tensor(float(sum(b.loss_tokens for b in batches)), device=dev)
    total = all_sum(local, world)  # a tensor: no host sync before the forward passes
    # DDP and FSDP2 average gradients over ranks; `world_size / total` makes that a global mean
    scale = world.world_size / total.clamp(min=1)
    ce_sum = torch.zeros((), device=dev)
    for m, b in enumerate(batches):
        with grad_sync(module, m == len(batches) - 1):
            with autocast():
                logits = forward(module, b, dev)
            ce = loss_sum(logits, b.targets.to(dev, non_blocking=True))
            (ce * scale).backward()
        ce_sum += ce.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce_sum, total, grad_norm_value(norm)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[MicroBatch], world: World, autocast: Any
) -> tuple[float, int]:
    """Mean held-out CE over all ranks' fixed eval batches; (loss, target tokens)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=world.device)
    for b in batches:
        with autocast():
            logits = forward(model, b, world.device)
        totals[0] += loss_sum(logits, b.targets.to(world.device)).double()
        totals[1] += b.loss_tokens
    model.train()
    all_sum(totals, world)
    return float(totals[0] / totals[1].clamp(min=1)), int(totals[1])


# -- checkpoints ------------------------------------------------------------------------------
def save(run: Run) -> Path | None:
    """Gather full model and optimizer states (a collective) and write them on rank 0."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(run.model, options=opts)
    optim_state = get_optimizer_state_dict(run.model, run.optimizer, options=opts)
    path = None
    if run.world.is_main:
        trainer_state = {
            "version": STATE_VERSION,
            "step": run.step,
            "samples_seen": run.samples_seen,
            "optimizer": optim_state,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "data": data_signature(run.cfg, run.loader.source),
            "config": run.cfg.to_dict(),
        }
        path = ckpt.save_checkpoint(
            run.cfg.run_dir,
            run.step,
            model_state=model_state,
            model_config=run.model.config,
            trainer_state=trainer_state,
            tokenizer_dir=run.tokenizer_dir,
            keep=run.cfg.keep_checkpoints,
            chat=run.cfg.task == "sft",
        )
    barrier(run.world)
    return path


def data_signature(cfg: TrainConfig, source: RowSource) -> dict[str, Any]:
    return {"task": cfg.task, "seed": cfg.seed, "rows": len(source), "seq_len": source.seq_len}


def restore(run: Run, trainer_state: dict[str, Any], where: Path) -> None:
    """Optimizer state, position and RNG from a checkpoint (the weights are already loaded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if trainer_state["version"] != STATE_VERSION:
        raise TrainCheckpointError(
            f"{where} holds trainer state version {trainer_state['version']}; this codegemma "
            f"resumes version {STATE_VERSION} only",
            fix=f"resume with the codegemma release that wrote it, or use a new run_dir with "
            f"init_from={where / ckpt.MODEL} to start a new run from its weights",
        )
    want = data_signature(run.cfg, run.loader.source)
    if trainer_state["data"] != want:
        raise TrainCheckpointError(
            f"{where} was written for data {trainer_state['data']} but this run has {want}; "
            f"resuming would not continue the same sample order: use a new run_dir (or "
            f"init_from={where / ckpt.MODEL} to start a new run from its weights)"
        )
    set_optimizer_state_dict(
        run.model,
        run.optimizer,
        trainer_state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    torch.set_rng_state(trainer_state["rng"]["torch"])
    if torch.cuda.is_available() and trainer_state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(trainer_state["rng"]["cuda"])
    run.step, run.samples_seen = trainer_state["step"], trainer_state["samples_seen"]
    run.resumed_from = run.step


# -- the loop ---------------------------------------------------------------------------------
def _setup(cfg: TrainConfig, world: World) -> Run:
    torch.manual_seed(cfg.seed)
    tok_dir = resolve_tokenizer(cfg)
    tok = Tokenizer.load(tok_dir)
    train_source, eval_source = load_sources(cfg, tok)
    model = build_model(cfg, tok)
    if train_source.seq_len - 1 > model.config.max_position_embeddings:
        raise TrainDataError(
            f"rows of {train_source.seq_len} tokens exceed the model's "
            f"max_position_embeddings ({model.config.max_position_embeddings})",
            fix="prepare the data (or set seq_len) with rows of at most "
            f"{model.config.max_position_embeddings + 1} tokens, or use a model with more "
            "positions",
        )
    resume = find_resume(cfg, world)
    if resume is not None:
        model.load_state_dict(resume.weights)
    model = model.to(world.device)
    dtype = compute_dtype(cfg, world)
    fsdp = world.distributed and cfg.parallel == "fsdp"
    bos_id = tok.bos_id if cfg.repo_mask else None
    module = parallelize(
        model,
        world,
        mode=cfg.parallel,
        param_dtype=dtype if fsdp else None,
        activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile,
    )
    run = Run(
        cfg=cfg,
        world=world,
        model=model,
        module=module,
        optimizer=build_optimizer(model, cfg),
        loader=Loader(
            train_source,
            seed=cfg.seed,
            micro_batch_size=cfg.micro_batch_size,
            world_size=world.world_size,
            rank=world.rank,
            bos_id=bos_id,
        ),
        eval_batches=_held_out(cfg, world, eval_source, bos_id),
        tokenizer_dir=tok_dir,
        dtype=dtype,
        autocast=_autocast(world, dtype, enabled=dtype != torch.float32 and not fsdp),
    )
    if resume is not None:
        restore(run, resume.state, resume.path)
    return run


def find_resume(cfg: TrainConfig, world: World) -> ckpt.Resumable | None:
    """The newest checkpoint of the run that loads whole, or None to start at step 0.

    Rank 0 sweeps temp dirs, checks the checkpoints (setting broken ones aside, with a warning)
    and tells the other ranks its choice, or its error, so every rank resumes from the same one
    or stops with the same message."""
    found, error = None, None
    if world.is_main:
        ckpt.clean_incomplete(cfg.run_dir)
        try:
            found = ckpt.resume_checkpoint(cfg.run_dir)
        except TrainCheckpointError as e:
            error = e
    told = (str(found.path) if found else None, (str(error), error.fix) if error else None)
    path, failure = broadcast_object(told, world)
    if error is not None:
        raise error
    if failure is not None:  # rank 0's error, on the other ranks
        raise TrainCheckpointError(failure[0], fix=failure[1])
    if found is not None or path is None:
        return found
    weights, state = ckpt.load_checkpoint(path, checksums=False)  # rank 0 hashed the files
    return ckpt.Resumable(path=Path(path), weights=weights, state=state)


def _autocast(
    world: World, dtype: torch.dtype, *, enabled: bool
) -> Callable[[], contextlib.AbstractContextManager]:
    """Autocast to the compute dtype (not under FSDP2, whose policy casts the parameters)."""
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(world.device.type, dtype=dtype)


def _held_out(
    cfg: TrainConfig, world: World, source: RowSource | None, bos_id: int | None
) -> list[MicroBatch]:
    if source is None:
        return []
    return eval_batches(
        source,
        micro_batch_size=cfg.micro_batch_size,
        max_batches=cfg.eval_batches,
        world_size=world.world_size,
        rank=world.rank,
        bos_id=bos_id,
    )


def _log_train(run: Run, logger: MetricsLogger, bar: Any, lr: float) -> None:
    cfg, world = run.cfg, run.world
    ce = all_sum(run.ce_sum.clone(), world)
    run.loss = float(ce) / max(float(run.tokens), 1.0)
    now = time.perf_counter()
    seq_tokens = run.loader.source.seq_len - 1
    tokens = (run.step - run.last_log_step) * run.loader.global_batch(cfg.grad_accum) * seq_tokens
    tps = tokens / max(now - run.last_log_time, 1e-9)
    mfu = run.flops_per_token * tps / (run.peak[0] * world.world_size)
    logger.log(
        {
            "step": run.step,
            "loss": run.loss,
            "lr": lr,
            "grad_norm": float(run.grad_norm),
            "tokens_per_s": tps,
            "mfu": mfu,
            "tokens": run.samples_seen * seq_tokens,
            "elapsed_s": now - run.start_time,
        }
    )
    bar.set_postfix(loss=f"{run.loss:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}")
    run.ce_sum, run.tokens = None, None
    run.last_log_time, run.last_log_step = now, run.step


def _maybe_eval(run: Run, logger: MetricsLogger, final: bool) -> None:
    due = run.cfg.eval_every and run.step % run.cfg.eval_every == 0
    if run.eval_batches and (due or final):
        run.eval_loss, n = evaluate(run.model, run.eval_batches, run.world, run.autocast)
        logger.log({"step": run.step, "eval_loss": run.eval_loss, "eval_tokens": n})


def _step(run: Run) -> float:
    cfg = run.cfg
    lr = lr_at(
        run.step,
        peak_lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        total_steps=cfg.max_steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = [run.loader.micro_batch(run.samples_seen, m) for m in range(cfg.grad_accum)]
    ce, total, run.grad_norm = train_step(
        run.module,
        run.optimizer,
        batches,
        world=run.world,
        autocast=run.autocast,
        grad_clip=cfg.grad_clip,
    )
    run.ce_sum = ce if run.ce_sum is None else run.ce_sum + ce
    run.tokens = total if run.tokens is None else run.tokens + total
    run.step += 1
    run.samples_seen += run.loader.global_batch(cfg.grad_accum)
    return lr


def _run(cfg: TrainConfig, world: World) -> TrainResult:
    from tqdm.auto import tqdm

    run = _setup(cfg, world)
    logger = MetricsLogger(cfg.run_dir, enabled=world.is_main, resume_step=run.step)
    run.flops_per_token = flops_per_token(run.model.config, run.loader.source.seq_len - 1)
    run.peak = peak_flops(world.device, run.dtype, cfg.peak_flops)
    if run.step == 0:
        logger.log(
            {
                "step": 0,
                "peak_flops": run.peak[0],
                "peak_source": run.peak[1],
                "world_size": world.world_size,
                "config": cfg.to_dict(),
            }
        )
    run.start_time = run.last_log_time = time.perf_counter()
    run.last_log_step = run.step
    bar = tqdm(
        total=cfg.max_steps,
        initial=run.step,
        unit="step",
        dynamic_ncols=True,
        disable=not (world.is_main and cfg.progress),
    )
    while run.step < cfg.max_steps:
        lr = _step(run)
        bar.update(1)
        final = run.step == cfg.max_steps
        if run.step % cfg.log_every == 0 or final:
            _log_train(run, logger, bar, lr)
        paused = time.perf_counter()
        _maybe_eval(run, logger, final)
        if run.step % cfg.ckpt_every == 0 or final:
            save(run)
        run.last_log_time += time.perf_counter() - paused  # tokens/s counts training time only
    bar.close()
    return TrainResult(
        run_dir=cfg.run_path,
        step=run.step,
        loss=run.loss,
        eval_loss=run.eval_loss,
        checkpoint=ckpt.latest_checkpoint(cfg.run_dir),
        resumed_from=run.resumed_from,
    )
