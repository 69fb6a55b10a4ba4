"""The trainer end to end on CPU: learning, checkpoints that load as models, kill-safe resume with
identical losses, gradient accumulation, weight-decay groups, SFT loss masking, the plot."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import curve, reference_config, tiny_config, train_records

import codegemma
from codegemma.errors import TrainCheckpointError
from codegemma.train import run_checkpoint as ckpt
from codegemma.train.metrics import METRICS, plot_run, read_metrics
from codegemma.train.trainer import build_optimizer, loss_sum, train


def test_run_learns_and_writes_metrics_and_checkpoints(reference):
    run, result = reference
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3  # it learns
    for r in records:
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["grad_norm"] > 0
    evals = [r for r in read_metrics(run / METRICS) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    header = read_metrics(run / METRICS)[0]
    assert header["peak_flops"] == 1e11 and header["peak_source"] == "config"
    assert result.step == 6 and result.checkpoint == ckpt.checkpoint_dir(run, 6)
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2, 4, 6]  # keep_checkpoints=3


def test_checkpoint_loads_with_codegemma_and_transformers(reference, tiny_tokenizer):
    run, result = reference
    model_dir = result.checkpoint / ckpt.MODEL
    cg = codegemma.load(model_dir, device="cpu")
    ids = torch.tensor([tiny_tokenizer.encode("def add(a, b):", bos=True)])
    ours = cg.model(ids).float()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(model_dir).vocab_size == tiny_tokenizer.vocab_size


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way out handles it."""


@pytest.mark.parametrize(
    "where",
    [
        "save_model",  # first file of the save
        pytest.param("_save_state", marks=pytest.mark.slow),  # in the middle
        "write_text_atomic",  # the COMPLETE marker, just before the rename
        "prune",  # after the rename: the new checkpoint is complete
    ],
)
def test_killed_mid_save_resumes_with_identical_losses(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir, monkeypatch, where
):
    ref_run, _ = reference
    run = tmp_path / "run"
    cfg = reference_config(run, shard_dir, tiny_tokenizer_dir)
    calls = {"n": 0}
    target = "prune_checkpoints" if where == "prune" else where
    original = getattr(ckpt, target)

    def dies_on_the_second_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the save of step 4
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt, target, dies_on_the_second_save)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    # a kill before the rename leaves step 2 as the newest; after it (prune), step 4 is complete
    expected = 4 if where == "prune" else 2
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, expected)
    result = train(cfg)
    assert result.resumed_from == expected
    assert curve(run) == curve(ref_run)  # bit-identical losses, lrs and grad norms
    timing = ("tokens_per_s", "mfu", "elapsed_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    # [0] is the header naming the run dir; everything after it matches
    assert strip(read_metrics(run / METRICS)[1:]) == strip(read_metrics(ref_run / METRICS)[1:])
    assert not [p for p in (run / ckpt.CHECKPOINTS).iterdir() if p.name.endswith(".tmp")]
    final = ckpt.load_checkpoint(ckpt.checkpoint_dir(run, 6))[0]
    ref_final = ckpt.load_checkpoint(ckpt.checkpoint_dir(ref_run, 6))[0]
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)


def test_a_finished_run_does_not_train_again(reference, shard_dir, tiny_tokenizer_dir):
    run, _ = reference
    before = (run / METRICS).read_text()
    result = train(reference_config(run, shard_dir, tiny_tokenizer_dir))
    assert result.resumed_from == 6 and result.step == 6
    assert (run / METRICS).read_text() == before


def test_resume_refuses_other_data(reference, tmp_path, shard_dir, tiny_tokenizer_dir):
    run, _ = reference
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(run, copy)
    with pytest.raises(TrainCheckpointError, match="use a new run_dir"):
        train(tiny_config(copy, shard_dir, tiny_tokenizer_dir, eval_holdout=8, seed=1, max_steps=8))


def test_incomplete_checkpoints_are_ignored(reference, tmp_path):
    run, _ = reference
    step6 = ckpt.checkpoint_dir(run, 6)
    assert ckpt.is_complete(step6)
    fake = tmp_path / "checkpoints" / "step-000009"
    fake.mkdir(parents=True)
    (fake / "trainer_state.pt").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) is None
    marker = json.loads((step6 / ckpt.COMPLETE).read_text())
    assert set(marker["files"]) >= {
        "trainer_state.pt",
        "model/model.safetensors",
        "model/config.json",
        "model/tokenizer.json",
    }


def test_grad_accumulation_equals_a_larger_micro_batch(tmp_path, shard_dir, tiny_tokenizer_dir):
    a = tiny_config(
        tmp_path / "a",
        shard_dir,
        tiny_tokenizer_dir,
        max_steps=3,
        ckpt_every=3,
        micro_batch_size=2,
        grad_accum=4,
    )
    b = a.replace(run_dir=str(tmp_path / "b"), micro_batch_size=8, grad_accum=1)
    train(a), train(b)
    for (sa, la, _, ga), (sb, lb, _, gb) in zip(
        curve(tmp_path / "a"), curve(tmp_path / "b"), strict=True
    ):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5) and ga == pytest.approx(gb, rel=1e-4)


def test_no_weight_decay_on_norms_and_embeddings():
    from codegemma.config import ModelConfig
    from codegemma.model import GemmaForCausalLM

    model = GemmaForCausalLM(ModelConfig.preset("tiny", tie_word_embeddings=False))
    cfg = tiny_config("r", "d", "t", weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {
        g["weight_decay"]: {names[id(p)] for p in g["params"]}
        for g in build_optimizer(model, cfg).param_groups
    }
    no_decay = {"model.embed_tokens.weight", "lm_head.weight"}
    assert groups[0.0] == {n for n in names.values() if "norm" in n or n in no_decay}
    assert groups[0.1] and all(n.endswith("proj.weight") for n in groups[0.1])


def test_sft_loss_is_masked_to_model_replies(
    tmp_path, chat_jsonl, tiny_tokenizer_dir, tiny_tokenizer
):
    cfg = tiny_config(
        tmp_path / "sft",
        chat_jsonl,
        tiny_tokenizer_dir,
        task="sft",
        seq_len=64,
        max_steps=2,
        ckpt_every=2,
        micro_batch_size=3,
        grad_accum=1,
    )
    result = train(cfg)
    first = train_records(tmp_path / "sft")[0]
    # recompute step 1's loss by hand: the initial model, the same 3 conversations, replies only
    from codegemma.model import GemmaForCausalLM
    from codegemma.train.data import Loader, open_source

    src = open_source("sft", chat_jsonl, tiny_tokenizer, 64)
    batch = Loader(src, seed=0, micro_batch_size=3).micro_batch(0, 0)
    model = GemmaForCausalLM(
        result_config := codegemma.load(result.checkpoint / ckpt.MODEL).config
    ).init_weights(std=cfg.init_std, seed=cfg.seed)
    assert result_config.vocab_size == 512
    with torch.no_grad():
        logits = model(batch.inputs)
    manual = loss_sum(logits, batch.targets) / batch.loss_tokens
    assert first["loss"] == pytest.approx(float(manual), rel=1e-5)
    # the mask matters: the loss over every token differs
    every = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.inputs.roll(-1, 1).flatten()
    )
    assert abs(float(every) - first["loss"]) > 1e-3
    sp = tiny_tokenizer.special
    learned = set(batch.targets[batch.targets != -100].tolist())
    assert sp.start_of_turn not in learned and sp.pad not in learned
    assert sp.end_of_turn in learned


def test_plot_writes_a_png(reference, tmp_path):
    run, _ = reference
    out = plot_run(run, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    from codegemma.cli import main

    assert main(["train", "plot", str(run)]) == 0 and (run / "loss.png").is_file()
    assert main(["train", "plot", str(tmp_path)]) == 2  # no metrics: a clear error, exit 2


def test_plot_without_matplotlib_is_a_clear_error(reference, monkeypatch, capsys):
    import sys

    from codegemma.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    assert main(["train", "plot", str(reference[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("codegemma train: error: plotting a run needs matplotlib")
    assert "fix: pip install matplotlib" in err


def test_activation_checkpointing_changes_nothing_but_memory(
    reference, tmp_path, shard_dir, tiny_tokenizer_dir
):
    ref_run, _ = reference
    run = tmp_path / "ac"
    train(reference_config(run, shard_dir, tiny_tokenizer_dir, activation_checkpointing=True))
    assert curve(run) == curve(ref_run)  # recomputation in fp32 on CPU is exact


def test_bf16_autocast_on_cpu_tracks_fp32(reference, tmp_path, shard_dir, tiny_tokenizer_dir):
    ref_run, _ = reference
    run = tmp_path / "bf16"
    train(
        reference_config(
            run, shard_dir, tiny_tokenizer_dir, precision="bf16", max_steps=2, ckpt_every=2
        )
    )
    got, want = curve(run), curve(ref_run)[:2]
    assert [g[0] for g in got] == [1, 2]
    for g, w in zip(got, want, strict=True):  # bf16 matmuls: close to fp32, but not equal
        assert g[1] == pytest.approx(w[1], rel=2e-2) and g[1] != w[1]
    # master weights and checkpoints stay fp32
    state = ckpt.load_checkpoint(ckpt.checkpoint_dir(run, 2))[0]
    assert all(t.dtype == torch.float32 for t in state.values())


def test_fresh_model_from_a_config_json(tmp_path, shard_dir, tiny_tokenizer_dir):
    from codegemma.config import ModelConfig

    shape = ModelConfig.preset("tiny", num_hidden_layers=1, num_key_value_heads=1)
    shape.save(tmp_path / "shape")
    cfg = tiny_config(
        tmp_path / "run",
        shard_dir,
        tiny_tokenizer_dir,
        preset=None,
        model_config=str(tmp_path / "shape" / "config.json"),
        max_steps=2,
        ckpt_every=2,
    )
    result = train(cfg)
    loaded = codegemma.load(result.checkpoint / ckpt.MODEL).config
    assert (loaded.num_hidden_layers, loaded.num_key_value_heads) == (1, 1)


@pytest.mark.slow
def test_compiled_layers_train_like_eager(reference, tmp_path, shard_dir, tiny_tokenizer_dir):
    ref_run, _ = reference
    run = tmp_path / "compiled"
    train(reference_config(run, shard_dir, tiny_tokenizer_dir, compile=True))
    for got, want in zip(curve(run), curve(ref_run), strict=True):
        assert got[0] == want[0] and got[1] == pytest.approx(want[1], rel=1e-5)
    assert codegemma.load(ckpt.checkpoint_dir(run, 6) / ckpt.MODEL).config.vocab_size == 512


def test_continued_pretraining_starts_from_the_given_weights(
    tmp_path, shard_dir, tiny_model_dir, tiny_tokenizer
):
    """init_from a model dir (the way official weights are continued): its tokenizer is found
    there, and step 1's loss is the loaded model's loss on the first batch (repository-masked,
    the default)."""
    cfg = tiny_config(
        tmp_path / "cont",
        shard_dir,
        None,
        preset=None,
        init_from=str(tiny_model_dir),
        max_steps=2,
        ckpt_every=2,
    )
    result = train(cfg)
    from codegemma.train.data import Loader, ShardSource

    loaded = codegemma.load(tiny_model_dir, device="cpu", dtype="float32").model
    bos = tiny_tokenizer.bos_id
    loader = Loader(ShardSource(shard_dir), seed=0, micro_batch_size=4, bos_id=bos)
    batches = [loader.micro_batch(0, m) for m in range(2)]
    assert all(b.segment_ids is not None for b in batches)  # the rows pack several samples
    with torch.no_grad():
        total = sum(
            float(loss_sum(loaded(b.inputs, b.positions, segment_ids=b.segment_ids), b.targets))
            for b in batches
        )
    first = train_records(tmp_path / "cont")[0]
    assert first["loss"] == pytest.approx(total / sum(b.loss_tokens for b in batches), rel=1e-5)
    assert (result.checkpoint / ckpt.MODEL / "tokenizer.json").is_file()
