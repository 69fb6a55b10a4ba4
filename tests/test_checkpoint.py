"""checkpoint.py: HF-format save/load round trips, transformers interop, every error case with its
message, crash-safety of saving, offline model-id resolution and zero-copy (mmap) loading.

Run: .venv/bin/python -m pytest tests/test_checkpoint.py -q   (add `-m slow` for the RSS test)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegemma.checkpoint import (
    CheckpointError,
    checkpoint_files,
    describe,
    load_model,
    mmap_tensors,
    parse_dtype,
    read_header,
    resolve_model,
    save_model,
)
from codegemma.config import ModelConfig
from codegemma.model import GemmaForCausalLM

IDS = torch.tensor([[2, 67, 5, 9, 69, 11, 68]])


def tiny(**kw) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**kw)


def make_model(cfg: ModelConfig, seed: int = 0) -> GemmaForCausalLM:
    model = GemmaForCausalLM(cfg).init_weights(seed=seed)
    with torch.no_grad():  # non-zero norms so a swapped norm tensor would be noticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return model


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def state_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(model_dir):
        out.update({k: v.clone() for k, v in mmap_tensors(f).items()})
    return out


def write_raw(path: Path, header: dict, data: bytes, *, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.fixture
def saved(tmp_path: Path) -> tuple[GemmaForCausalLM, ModelConfig, Path]:
    cfg = tiny()
    model = make_model(cfg)
    return model, cfg, save_model(model, cfg, tmp_path / "ckpt")


# -- round trips ----------------------------------------------------------------------------------
def test_round_trip_unsharded(saved) -> None:
    model, cfg, out = saved
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert read_header(out / "model.safetensors").metadata == {"format": "pt"}
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    loaded, loaded_cfg = load_model(out)
    assert loaded_cfg == cfg
    assert not loaded.training
    assert_same_state(model, loaded)
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)
    assert torch.equal(loaded(IDS), model(IDS))
    assert [p.name for p in checkpoint_files(out)] == ["model.safetensors"]


def test_round_trip_sharded_names_and_index_like_transformers(tmp_path) -> None:
    cfg = tiny()
    model = make_model(cfg)
    limit = 40_000  # embedding (131 kB) alone, then shards of whole tensors under 40 kB
    out = save_model(model, cfg, tmp_path / "sharded", max_shard_bytes=limit)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert index["weight_map"].keys() == state.keys()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    assert index["metadata"]["total_parameters"] == cfg.num_parameters
    for shard in shards:
        tensors = read_header(out / shard).tensors
        assert {k for k, v in index["weight_map"].items() if v == shard} == tensors.keys()
        nbytes = sum(e.end - e.begin for e in tensors.values())
        assert nbytes <= limit or len(tensors) == 1
    assert [p.name for p in checkpoint_files(out)] == shards
    loaded, _ = load_model(out)
    assert_same_state(model, loaded)
    assert torch.equal(loaded(IDS), model(IDS))


def test_untied_lm_head_round_trip(tmp_path) -> None:
    cfg = tiny(tie_word_embeddings=False)
    model = make_model(cfg)
    out = save_model(model, cfg, tmp_path / "untied", max_shard_bytes=100_000)
    assert "lm_head.weight" in state_of(out)
    loaded, loaded_cfg = load_model(out)
    assert loaded_cfg.tie_word_embeddings is False
    assert_same_state(model, loaded)
    assert not torch.equal(loaded.output_embedding, loaded.model.embed_tokens.weight)


def test_tied_lm_head_is_not_written_and_an_explicit_copy_is_accepted(saved, tmp_path) -> None:
    model, cfg, out = saved
    assert "lm_head.weight" not in state_of(out)
    # Some released Gemma checkpoints carry lm_head.weight although tied: it is a copy.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    copy = tmp_path / "with_copy"
    shutil.copytree(out, copy)
    safetensors.torch.save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    loaded, _ = load_model(copy)
    assert_same_state(model, loaded)
    assert describe(copy)["has_lm_head"] is True


def test_untied_config_requires_lm_head(saved) -> None:
    _, cfg, out = saved
    cfg.replace(tie_word_embeddings=False).save(out)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*lm_head\.weight.*tie_word_emb"):
        load_model(out)


def test_dtype_conversion_on_load(saved) -> None:
    model, _, out = saved
    loaded, cfg = load_model(out, dtype=torch.bfloat16)
    assert cfg.torch_dtype == "bfloat16"
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16)), name
    assert loaded.rotary.inv_freq.dtype == torch.float32  # buffers are recomputed, not cast
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)
    assert loaded(IDS).dtype == torch.bfloat16


def test_save_in_bf16_then_load_keeps_or_converts_dtype(saved, tmp_path) -> None:
    model, cfg, _ = saved
    out = save_model(model, cfg, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert describe(out)["dtype"] == "bfloat16"
    kept, kept_cfg = load_model(out)  # dtype=None: the checkpoint's dtype
    assert kept_cfg.torch_dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in kept.parameters())
    up, _ = load_model(out, dtype="float32")
    for name, p in up.named_parameters():
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16).float()), name


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device_and_dtype_at_load(saved, device) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, _, out = saved
    loaded, _ = load_model(out, dtype="bfloat16", device=device)
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert {t.device.type for t in tensors} == {device}
    expected = model.to(torch.bfloat16)(IDS)
    assert torch.allclose(loaded(IDS.to(device)).cpu().float(), expected.float(), atol=2e-2)


def test_parse_dtype() -> None:
    assert parse_dtype(None) is None and parse_dtype("auto") is None
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(CheckpointError, match="'int8' is not supported"):
        parse_dtype("int8")


# -- mmap: zero copy, lifetime, copy-on-write ----------------------------------------------------
def test_loaded_weights_are_views_of_the_file_and_outlive_their_mmaps(saved) -> None:
    model, _, out = saved
    loaded, _ = load_model(out)
    gc.collect()  # only the tensors reference the mmaps now
    raw = (out / "model.safetensors").read_bytes()
    embed = loaded.model.embed_tokens.weight
    entry = read_header(out / "model.safetensors").tensors["model.embed_tokens.weight"]
    assert raw[entry.begin : entry.end] == embed.detach().numpy().tobytes()
    assert torch.equal(loaded(IDS), model(IDS))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_same_dtype_weights_live_in_a_mapping_of_the_file(saved) -> None:
    _, _, out = saved
    loaded, _ = load_model(out)
    file = str((out / "model.safetensors").resolve())
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(file):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    assert spans, "model.safetensors is not mapped"
    for name, p in loaded.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in spans), f"{name} was copied"
    converted, _ = load_model(out, dtype="bfloat16")  # a conversion must copy
    assert not any(lo <= converted.model.norm.weight.data_ptr() < hi for lo, hi in spans)


def test_in_place_updates_never_reach_the_file(saved) -> None:
    model, _, out = saved
    before = (out / "model.safetensors").read_bytes()
    loaded, _ = load_model(out)
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)
    assert (out / "model.safetensors").read_bytes() == before
    again, _ = load_model(out)
    assert_same_state(model, again)


def test_save_back_into_the_directory_it_was_loaded_from(saved) -> None:
    _, cfg, out = saved
    loaded, _ = load_model(out)
    with torch.no_grad():
        loaded.model.norm.weight.fill_(0.25)
    expected = {k: v.clone() for k, v in loaded.state_dict().items()}
    save_model(loaded, cfg, out, max_shard_bytes=50_000)  # the old file is mmapped meanwhile
    save_model(loaded, cfg, out)  # and back to one file: stale shards and index go away
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    reloaded, _ = load_model(out)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, expected[k]), k


# -- errors ---------------------------------------------------------------------------------------
def test_missing_directory_and_file_instead_of_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"model directory .*nope does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        load_model(tmp_path / "file")


def test_missing_config(saved) -> None:
    _, _, out = saved
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        load_model(out)


def test_missing_weights(saved) -> None:
    _, _, out = saved
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model\.safetensors or"):
        load_model(out)
    (out / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\): convert them to safetens"):
        checkpoint_files(out)


def test_unknown_model_type_is_named(saved) -> None:
    _, _, out = saved
    data = json.loads((out / "config.json").read_text())
    data["model_type"] = "llama"
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'llama' is not supported"):
        load_model(out)


def test_wrong_shape_names_tensor_and_both_shapes(saved) -> None:
    _, cfg, out = saved
    cfg.replace(intermediate_size=96).save(out)
    with pytest.raises(CheckpointError) as err:
        load_model(out)
    msg = str(err.value)
    assert "'model.layers.0.mlp.gate_proj.weight'" in msg
    assert "has shape [128, 64]" in msg and "implies [96, 64]" in msg


def test_missing_tensors_are_listed(saved) -> None:
    model, _, out = saved
    state = {k: v for k, v in model.state_dict().items() if ".layers.1." not in k}
    safetensors.torch.save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(out)
    msg = str(err.value)
    assert "lacks 9 tensor(s)" in msg and "model.layers.1.input_layernorm.weight" in msg
    assert "(+4 more)" in msg


def test_unexpected_tensors_are_listed(saved) -> None:
    model, _, out = saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    safetensors.torch.save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(out)
    assert "1 tensor(s) a Gemma model does not use: model.layers.0.self_attn.q_proj.bias" in str(
        err.value
    )


def test_integer_weights_are_rejected(saved) -> None:
    model, _, out = saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)
    safetensors.torch.save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' .* dtype I32"):
        load_model(out)


def test_truncated_and_corrupt_files(tmp_path) -> None:
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="2 bytes, too small to be safetensors"):
        read_header(f)
    write_raw(f, {}, b"", header_len=10_000)
    with pytest.raises(CheckpointError, match="header length 10000 exceeds the file size"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_header(f)
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    write_raw(f, {"w": entry}, b"\0" * 8)
    with pytest.raises(
        CheckpointError,
        match=r"'w': data_offsets end at byte \d+, beyond the "
        r"file end .*truncated",
    ):
        read_header(f)
    write_raw(f, {"w": {**entry, "dtype": "Q4_K"}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"'w' has unsupported dtype 'Q4_K'; supported: F64"):
        read_header(f)
    write_raw(f, {"w": {**entry, "shape": [3]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"span 16 bytes but shape \[3\] of F32 needs 12"):
        read_header(f)
    write_raw(f, {"w": {"dtype": "F32"}}, b"")
    with pytest.raises(CheckpointError, match="must have dtype, shape and data_offsets"):
        read_header(f)
    write_raw(f, {"w": entry}, b"\0" * 16)
    assert torch.equal(mmap_tensors(f)["w"], torch.zeros(4))


def test_truncated_weights_file_fails_to_load(saved) -> None:
    _, _, out = saved
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"beyond the file end .*re-download or re-save"):
        load_model(out)


def test_index_naming_a_missing_shard(tmp_path) -> None:
    cfg = tiny()
    out = save_model(make_model(cfg), cfg, tmp_path / "s", max_shard_bytes=50_000)
    (out / "model-00002-of-00009.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(out)
    msg = str(err.value)
    assert "model.safetensors.index.json names shard 'model-00002-of-00009.safetensors'" in msg
    assert "missing" in msg


def test_index_inconsistent_with_shards_or_unreadable(tmp_path) -> None:
    cfg = tiny()
    out = save_model(make_model(cfg), cfg, tmp_path / "s", max_shard_bytes=50_000)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"places tensor 'model\.norm\.weight' in model-0000"):
        load_model(out)
    index_path.write_text("{")
    with pytest.raises(CheckpointError, match="is not a readable JSON index"):
        load_model(out)
    index_path.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="plain file names in the same directory"):
        checkpoint_files(out)


def test_save_rejects_a_model_that_does_not_match_the_config(tmp_path) -> None:
    model = make_model(tiny())
    with pytest.raises(
        CheckpointError,
        match=r"cannot save: tensor .* has shape \[512, 64\] but "
        r"the config implies \[512, 32\]",
    ):
        save_model(model, tiny(hidden_size=32), tmp_path / "x")
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*lm_head.weight"):
        save_model(model, tiny(tie_word_embeddings=False), tmp_path / "x")
    with pytest.raises(CheckpointError, match="max_shard_bytes must be positive"):
        save_model(model, tiny(), tmp_path / "x", max_shard_bytes=0)
    assert not (tmp_path / "x").exists()


# -- crash safety -------------------------------------------------------------------------------
class Crash(Exception):
    pass


def crash_at(monkeypatch, k: int) -> list[int]:
    """Make the k-th file commit (save_file or os.replace, counted together) raise Crash."""
    count = [0]
    real_replace, real_save = os.replace, safetensors.torch.save_file

    def tick() -> None:
        count[0] += 1
        if count[0] == k:
            raise Crash

    def replace(*a, **kw):
        tick()
        return real_replace(*a, **kw)

    def save(*a, **kw):
        tick()
        return real_save(*a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(safetensors.torch, "save_file", save)
    return count


@pytest.mark.parametrize(
    ("old_shards", "new_shards"), [(50_000, 50_000), (None, 60_000), (50_000, None)]
)
def test_a_crash_at_any_point_never_leaves_a_directory_that_loads_wrong(
    tmp_path, monkeypatch, old_shards, new_shards
) -> None:
    cfg = tiny()
    old_model, new_model = make_model(cfg, seed=1), make_model(cfg, seed=2)
    pristine = save_model(old_model, cfg, tmp_path / "pristine", max_shard_bytes=old_shards)
    (pristine / "tokenizer.json").write_text("{}")  # foreign files survive every save
    events = crash_at(monkeypatch, 0)
    save_model(new_model, cfg, tmp_path / "probe", max_shard_bytes=new_shards)
    monkeypatch.undo()
    outcomes = set()
    for k in range(1, events[0] + 2):  # the last k lets the save complete
        target = tmp_path / f"t{k}"
        shutil.copytree(pristine, target)
        crash_at(monkeypatch, k)
        with contextlib.suppress(Crash):
            save_model(new_model, cfg, target, max_shard_bytes=new_shards)
        monkeypatch.undo()
        assert (target / "tokenizer.json").is_file()
        try:
            loaded, _ = load_model(target)
        except CheckpointError as e:
            assert "no weights" in str(e), k
            outcomes.add("refused")
            continue
        same_as = [
            name for name, m in (("old", old_model), ("new", new_model)) if same_state(m, loaded)
        ]
        assert len(same_as) == 1, f"crash at commit {k} left a mix of old and new weights"
        outcomes.add(same_as[0])
    assert outcomes == {"old", "refused", "new"}


def test_a_crash_while_saving_a_new_directory_leaves_nothing(tmp_path, monkeypatch) -> None:
    cfg = tiny()
    crash_at(monkeypatch, 3)
    with pytest.raises(Crash):
        save_model(make_model(cfg), cfg, tmp_path / "new", max_shard_bytes=50_000)
    assert list(tmp_path.iterdir()) == []


# -- describe -------------------------------------------------------------------------------------
def test_describe(tmp_path) -> None:
    cfg = tiny(tie_word_embeddings=False)
    out = save_model(make_model(cfg), cfg, tmp_path / "d", max_shard_bytes=150_000, dtype="bf16")
    info = describe(out)
    files = sorted(out.glob("model-*.safetensors"))
    assert info["sharded"] is True
    assert [f["name"] for f in info["files"]] == [f.name for f in files]
    assert info["total_bytes"] == sum(f.stat().st_size for f in files)
    assert info["num_tensors"] == 21 and info["num_parameters"] == cfg.num_parameters
    assert info["dtype"] == "bfloat16" and info["dtypes"] == {"bfloat16": 21}
    assert info["has_lm_head"] is True
    json.dumps(info)  # `codegemma info` prints it as JSON


# -- resolve_model --------------------------------------------------------------------------------
def fake_cache(
    root: Path, repo_id: str, revisions: list[str], main: str | None, source: Path
) -> Path:
    """The huggingface_hub layout: blobs, snapshots/<rev>/<file> symlinks, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    for i, rev in enumerate(revisions):
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for f in source.iterdir():
            blob = repo / "blobs" / f"{rev}-{f.name}"
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        os.utime(snap, (1_000_000 + i, 1_000_000 + i))  # later revisions are newer
    if main is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main)
    return repo


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("resolve_model touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)


def test_resolve_existing_directory_as_is(saved, no_network) -> None:
    assert resolve_model(saved[2]) == saved[2]
    assert resolve_model(str(saved[2])) == saved[2]


def test_resolve_from_hf_hub_cache_prefers_refs_main(
    saved, tmp_path, monkeypatch, no_network
) -> None:
    repo = fake_cache(tmp_path / "hub", "google/codegemma-2b", ["aaa1", "bbb2"], "aaa1", saved[2])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    path = resolve_model("google/codegemma-2b")
    assert path == repo / "snapshots" / "aaa1"
    loaded, _ = load_model(path)  # through the cache's symlinks to blobs
    assert_same_state(saved[0], loaded)


def test_resolve_newest_snapshot_without_refs_under_hf_home(
    saved, tmp_path, monkeypatch, no_network
) -> None:
    repo = fake_cache(
        tmp_path / "home" / "hub", "google/codegemma-2b", ["old", "new"], None, saved[2]
    )
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("google/codegemma-2b") == repo / "snapshots" / "new"


def test_resolve_default_cache_under_home_and_stale_ref(
    saved, tmp_path, monkeypatch, no_network
) -> None:
    hub = tmp_path / "user" / ".cache" / "huggingface" / "hub"
    repo = fake_cache(hub, "gemma-tiny", ["r1", "r2"], "deleted-rev", saved[2])
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("gemma-tiny") == repo / "snapshots" / "r2"


def test_resolve_unknown_id_explains_where_it_looked(tmp_path, monkeypatch, no_network) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_model("google/codegemma-7b")
    msg = str(err.value)
    assert "neither a directory nor in the local Hugging Face cache" in msg
    assert str(tmp_path / "hub" / "models--google--codegemma-7b" / "snapshots") in msg
    assert "huggingface-cli download google/codegemma-7b" in msg and "pass the model's dir" in msg
    with pytest.raises(CheckpointError, match=r"model directory .*does not exist"):
        resolve_model(tmp_path / "not" / "here")


# -- transformers interop -------------------------------------------------------------------------
@pytest.mark.parametrize(("tie", "shard"), [(True, None), (True, "60KB"), (False, "60KB")])
def test_loads_what_transformers_saves(tmp_path, tie, shard) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = tiny(tie_word_embeddings=tie)
    torch.manual_seed(0)
    theirs = transformers.GemmaForCausalLM(transformers.GemmaConfig(**cfg.to_hf_dict()))
    theirs.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    ours, our_cfg = load_model(tmp_path)
    assert our_cfg == cfg
    reference = theirs.state_dict()
    if tie:
        assert torch.equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])
    assert ours.state_dict().keys() == reference.keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, reference[k]), k


@pytest.mark.parametrize(("tie", "shard"), [(True, 50_000), (False, None)])
def test_transformers_loads_what_we_save(tmp_path, tie, shard) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = tiny(tie_word_embeddings=tie)
    ours = make_model(cfg)
    save_model(ours, cfg, tmp_path / "m", max_shard_bytes=shard)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    reference = theirs.state_dict()
    assert torch.equal(reference.pop("lm_head.weight"), ours.output_embedding)
    assert reference.keys() == ours.state_dict().keys() - {"lm_head.weight"}
    for k, v in reference.items():
        assert torch.equal(v, ours.state_dict()[k]), k
    assert theirs.generation_config.eos_token_id == 1 and theirs.generation_config.bos_token_id == 2


# -- the safetensors reader, property-tested -------------------------------------------------------
TMP_PATH_OK = [HealthCheck.function_scoped_fixture]  # each example overwrites its files
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@st.composite
def tensor_dicts(draw) -> dict[str, torch.Tensor]:
    n = draw(st.integers(0, 4))
    out = {}
    for i in range(n):
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**16))
        t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10
        out[f"t{i}.{draw(st.sampled_from(['w', 'b']))}"] = t.to(dtype)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=TMP_PATH_OK)
@given(tensors=tensor_dicts())
def test_reader_round_trips_whatever_safetensors_writes(tmp_path, tensors) -> None:
    f = tmp_path / "p.safetensors"
    safetensors.torch.save_file(tensors, str(f), metadata={"k": "v"})
    got = mmap_tensors(f)
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t)
    assert read_header(f).metadata == {"k": "v"}


@settings(max_examples=60, deadline=None, suppress_health_check=TMP_PATH_OK)
@given(
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 399), st.integers(1, 255)), max_size=3),
)
def test_reader_meets_any_corruption_with_a_checkpoint_error(tmp_path, cut, flips) -> None:
    f = tmp_path / "c.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    safetensors.torch.save_file(tensors, str(f))
    raw = bytearray(f.read_bytes())
    for pos, xor in flips:
        if pos < len(raw):
            raw[pos] ^= xor
    f.write_bytes(bytes(raw[: len(raw) - cut % len(raw)]))
    try:
        got = mmap_tensors(f)
    except CheckpointError:
        return
    for t in got.values():  # whatever parsed must be readable without a crash
        t.float().sum()


# -- memory ---------------------------------------------------------------------------------------
RSS_PROBE = textwrap.dedent("""
    import json, sys, psutil, torch
    from codegemma.checkpoint import load_model
    from codegemma.config import ModelConfig
    from codegemma.model import GemmaForCausalLM

    with torch.device("meta"):  # warm-up: the first meta build initialises ~70 MB of torch state
        GemmaForCausalLM(ModelConfig.preset("tiny"))

    def anon():
        status = open("/proc/self/status").read().split("\\n")
        return next(int(x.split()[1]) * 1024 for x in status if x.startswith("RssAnon:"))

    proc = psutil.Process()
    rss0, anon0 = proc.memory_info().rss, anon()
    model, _ = load_model(sys.argv[1], dtype=sys.argv[2])
    rss1 = proc.memory_info().rss
    total = sum(float(p.float().sum()) for p in model.parameters())  # touch every weight
    print(json.dumps({"rss_load": rss1 - rss0, "anon_after_touch": anon() - anon0}))
""")


@pytest.mark.slow  # ~8 s: writes a 235 MB checkpoint and starts two interpreters
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_maps_the_file_instead_of_copying_it(tmp_path) -> None:
    cfg = tiny(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
    )
    with torch.device("meta"):
        model = GemmaForCausalLM(cfg)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(0.5)
    out = save_model(model, cfg, tmp_path / "big")
    del model
    size = (out / "model.safetensors").stat().st_size
    assert size > 190e6

    def probe(dtype: str) -> dict[str, int]:
        run = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, str(out), dtype],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return json.loads(run.stdout)

    same = probe("float32")
    assert same["rss_load"] < 0.25 * size, same  # mapped, not read
    assert same["anon_after_touch"] < 0.25 * size, same  # reading fills page cache, not heap
    converted = probe("bfloat16")  # control: a conversion must copy, and the probe sees it
    assert converted["anon_after_touch"] > 0.4 * size, converted


def test_saved_files_get_normal_permissions(tmp_path):
    from codegemma.fileio import file_mode

    model = GemmaForCausalLM(ModelConfig.preset("tiny"))
    out = save_model(model, model.config, tmp_path / "m", max_shard_bytes=200_000)
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == file_mode(), f.name
