"""GGUF: files laid out as llama.cpp's converter lays out a Gemma load and match the checkpoint;
what `codegemma export gguf` writes reads back the same; Ollama names resolve offline."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from tiny_corpus_texts import tiny_corpus

import codegemma
from codegemma import export, kernels, quant
from codegemma.checkpoint import load_model, resolve_model, save_model
from codegemma.config import ModelConfig
from codegemma.errors import CheckpointError
from codegemma.gguf import load_gguf, tensor_bytes
from codegemma.model import GemmaForCausalLM
from codegemma.tokenizer import Tokenizer

SAMPLE_CODE = [
    *tiny_corpus(),
    "def mean(xs: list[float]) -> float:\n\treturn sum(xs) / len(xs)  # naïve\n",
    "    if (x <= 10 && y != 'é') { return \"日本\"; }\r\n",
    "",
    "  trailing spaces   \n\n\n",
]
LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, *inner = name.removesuffix(".weight").split(".")
    return f"blk.{i}.{LAYER['.'.join(inner)]}.weight"


def write_like_llama_cpp(path: Path, model_dir: Path, tensors: dict[str, tuple[GT, np.ndarray]]):
    """A Gemma GGUF as convert_hf_to_gguf.py writes one: general.* and gemma.* keys, the "llama"
    vocabulary with Gemma's FIM/eot ids, and the given tensors (llama.cpp names, already in their
    stored form: norms as 1 + w)."""
    config = ModelConfig.load(model_dir)
    tok = Tokenizer.load(model_dir)
    vocab = export.gguf_vocab(tok, config.vocab_size)
    w = gguf.GGUFWriter(path, "gemma")
    w.add_name("tiny")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_eot_token_id(107)
    w.add_add_space_prefix(False)
    for name, (qtype, data) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (GT.F32, GT.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def converted(model_dir: Path, matrix_type: GT) -> dict[str, tuple[GT, np.ndarray]]:
    """The checkpoint's tensors as the converter stores them: norms F32 of w + 1, matrices in
    `matrix_type` (gguf-py's own quantizers)."""
    model, _ = load_model(model_dir, dtype="float32")
    out = {}
    for name, t in model.state_dict().items():
        x = t.numpy()
        if name.endswith("norm.weight"):
            out[llama_cpp_name(name)] = (GT.F32, x + np.float32(1))
        elif matrix_type == GT.F32:
            out[llama_cpp_name(name)] = (GT.F32, x)
        else:
            out[llama_cpp_name(name)] = (matrix_type, gguf.quants.quantize(x, matrix_type))
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with non-trivial norms (the +1 convention must matter)."""
    out = tmp_path_factory.mktemp("gguf_src") / "tiny"
    model, config = load_model(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.linspace(-0.4, 0.6, p.numel()))
    save_model(model, config, out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


IDS = torch.tensor([[2, 67, 400, 401, 69, 402, 68], [2, 300, 301, 302, 303, 304, 305]])


def logits(model: GemmaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).float()


def assert_same_logits(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to float tolerance, relative to the logits' scale: the two models may sum matmuls in
    another order (the CPU gemv kernel for few rows against F.linear)."""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def dequantized_reference(model_dir: Path, tensors) -> GemmaForCausalLM:
    """A float model holding exactly the GGUF's weights, dequantized by gguf-py (norms: the stored
    scale minus 1)."""
    model, _ = load_model(model_dir, dtype="float32")
    state = {}
    for name in model.state_dict():
        qtype, data = tensors[llama_cpp_name(name)]
        w = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy())
        state[name] = w - 1 if name.endswith("norm.weight") else w
    model.load_state_dict(state)
    return model


def test_a_llama_cpp_layout_f32_gguf_gives_the_checkpoints_logits(model_dir, tmp_path) -> None:
    path = write_like_llama_cpp(tmp_path / "m.gguf", model_dir, converted(model_dir, GT.F32))
    cg = codegemma.load(path, device="cpu")
    ref = codegemma.load(model_dir, device="cpu")
    assert cg.config == ref.config and not cg.model.quantized
    assert_same_logits(logits(cg.model), logits(ref.model))
    # 1 was subtracted: w itself may round differently, the scale 1 + w the model uses is exact
    norm = cg.model.model.layers[0].input_layernorm.weight
    assert torch.equal(1 + norm, 1 + ref.model.model.layers[0].input_layernorm.weight)
    assert cg.tokenizer.special == ref.tokenizer.special


def test_a_bf16_gguf_loads_as_bf16_views(model_dir, tmp_path) -> None:
    tensors = converted(model_dir, GT.BF16)
    path = write_like_llama_cpp(tmp_path / "m.gguf", model_dir, tensors)
    cg = codegemma.load(path, device="cpu")
    ref = codegemma.load(model_dir, dtype="bfloat16", device="cpu")
    assert cg.config.torch_dtype == "bfloat16"
    assert torch.equal(cg.model.model.embed_tokens.weight, ref.model.model.embed_tokens.weight)
    torch.testing.assert_close(logits(cg.model), logits(ref.model), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("qtype", [GT.Q8_0, GT.Q4_0])
def test_quantized_gguf_equals_a_model_of_its_dequantized_weights(model_dir, tmp_path, qtype):
    tensors = converted(model_dir, qtype)
    path = write_like_llama_cpp(tmp_path / "m.gguf", model_dir, tensors)
    model, config, _ = load_gguf(path, dtype=torch.float32)
    assert model.quantized and config.torch_dtype == "float32"
    blocks = model.model.layers[1].mlp.down_proj.weight
    np.testing.assert_array_equal(blocks.numpy(), tensors["blk.1.ffn_down.weight"][1])
    assert_same_logits(logits(model), logits(dequantized_reference(model_dir, tensors)))


@pytest.mark.parametrize("native", [True, False])
def test_a_quantized_gguf_computes_in_bf16_where_the_cpu_multiplies_bf16(
    model_dir, tmp_path, monkeypatch, native
) -> None:
    """Unless told: bf16 on a CPU with native bf16 dot products (its GEMMs are the fast ones),
    else fp32; a float embedding's own type wins either way, and an explicit dtype over both."""
    monkeypatch.setattr(kernels, "native_bf16", lambda: native)
    path = write_like_llama_cpp(tmp_path / "q.gguf", model_dir, converted(model_dir, GT.Q8_0))
    cg = codegemma.load(path, device="cpu")
    want = torch.bfloat16 if native else torch.float32
    assert cg.config.torch_dtype == str(want).removeprefix("torch.")
    assert cg.model.model.norm.weight.dtype == want
    assert logits(cg.model).isfinite().all()
    assert codegemma.load(path, dtype="float32", device="cpu").config.torch_dtype == "float32"
    f32 = write_like_llama_cpp(tmp_path / "f.gguf", model_dir, converted(model_dir, GT.F32))
    assert codegemma.load(f32, device="cpu").config.torch_dtype == "float32"


def test_native_bf16_reads_the_cpu_flags(monkeypatch) -> None:
    kernels.native_bf16.cache_clear()
    try:
        for flags, want in (
            ("fpu avx2 avx512f", False),
            ("fpu avx512f avx512_bf16", True),
            ("fpu amx_bf16 amx_tile", True),
        ):
            monkeypatch.setattr(kernels, "_cpu_key", lambda f=flags: f"flags\t\t: {f}")
            kernels.native_bf16.cache_clear()
            assert kernels.native_bf16() is want
    finally:
        monkeypatch.undo()
        kernels.native_bf16.cache_clear()


def random_k_blocks(rng: np.random.Generator, qtype: GT, rows: int, cols: int) -> np.ndarray:
    """Valid random Q4_K / Q6_K bytes: random codes and scales, small finite fp16 super-scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = (rng.random((rows, cols // block)) * 2e-3).astype(np.float16).view(np.uint8)
    for off in (0, 2) if qtype == GT.Q4_K else (208,):
        data[..., off : off + 2] = scale.reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def test_q4_k_and_q6_k_ggufs_load_and_match_their_dequantized_weights(
    tiny_tokenizer_dir, tmp_path
) -> None:
    config = ModelConfig.preset(
        "tiny", hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64
    )
    src = tmp_path / "k"
    model = GemmaForCausalLM(config).init_weights(seed=1)
    save_model(model, config, src)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith("norm.weight"):
            tensors[llama_cpp_name(name)] = (GT.F32, t.numpy() + np.float32(1))
        else:  # Q4_K_M's mix: Q6_K for the embedding and down projections, Q4_K elsewhere
            qtype = GT.Q6_K if "embed" in name or "down_proj" in name else GT.Q4_K
            tensors[llama_cpp_name(name)] = (qtype, random_k_blocks(rng, qtype, *t.shape))
    path = write_like_llama_cpp(tmp_path / "k.gguf", src, tensors)
    loaded = codegemma.load(path, dtype="float32", device="cpu")
    assert loaded.model.model.embed_tokens.format.name == "Q6_K"
    assert_same_logits(logits(loaded.model), logits(dequantized_reference(src, tensors)))


def test_an_unsupported_tensor_type_is_named_with_the_supported_ones(model_dir, tmp_path):
    tensors = converted(model_dir, GT.F32)
    rows, cols = tensors["blk.0.attn_q.weight"][1].shape
    tensors["blk.0.attn_q.weight"] = (GT.Q5_1, np.zeros((rows, cols // 32 * 24), np.uint8))
    path = write_like_llama_cpp(tmp_path / "m.gguf", model_dir, tensors)
    with pytest.raises(CheckpointError) as e:
        codegemma.load(path, device="cpu")
    message = str(e.value)
    assert "'blk.0.attn_q.weight'" in message and "type Q5_1" in message
    assert all(name in message for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K"))


def test_a_file_that_is_not_gemma_is_refused(model_dir, tmp_path) -> None:
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'llama' model"):
        codegemma.load(path, device="cpu")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 3)
    with pytest.raises(CheckpointError, match="cannot be read as GGUF"):
        codegemma.load(tmp_path / "broken.gguf", device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model(tmp_path / "absent.gguf")


# -- export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0", "q4_0"])
def test_export_writes_the_checkpoints_tensors_in_llama_cpp_layout(model_dir, tmp_path, kind):
    out = export.export_gguf(model_dir, tmp_path / "out.gguf", type=kind)
    stored = tensor_bytes(out)
    model, _ = load_model(model_dir, dtype="float32")
    state = model.state_dict()
    assert set(stored) == {llama_cpp_name(n) for n in state} and "output.weight" not in stored
    qtype = GT[export.TYPES[kind]]
    for name, t in state.items():
        got_type, data = stored[llama_cpp_name(name)]
        if name.endswith("norm.weight"):
            assert got_type == "F32"
            np.testing.assert_array_equal(data.numpy().view(np.float32)[0], t.numpy() + 1)
        elif qtype == GT.BF16:
            assert got_type == "BF16"
            assert torch.equal(data.view(torch.bfloat16), t.bfloat16())
        elif qtype == GT.F32:
            assert got_type == "F32" and torch.equal(data.view(torch.float32), t)
        else:
            assert got_type == qtype.name
            np.testing.assert_array_equal(data.numpy(), gguf.quants.quantize(t.numpy(), qtype))


def test_export_reads_back_to_the_same_model_and_tokenizer(model_dir, tmp_path) -> None:
    out = export.export_gguf(model_dir, tmp_path / "out.gguf", type="f32")
    cg, ref = codegemma.load(out, device="cpu"), codegemma.load(model_dir, device="cpu")
    assert cg.config == ref.config
    assert_same_logits(logits(cg.model), logits(ref.model))
    assert_same_tokenizer(cg.tokenizer, ref.tokenizer)


def test_export_metadata_is_what_llama_cpp_reads(model_dir, tmp_path) -> None:
    out = export.export_gguf(model_dir, tmp_path / "out.gguf", type="q8_0")
    r = gguf.GGUFReader(out)

    def get(key):
        return r.get_field(key).contents()

    c = ModelConfig.load(model_dir)
    assert get("general.architecture") == "gemma" and get("general.file_type") == 7
    assert get("gemma.block_count") == c.num_hidden_layers
    assert get("gemma.attention.head_count_kv") == c.num_key_value_heads
    assert get("gemma.attention.key_length") == c.head_dim
    assert get("gemma.feed_forward_length") == c.intermediate_size
    assert get("tokenizer.ggml.model") == "llama" and get("tokenizer.ggml.add_bos_token") is True
    K = gguf.Keys.Tokenizer
    ids = {
        k: get(key)
        for k, key in [
            ("pre", K.FIM_PRE_ID),
            ("suf", K.FIM_SUF_ID),
            ("mid", K.FIM_MID_ID),
            ("sep", K.FIM_SEP_ID),
            ("eot", K.EOT_ID),
            ("bos", K.BOS_ID),
            ("eos", K.EOS_ID),
        ]
    }
    assert ids == {"pre": 67, "suf": 69, "mid": 68, "sep": 70, "eot": 107, "bos": 2, "eos": 1}
    tokens, types = get(K.LIST), get(K.TOKEN_TYPE)
    assert len(tokens) == c.vocab_size and tokens[70] == "<|file_separator|>"
    assert types[70] == gguf.TokenType.CONTROL and types[3] == gguf.TokenType.UNKNOWN
    assert types[108 + 0x41] == gguf.TokenType.BYTE and tokens[108 + 0x41] == "<0x41>"


def assert_same_tokenizer(got: Tokenizer, want: Tokenizer) -> None:
    assert got.special == want.special
    assert got.special_ids >= want.special_ids
    for text in SAMPLE_CODE:
        ids = want.encode(text, bos=True)
        assert got.encode(text, bos=True) == ids, text
        assert got.decode(ids) == want.decode(ids)


def test_a_sentencepiece_tokenizer_exports_padded_and_reads_back(
    model_dir, tiny_sp_tokenizer_dir, tmp_path
) -> None:
    src = tmp_path / "sp"
    shutil.copytree(model_dir, src)
    for f in src.glob("tokenizer*.json"):
        f.unlink()
    shutil.copy(tiny_sp_tokenizer_dir / "tokenizer.model", src)
    want = Tokenizer.load(src)
    out = export.export_gguf(src, tmp_path / "sp.gguf", type="bf16")
    cg = codegemma.load(out, device="cpu")
    assert cg.tokenizer.vocab_size == cg.config.vocab_size >= want.vocab_size
    assert_same_tokenizer(cg.tokenizer, want)
    tokens = gguf.GGUFReader(out).get_field("tokenizer.ggml.tokens").contents()
    if want.vocab_size < cg.config.vocab_size:  # padded as llama.cpp's converter pads
        assert tokens[want.vocab_size] == "[PAD1]"


def test_export_never_leaves_a_partial_file(model_dir, tmp_path, monkeypatch) -> None:
    calls = []

    def failing(weight, type_name):
        calls.append(type_name)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(weight, type_name)

    real = export.tensor_bytes
    monkeypatch.setattr(export, "tensor_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        export.export_gguf(model_dir, tmp_path / "out.gguf", type="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_export_command(model_dir, tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    export.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.gguf"
    args = parser.parse_args(
        ["export", "gguf", str(model_dir), "--type", "q8_0", "--out", str(out)]
    )
    assert args.func(args) == 0
    assert "Q8_0" in capsys.readouterr().out
    assert codegemma.load(out, device="cpu").model.quantized


def test_load_quantizes_a_checkpoint_like_the_exported_gguf(model_dir, tmp_path) -> None:
    out = export.export_gguf(model_dir, tmp_path / "q.gguf", type="q4_0")
    at_load = codegemma.load(model_dir, device="cpu", quantize="q4_0")
    from_gguf = codegemma.load(out, dtype=at_load.config.torch_dtype, device="cpu")
    for (name, a), (_, b) in zip(
        from_gguf.model.named_buffers(), at_load.model.named_buffers(), strict=True
    ):
        assert torch.equal(a, b), name
    torch.testing.assert_close(logits(from_gguf.model), logits(at_load.model), rtol=0, atol=0)
    assert isinstance(at_load.model.model.embed_tokens, quant.QuantizedEmbedding)
    text = at_load.generate("def add(a, b):", max_new_tokens=4)
    assert isinstance(text, str)


# -- Ollama ---------------------------------------------------------------------------------------
def ollama_store(root: Path, gguf_file: Path, name: str = "tiny", tag: str = "q8") -> Path:
    digest = "ab" * 32
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    (root / "blobs").mkdir()
    shutil.copy(gguf_file, root / "blobs" / f"sha256-{digest}")
    return root / "blobs" / f"sha256-{digest}"


def test_ollama_names_resolve_through_the_local_manifest(model_dir, tmp_path, monkeypatch):
    out = export.export_gguf(model_dir, tmp_path / "q.gguf", type="q8_0")
    blob = ollama_store(tmp_path / "ollama", out)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    assert resolve_model("ollama:tiny:q8") == blob
    cg = codegemma.load("ollama:tiny:q8", device="cpu")
    assert cg.model.quantized and cg.path == blob

    with pytest.raises(CheckpointError) as e:
        resolve_model("ollama:tiny")  # tag "latest" is not there
    manifest = tmp_path / "ollama" / "manifests" / "registry.ollama.ai" / "library" / "tiny"
    assert str(manifest / "latest") in str(e.value) and "ollama pull tiny:latest" in e.value.fix

    blob.unlink()
    with pytest.raises(CheckpointError) as e:
        resolve_model("ollama:tiny:q8")
    assert str(blob) in str(e.value) and "sha256:" + "ab" * 32 in str(e.value)


def test_ollama_store_defaults_to_the_home_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        resolve_model("ollama:codegemma:2b")
    expected = tmp_path / ".ollama/models/manifests/registry.ollama.ai/library/codegemma/2b"
    assert str(expected) in str(e.value)


def test_the_command_line_takes_a_gguf_and_quantizes_at_load(model_dir, tmp_path, capsys) -> None:
    from codegemma.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", str(model_dir), "--type", "q4_0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", "--model", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoint"]["format"] == "gguf" and "Q4_0" in info["checkpoint"]["tensor_types"]
    assert info["tokenizer"]["special_ids"]["fim_middle"] == 68
    prompt = ["--prefix", "def f(x):\n    return ", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(["complete", "--model", str(out), *prompt]) == 0
    from_gguf = capsys.readouterr().out
    assert main(["complete", "--model", str(model_dir), "--quantize", "q4_0", *prompt]) == 0
    assert capsys.readouterr().out == from_gguf  # the same blocks, whichever way they came


# -- the header reader (gguf.GGUFFile) against gguf-py's GGUFReader ----------------------------
def every_value_type_gguf(path: Path) -> Path:
    """A GGUF with a metadata value of every type, arrays of numbers, strings (odd UTF-8 too)
    and arrays, an alignment of 64, and tensors of several types."""
    w = gguf.GGUFWriter(path, arch="gemma")
    w.add_uint8("t.u8", 255)
    w.add_int8("t.i8", -128)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 2**32 - 1)
    w.add_int32("t.i32", -(2**31))
    w.add_float32("t.f32", 1e-6)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo\n<|fim_prefix|>")
    w.add_string("t.empty", "")
    w.add_array("t.strs", ["▁a", "", "\u00e9\u20ac\U0001f600", "<0x0A>"])
    w.add_array("t.ints", [3, -1, 7])
    w.add_array("t.floats", [0.5, -2.25, 1e-3])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.no_items", [])
    w.add_uint32("general.alignment", 64)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal(5).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), GT.Q8_0)
    w.add_tensor("c.weight", q8, raw_dtype=GT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_header_reader_reads_what_gguf_py_reads(tmp_path) -> None:
    from codegemma.gguf import GGUFFile

    path = every_value_type_gguf(tmp_path / "all.gguf")
    theirs = gguf.GGUFReader(path)
    ours = GGUFFile.open(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # GGUF.*: its header fields
    assert sorted(ours.metadata) == sorted(keys)
    assert ours.get("t.nested") == [[1, 2], [3]]
    assert theirs.get_field("t.nested").contents() == [1, 2, 3]  # gguf-py flattens nested arrays
    for key in keys:
        want = theirs.get_field(key).contents()
        if key == "t.nested":
            continue
        assert ours.get(key) == want, key
        assert type(ours.get(key)) is type(want), key
    assert ours.strings("t.strs") == ["▁a", "", "\u00e9\u20ac\U0001f600", "<0x0A>"]
    assert ours.numbers("t.floats").dtype == np.float32
    assert ours.numbers("t.floats").tolist() == np.float32([0.5, -2.25, 1e-3]).tolist()
    assert ours.strings("absent") == [] and ours.numbers("absent") is None
    assert ours.version == 3
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.tensor_type == t.tensor_type and mine.shape == tuple(t.shape.tolist())
        assert mine.n_elements == t.n_elements and mine.n_bytes == t.n_bytes
        assert mine.data.tobytes() == t.data.tobytes()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"GGUG" + b[4:], "GGUF magic"),
        (lambda b: b[:4] + (1).to_bytes(4, "little") + b[8:], "version 1"),
        (lambda b: b[:4] + (3).to_bytes(4, "big") + b[8:], "big-endian"),
        (lambda b: b[:200], "truncated"),
        (lambda b: b[:-100], "truncated: tensor 'c.weight'"),  # (the last 56 bytes: padding)
    ],
)
def test_a_damaged_header_is_a_clear_error(tmp_path, damage, message) -> None:
    from codegemma.gguf import GGUFFile

    good = every_value_type_gguf(tmp_path / "all.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(good))
    with pytest.raises(CheckpointError, match="cannot be read as GGUF") as e:
        GGUFFile.open(bad)
    assert message in str(e.value)
