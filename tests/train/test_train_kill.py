"""A training process killed with SIGKILL at an arbitrary moment resumes from its last complete
checkpoint, and the resumed run's losses equal an uninterrupted run's, step for step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_helpers import curve, tiny_config

from codegemma.train import run_checkpoint as ckpt
from codegemma.train.trainer import train

REPO = Path(__file__).resolve().parents[2]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, shard_dir, tiny_tokenizer_dir):
    cfg = tiny_config(
        tmp_path / "killed",
        shard_dir,
        tiny_tokenizer_dir,
        max_steps=12,
        warmup_steps=4,
        micro_batch_size=2,
        grad_accum=1,
    )
    (tmp_path / "run.toml").write_text(cfg.to_toml(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "codegemma.train", "--config", str(tmp_path / "run.toml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while ckpt.latest_checkpoint(cfg.run_dir) is None and proc.poll() is None:
        assert time.monotonic() < deadline, "the training process made no checkpoint in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # as soon as one checkpoint exists: mid-step or mid-save
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = ckpt.complete_checkpoints(cfg.run_dir)[-1][0]
    assert killed_at < cfg.max_steps

    resumed = train(cfg)
    assert resumed.resumed_from == killed_at and resumed.step == cfg.max_steps
    uninterrupted = cfg.replace(run_dir=str(tmp_path / "straight"))
    train(uninterrupted)
    assert curve(cfg.run_dir) == curve(uninterrupted.run_dir)
