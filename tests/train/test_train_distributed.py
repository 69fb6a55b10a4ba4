"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 match the single-process run on the same
global batch, resume from (and write) checkpoints, and the checkpoints load as models.

The single-process reference uses micro_batch_size 4 x grad_accum 2; the distributed runs use
micro_batch_size 4 x grad_accum 1 on each of 2 ranks: the same 8 samples per step (train/data.py
lays a step out as [micro-step][rank][row])."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import curve, reference_config

from codegemma.train import run_checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def torchrun(cfg_path: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "codegemma.train",
        "--config",
        str(cfg_path),
        *flags,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def write_config(path: Path, run_dir: Path, shard_dir: Path, tok_dir: Path) -> Path:
    cfg = reference_config(run_dir, shard_dir, tok_dir, grad_accum=1)  # x 2 ranks
    path.write_text(cfg.to_toml(), encoding="utf-8")
    return path


def assert_curves_close(got: list[tuple], want: list[tuple]) -> None:
    assert [c[0] for c in got] == [c[0] for c in want]
    for (_, loss, lr, norm), (_, loss_ref, lr_ref, norm_ref) in zip(got, want, strict=True):
        assert loss == pytest.approx(loss_ref, rel=2e-5)
        assert lr == lr_ref
        assert norm == pytest.approx(norm_ref, rel=2e-4)


def assert_weights_close(run: Path, ref_run: Path, step: int) -> None:
    got = ckpt.load_checkpoint(ckpt.checkpoint_dir(run, step))[0]
    want = ckpt.load_checkpoint(ckpt.checkpoint_dir(ref_run, step))[0]
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)


def test_ddp_two_processes_match_single_process(reference, tmp_path, shard_dir, tiny_tokenizer_dir):
    ref_run, _ = reference
    run = tmp_path / "ddp"
    cfg = write_config(tmp_path / "ddp.toml", run, shard_dir, tiny_tokenizer_dir)
    torchrun(cfg, "--parallel", "ddp")
    assert_curves_close(curve(run), curve(ref_run))
    assert_weights_close(run, ref_run, 6)


def test_fsdp2_resumes_a_single_process_checkpoint_and_matches(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir
):
    """FSDP2 picks up the single-process run's step-4 checkpoint (optimizer state loaded into
    sharded parameters), trains steps 5-6 sharded, evaluates, and gathers its own checkpoint."""
    ref_run, _ = reference
    run = tmp_path / "fsdp"
    shutil.copytree(ref_run, run)
    shutil.rmtree(ckpt.checkpoint_dir(run, 6))
    cfg = write_config(tmp_path / "fsdp.toml", run, shard_dir, tiny_tokenizer_dir)
    out = torchrun(cfg, "--parallel", "fsdp")
    assert '"resumed_from": 4' in out.stdout
    assert_curves_close(curve(run), curve(ref_run))
    assert_weights_close(run, ref_run, 6)
    import codegemma

    assert codegemma.load(ckpt.checkpoint_dir(run, 6) / ckpt.MODEL).config.vocab_size == 512


@pytest.mark.slow
def test_fsdp2_from_scratch_with_activation_checkpointing(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir
):
    ref_run, _ = reference
    run = tmp_path / "fsdp_ac"
    cfg = write_config(tmp_path / "fsdp.toml", run, shard_dir, tiny_tokenizer_dir)
    torchrun(cfg, "--parallel", "fsdp", "--activation-checkpointing")
    assert_curves_close(curve(run), curve(ref_run))
    assert_weights_close(run, ref_run, 6)


def launch_ranks(cfg_path: Path, world_size: int = 2, timeout: float = 120) -> list[tuple]:
    """(exit code, stderr) of each rank of `python -m codegemma.train`, started as torchrun would
    start them but with no agent that stops the others when one exits: a rank left waiting in a
    collective shows as a timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for rank in range(world_size):
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO / "src"),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            cmd = [sys.executable, "-m", "codegemma.train", "--config", str(cfg_path)]
            procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_no_loadable_checkpoint_stops_every_rank_with_the_same_message(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir
):
    """Rank 0 checks the checkpoints and sends its error to the other ranks: every rank exits
    with the clean message and code 2, none waits for rank 0 in a collective."""
    ref_run, _ = reference
    run = tmp_path / "broken"
    shutil.copytree(ref_run, run)
    for _, d in ckpt.step_dirs(run):
        (d / ckpt.COMPLETE).unlink()
    cfg = write_config(tmp_path / "broken.toml", run, shard_dir, tiny_tokenizer_dir)
    message = f"codegemma train: error: no checkpoint in {run / ckpt.CHECKPOINTS} can be resumed"
    for code, err in launch_ranks(cfg):
        assert code == 2 and err.startswith(message), err[-3000:]
        assert "Traceback" not in err and "step-000002: no COMPLETE marker" in err
        assert "fix: move the broken checkpoints" in err
    assert [p.name for p in sorted((run / ckpt.CHECKPOINTS).iterdir())] == [
        "step-000002",
        "step-000004",
        "step-000006",
    ]
