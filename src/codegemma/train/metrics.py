"""Training metrics: FLOPs and MFU, the metrics.jsonl log, and the loss-curve plot.

MFU = achieved model FLOP/s / peak FLOP/s of the devices used. Model FLOPs per trained token
follow PaLM (Chowdhery et al. 2022, appendix B): 6 * N + 12 * L * H * Dh * T, where N counts the
parameters that take part in matmuls (every non-embedding weight plus the output projection,
which is the tied embedding used once as a matmul; the embedding lookup itself is free) and the
second term is attention's score and value matmuls at sequence length T (the causal half is not
subtracted, as in PaLM). Recomputation under activation checkpointing is not counted (MFU, not
HFU). The peak is, in order: `peak_flops` from the config; a table of dense bf16 peaks of known
GPUs when training in bf16; otherwise a measured square-matmul peak of the device in the compute
dtype. Every metrics line names the peak and its source.

metrics.jsonl holds one JSON object per line: {"step", "loss", "lr", "grad_norm", "tokens_per_s",
"mfu", "tokens", "elapsed_s"} for training, {"step", "eval_loss", "eval_tokens"} for evaluations.

    codegemma train plot runs/tiny        # -> runs/tiny/loss.png
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from codegemma.config import ModelConfig
from codegemma.fileio import atomic_path, write_text_atomic

METRICS = "metrics.jsonl"
PLOT = "loss.png"

# Dense bf16 tensor-core peaks (vendor datasheets), matched against torch's device name.
GPU_BF16_PEAK: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.05e12),
    ("L4", 121.0e12),
)


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matmuls: non-embedding weights plus the output projection."""
    return config.num_non_embedding_parameters + config.vocab_size * config.hidden_size


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params(config) + attention * seq_len


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Best FLOP/s of an n x n matmul on `device` in `dtype` (n = 1024 on CPU, 8192 on GPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    a @ b  # warm-up: kernels, allocator
    deadline = time.perf_counter() + seconds
    for _ in range(100):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2.0 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(
    device: torch.device, dtype: torch.dtype, configured: float | None = None
) -> tuple[float, str]:
    """(per-device peak FLOP/s, where it came from) for MFU."""
    if configured is not None:
        return configured, "config"
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BF16_PEAK:
            if key in name:
                return value, f"datasheet:{key}"
    return measure_matmul_peak(device, dtype), f"measured:{device.type}:{dtype}".replace(
        "torch.", ""
    )


# -- metrics.jsonl --------------------------------------------------------------------------
def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics file; a torn last line (a killed writer) is skipped."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records


class MetricsLogger:
    """Appends records to RUN_DIR/metrics.jsonl (main rank only).

    On resume from step s the records after s (written by the killed run after its last
    checkpoint) are dropped, so the file reads as one uninterrupted run; a fresh run starts
    an empty file."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, resume_step: int) -> None:
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# -- plot -----------------------------------------------------------------------------------
def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the loss curve (train and eval loss; lr on a second axis) of a run as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run = Path(run_dir)
    records = read_metrics(run / METRICS)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals:
        raise FileNotFoundError(
            f"no metrics in {run / METRICS}: is {run} a training run directory that has logged "
            f"at least one step?"
        )
    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train and all("lr" in r for r in train):
        lr_ax = ax.twinx()
        lr_ax.plot(
            [r["step"] for r in train],
            [r["lr"] for r in train],
            color="gray",
            alpha=0.5,
            linewidth=1,
            label="lr",
        )
        lr_ax.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title(run.name)
    fig.tight_layout()
    target = Path(out) if out is not None else run / PLOT
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target
