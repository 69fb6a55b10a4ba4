"""A resume checks checkpoints whole: a broken newest one (corrupt trainer state, truncated
weights, ...) is named in a warning and set aside as `step-N.broken`, never deleted, and the run
continues bit-identically from the previous one; when none loads, one clear error lists them all.
Also: errors of the right kind for a tokenizer that does not fit the model or an unreadable
model_config."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import curve, reference_config, tiny_config

from codegemma.config import ModelConfig
from codegemma.errors import ConfigError, TrainCheckpointError, TrainConfigError
from codegemma.train import run_checkpoint as ckpt
from codegemma.train.metrics import METRICS
from codegemma.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = f"{ckpt.MODEL}/model.safetensors"


def copy_run(reference, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    return run


def zero_head(path: Path, n: int = 4096) -> bytes:
    """Overwrite the first `n` bytes with zeros (the size stays); returns the new content."""
    data = bytearray(path.read_bytes())
    data[:n] = bytes(min(n, len(data)))
    path.write_bytes(data)
    return bytes(data)


def truncate(path: Path) -> int:
    size = path.stat().st_size // 2
    os.truncate(path, size)
    return size


def strip_checksums(run: Path) -> None:
    """Make every checkpoint look like one written before COMPLETE recorded sha256s."""
    for _, d in ckpt.step_dirs(run):
        info = json.loads((d / ckpt.COMPLETE).read_text())
        del info["sha256"]
        (d / ckpt.COMPLETE).write_text(json.dumps(info))


def step(run: Path, n: int) -> Path:
    return ckpt.checkpoint_dir(run, n)


def run_module(cfg, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m codegemma.train --config ...` as a user runs it."""
    (tmp_path / "run.toml").write_text(cfg.to_toml(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "codegemma.train", "--config", str(tmp_path / "run.toml")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_zeroed_trainer_state_falls_back_to_the_previous_checkpoint(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir, caplog
):
    run = copy_run(reference, tmp_path)
    broken = zero_head(step(run, 6) / ckpt.STATE)
    with caplog.at_level(logging.WARNING, logger="codegemma.train"):
        result = train(reference_config(run, shard_dir, tiny_tokenizer_dir))
    assert result.resumed_from == 4 and result.step == 6
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert str(step(run, 6)) in text and "trainer_state.pt differs from the sha256" in text
    assert "renamed it to step-000006.broken" in text and "using step-000004" in text
    aside = run / ckpt.CHECKPOINTS / "step-000006.broken"
    assert (aside / ckpt.STATE).read_bytes() == broken  # kept as it was, not deleted
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2, 4, 6]
    assert curve(run) == curve(reference[0])  # bit-identical to the uninterrupted run


def test_truncated_weights_warn_visibly_and_are_set_aside(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir
):
    run = copy_run(reference, tmp_path)
    size = truncate(step(run, 6) / WEIGHTS)
    out = run_module(reference_config(run, shard_dir, tiny_tokenizer_dir), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"checkpoint {step(run, 6)} cannot be resumed from: {WEIGHTS} is {size} bytes" in (
        out.stderr
    )
    assert "renamed it to step-000006.broken" in out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["resumed_from"] == 4
    aside = run / ckpt.CHECKPOINTS / "step-000006.broken"
    assert (aside / WEIGHTS).stat().st_size == size
    assert curve(run) == curve(reference[0])


def test_no_loadable_checkpoint_is_one_clear_error(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir
):
    run = copy_run(reference, tmp_path)
    truncate(step(run, 2) / WEIGHTS)
    zero_head(step(run, 4) / ckpt.STATE)
    (step(run, 6) / ckpt.COMPLETE).unlink()
    before = sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir())
    metrics = (run / METRICS).read_text()
    out = run_module(reference_config(run, shard_dir, tiny_tokenizer_dir), tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"codegemma train: error: no checkpoint in {run / ckpt.CHECKPOINTS}" in out.stderr
    assert "step-000006: no COMPLETE marker" in out.stderr
    assert "step-000004: trainer_state.pt differs from the sha256" in out.stderr
    assert f"step-000002: {WEIGHTS} is " in out.stderr
    assert "fix: move the broken checkpoints" in out.stderr
    # nothing was touched: no checkpoint renamed or deleted, no step trained
    assert sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir()) == before
    assert (run / METRICS).read_text() == metrics


def test_checkpoints_without_checksums_are_checked_by_loading(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir, caplog
):
    """Checkpoints from before COMPLETE recorded sha256s still resume, and a corrupt trainer
    state among them is found by loading it."""
    run = copy_run(reference, tmp_path)
    strip_checksums(run)
    zero_head(step(run, 6) / ckpt.STATE)
    with caplog.at_level(logging.WARNING, logger="codegemma.train"):
        result = train(reference_config(run, shard_dir, tiny_tokenizer_dir))
    assert result.resumed_from == 4
    assert "trainer_state.pt is not a readable torch.save file" in caplog.text
    assert curve(run) == curve(reference[0])


def other_json(path: Path) -> None:
    """Replace a JSON file by a JSON object of the same size that means nothing to its reader."""
    size = path.stat().st_size
    path.write_text('{"x": "' + "x" * (size - 9) + '"}')
    assert path.stat().st_size == size


@pytest.mark.parametrize(
    ("rel", "corrupt", "problem"),
    [
        (ckpt.STATE, zero_head, "trainer_state.pt is not a readable torch.save file"),
        (WEIGHTS, zero_head, "model/ does not load as a model: .*safetensors header"),
        (f"{ckpt.MODEL}/config.json", zero_head, ": model/config.json is not valid JSON"),
        (f"{ckpt.MODEL}/config.json", other_json, "model/ does not load as a model: .*model_type"),
        (f"{ckpt.MODEL}/tokenizer.json", zero_head, ": model/tokenizer.json is not valid JSON"),
        (f"{ckpt.MODEL}/tokenizer.json", other_json, "model/tokenizer.json does not load"),
        (f"{ckpt.MODEL}/tokenizer_config.json", zero_head, ": model/tokenizer_config.json is not"),
    ],
)
def test_load_checkpoint_names_the_broken_file(reference, tmp_path, rel, corrupt, problem):
    """Without checksums each file's content is still checked: a corrupt one is found, and the
    error names the checkpoint and the file."""
    d = tmp_path / ckpt.CHECKPOINTS / "step-000006"
    shutil.copytree(step(reference[0], 6), d)
    strip_checksums(tmp_path)
    ckpt.load_checkpoint(d)  # intact: loads
    corrupt(d / rel)
    with pytest.raises(TrainCheckpointError, match=f"checkpoint {d} cannot be resumed from: "):
        ckpt.load_checkpoint(d)
    with pytest.raises(TrainCheckpointError, match=problem):
        ckpt.load_checkpoint(d)


def test_a_trainer_state_without_its_keys_is_broken(reference, tmp_path):
    d = tmp_path / ckpt.CHECKPOINTS / "step-000006"
    shutil.copytree(step(reference[0], 6), d)
    state = torch.load(d / ckpt.STATE, weights_only=True)
    del state["optimizer"]
    torch.save(state, d / ckpt.STATE)
    (d / ckpt.COMPLETE).write_text(ckpt._marker(d, 6))  # sizes and checksums agree again
    with pytest.raises(TrainCheckpointError, match="trainer_state.pt lacks optimizer"):
        ckpt.load_checkpoint(d)


def test_broken_checkpoints_do_not_count_for_keep_checkpoints(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir
):
    """Steps 4 and 6 broken, keep_checkpoints=2: after resuming from 2 and saving 4, step 2 is
    still there (the broken ones neither count as kept nor get replaced)."""
    run = copy_run(reference, tmp_path)
    zero_head(step(run, 4) / ckpt.STATE)
    truncate(step(run, 6) / WEIGHTS)
    cfg = reference_config(run, shard_dir, tiny_tokenizer_dir, max_steps=4, keep_checkpoints=2)
    assert train(cfg).resumed_from == 2
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2, 4]
    names = sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir())
    assert names == ["step-000002", "step-000004", "step-000004.broken", "step-000006.broken"]


def test_a_second_set_aside_of_one_step_keeps_the_first(reference, tmp_path):
    run = copy_run(reference, tmp_path)
    (run / ckpt.CHECKPOINTS / "step-000006.broken").mkdir()
    zero_head(step(run, 6) / ckpt.STATE)
    assert ckpt.resume_checkpoint(run).path == step(run, 4)
    assert (run / ckpt.CHECKPOINTS / "step-000006.broken-2" / ckpt.STATE).is_file()


def test_state_version_mismatch_is_a_checkpoint_error(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir
):
    """A checkpoint of another trainer state version is intact, so it is not set aside: the
    error says which version and what to do."""
    run = copy_run(reference, tmp_path)
    d = step(run, 6)
    state = torch.load(d / ckpt.STATE, weights_only=True)
    state["version"] = ckpt.STATE_VERSION + 1
    torch.save(state, d / ckpt.STATE)
    (d / ckpt.COMPLETE).write_text(ckpt._marker(d, 6))
    with pytest.raises(TrainCheckpointError, match="trainer state version 2; this codegemma"):
        train(reference_config(run, shard_dir, tiny_tokenizer_dir))
    assert ckpt.latest_checkpoint(run) == d


def test_a_tokenizer_larger_than_the_model_is_a_config_error(
    tmp_path, shard_dir, tiny_tokenizer_dir
):
    ModelConfig.preset("tiny", vocab_size=256).save(tmp_path / "small")
    cfg = tiny_config(
        tmp_path / "run",
        shard_dir,
        tiny_tokenizer_dir,
        preset=None,
        model_config=str(tmp_path / "small" / "config.json"),
    )
    with pytest.raises(TrainConfigError, match="has 512 tokens but the model only 256"):
        train(cfg)


def test_model_config_errors(tmp_path, shard_dir, tiny_tokenizer_dir):
    def run_with(model_config: Path) -> None:
        train(
            tiny_config(
                tmp_path / "run",
                shard_dir,
                tiny_tokenizer_dir,
                preset=None,
                model_config=str(model_config),
            )
        )

    with pytest.raises(TrainConfigError, match="is not a readable config.json"):
        run_with(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TrainConfigError, match="is not a readable config.json"):
        run_with(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        run_with(tmp_path / "list.json")
    (tmp_path / "llama.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        run_with(tmp_path / "llama.json")


def test_no_tokenizer_found_is_a_config_error(tmp_path, shard_dir):
    from codegemma.train.trainer import resolve_tokenizer

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(tmp_path / "gone")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainConfigError, match="no tokenizer found") as e:
        resolve_tokenizer(tiny_config(tmp_path / "run", tmp_path / "data", None))
    assert 'set tokenizer = "path/to/tokenizer_dir"' in e.value.fix


def test_two_eval_sources_are_a_config_error(tmp_path, shard_dir, tiny_tokenizer_dir):
    cfg = tiny_config(
        tmp_path / "run", shard_dir, tiny_tokenizer_dir, eval_holdout=4, eval_data=str(shard_dir)
    )
    with pytest.raises(TrainConfigError, match="eval_data and eval_holdout are both set"):
        train(cfg)


def test_export_takes_the_newest_sound_checkpoint_and_leaves_broken_ones(
    reference, tmp_path, caplog
):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_model", REPO / "scripts/export_model.py")
    export_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_model)
    run = copy_run(reference, tmp_path)
    zero_head(step(run, 6) / WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="codegemma.train"):
        assert export_model.export(run, tmp_path / "out") == step(run, 4)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        step(run, 4) / WEIGHTS
    ).read_bytes()
    assert "step-000006" in caplog.text and "left it in place" in caplog.text
    assert ckpt.is_complete(step(run, 6))  # not renamed: exporting changes no run
