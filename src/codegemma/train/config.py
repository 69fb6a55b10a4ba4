"""`TrainConfig`: every knob of a training run in one frozen keyword-only dataclass.

Loaded from TOML (tomllib) and overridden by command-line flags that are generated from the fields
themselves (`lr` -> `--lr`, `micro_batch_size` -> `--micro-batch-size`, booleans get
`--compile/--no-compile`), so the file, the flags and the docs cannot drift apart. In the file a
key may sit at the top level or in the table of its section (`[model]`, `[data]`, `[batch]`,
`[optim]`, `[system]`, `[log]`, `[checkpoint]`); a key in the wrong table is an error naming the
right one. Relative paths are relative to the working directory.

    cfg = load_train_config("configs/tiny.toml", {"max_steps": 50})
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codegemma.errors import TrainConfigError
from codegemma.options import add_dataclass_options, base_type, dataclass_values

TASKS = ("pretrain", "sft")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


def _f(section: str, default: Any = dataclasses.MISSING, help: str = "") -> Any:
    return field(default=default, metadata={"section": section, "help": help})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = _f("checkpoint", help="output directory: checkpoints, metrics.jsonl, plot")
    # -- model ----------------------------------------------------------------------------
    preset: str | None = _f(
        "model", None, "build a fresh model from a ModelConfig preset (e.g. tiny, 2b, 7b)"
    )
    model_config: str | None = _f(
        "model", None, "build a fresh model from an HF config.json (or a dir holding one)"
    )
    init_from: str | None = _f("model", None, "start from this HF model dir (continued training)")
    tokenizer: str | None = _f(
        "model", None, "tokenizer dir (default: init_from's, else the shards' manifest)"
    )
    init_std: float = _f("model", 0.02, "std of the normal init of a fresh model")
    # -- data -----------------------------------------------------------------------------
    task: str = _f("data", "pretrain", "pretrain (token shards) or sft (chat JSONL)")
    data: str = _f("data", help="shard dir (pretrain) or JSONL of {'messages': [...]} (sft)")
    eval_data: str | None = _f("data", None, "held-out data in the same format as `data`")
    eval_holdout: int = _f("data", 0, "hold out the last N sequences of `data` for eval")
    seq_len: int | None = _f("data", None, "tokens per row (pretrain: the shards'; sft: required)")
    repo_mask: bool = _f(
        "data",
        True,
        "attend only within each repository sample of a row (a <bos> starts one; positions "
        "restart there)",
    )
    # -- batch ----------------------------------------------------------------------------
    micro_batch_size: int = _f("batch", 8, "rows per forward pass per process")
    grad_accum: int = _f("batch", 1, "micro-batches per optimizer step")
    max_steps: int = _f("batch", help="optimizer steps of the whole run")
    # -- optimizer ------------------------------------------------------------------------
    lr: float = _f("optim", 3e-4, "peak learning rate")
    min_lr_ratio: float = _f("optim", 0.1, "final lr as a fraction of the peak (cosine floor)")
    warmup_steps: int = _f("optim", 100, "linear warmup steps")
    weight_decay: float = _f("optim", 0.1, "AdamW decoupled decay (never on norms, embeddings)")
    beta1: float = _f("optim", 0.9)
    beta2: float = _f("optim", 0.95)
    eps: float = _f("optim", 1e-8)
    grad_clip: float = _f("optim", 1.0, "max global grad norm (0 = no clipping)")
    seed: int = _f("optim", 0, "seed of the init and of the data order")
    # -- system ---------------------------------------------------------------------------
    device: str = _f("system", "auto", "auto, cpu or cuda (each process takes cuda:LOCAL_RANK)")
    precision: str = _f("system", "auto", "auto (bf16 on GPU, fp32 on CPU), fp32 or bf16")
    parallel: str = _f("system", "ddp", "ddp or fsdp (FSDP2) when launched with torchrun")
    compile: bool = _f("system", False, "torch.compile each decoder layer")
    activation_checkpointing: bool = _f("system", False, "recompute layers in backward")
    # -- logging --------------------------------------------------------------------------
    log_every: int = _f("log", 10, "steps between metrics lines")
    eval_every: int = _f("log", 100, "steps between eval losses (0 = only at the end)")
    eval_batches: int = _f("log", 8, "micro-batches per process per evaluation")
    peak_flops: float | None = _f(
        "log", None, "per-device peak FLOP/s for MFU (default: table for known GPUs, else measured)"
    )
    progress: bool = _f("log", True, "show a progress bar")
    # -- checkpoints ----------------------------------------------------------------------
    ckpt_every: int = _f("checkpoint", 100, "steps between checkpoints (multiple of log_every)")
    keep_checkpoints: int = _f("checkpoint", 3, "complete checkpoints kept (older are deleted)")

    def __post_init__(self) -> None:
        for name in (
            "micro_batch_size",
            "grad_accum",
            "max_steps",
            "log_every",
            "eval_batches",
            "ckpt_every",
            "keep_checkpoints",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "eval_holdout", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.seq_len is not None:
            _check_int("seq_len", self.seq_len, minimum=2)
        sources = {
            "preset": self.preset,
            "model_config": self.model_config,
            "init_from": self.init_from,
        }
        given = [k for k, v in sources.items() if v is not None]
        if len(given) != 1:
            raise TrainConfigError(
                'set exactly one of preset (a fresh model, e.g. preset = "tiny"), model_config '
                "(a fresh model of a config.json) and init_from (an HF model dir to continue "
                f"from); got {', '.join(given) or 'none'}"
            )
        _check_choice("task", self.task, TASKS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("parallel", self.parallel, PARALLEL)
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.task == "sft" and self.seq_len is None:
            raise TrainConfigError('task = "sft" needs seq_len (rows are padded to it)')
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.init_std <= 0:
            raise TrainConfigError("weight_decay and grad_clip must be >= 0, init_std > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise TrainConfigError("need 0 <= beta1, beta2 < 1 and eps > 0")
        if self.ckpt_every % self.log_every:
            raise TrainConfigError(
                f"ckpt_every ({self.ckpt_every}) must be a multiple of log_every "
                f"({self.log_every}) so a resumed run logs the same loss intervals"
            )
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise TrainConfigError(f"peak_flops must be positive, got {self.peak_flops}")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML, grouped by section (None values are omitted)."""
        lines: list[str] = []
        for section in SECTIONS:
            items = [
                (f.name, getattr(self, f.name))
                for f in dataclasses.fields(self)
                if f.metadata["section"] == section and getattr(self, f.name) is not None
            ]
            if items:
                lines.append(f"[{section}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in items]
                lines.append("")
        return "\n".join(lines)


SECTIONS = ("model", "data", "batch", "optim", "system", "log", "checkpoint")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise TrainConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TrainConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = base_type(TrainConfig, name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML `lr = 1` is an int
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TrainConfigError(
            f"{where}: {name} must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def flatten_toml(data: dict[str, Any], where: str) -> dict[str, Any]:
    """{section: {key: v}} and top-level keys -> {key: v}, checking names and sections."""
    flat: dict[str, Any] = {}

    def put(key: str, value: Any, section: str | None) -> None:
        if key not in FIELDS:
            raise TrainConfigError(
                f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(FIELDS))}"
            )
        right = FIELDS[key].metadata["section"]
        if section is not None and section != right:
            raise TrainConfigError(f"{where}: {key!r} belongs in [{right}], not [{section}]")
        if key in flat:
            raise TrainConfigError(f"{where}: {key!r} is set twice")
        flat[key] = _coerce(key, value, where)

    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise TrainConfigError(
                    f"{where}: unknown table [{key}]; tables are {', '.join(SECTIONS)}"
                )
            for k, v in value.items():
                put(k, v, key)
        else:
            put(key, value, None)
    return flat


def load_train_config(
    path: str | os.PathLike | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """TrainConfig from a TOML file (optional) with `overrides` (field -> value) applied on top."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainConfigError(f"config file {p} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise TrainConfigError(f"{p} is not valid TOML: {e}") from e
        values = flatten_toml(data, str(p))
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise TrainConfigError(f"unknown override {key!r}")
        values[key] = value if value is None else _coerce(key, value, "command line")
    missing = [
        f.name for f in FIELDS.values() if f.default is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        flags = ", ".join(f"--{m.replace('_', '-')}" for m in missing)
        raise TrainConfigError(
            f"missing required setting(s) {', '.join(missing)}: put them in the config file or "
            f"pass {flags}"
        )
    return TrainConfig(**values)


# -- command-line flags ---------------------------------------------------------------------
def add_override_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field (options.add_dataclass_options); unset flags stay out of the namespace,
    and "none" unsets an optional field (`--preset none --init-from m/`)."""
    group = parser.add_argument_group("settings (override the config file)")
    add_dataclass_options(
        group,
        TrainConfig,
        dest_prefix="cfg_",
        describe=lambda f: f"[{f.metadata['section']}] {f.metadata['help']}".rstrip(),
    )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flag values by field name, for `load_train_config(path, overrides)`."""
    return dataclass_values(args, TrainConfig, dest_prefix="cfg_")
