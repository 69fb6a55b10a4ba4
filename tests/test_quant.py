"""ggml block formats (quant.py) against gguf-py's reference, and quantized weights in the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from codegemma import kernels, quant
from codegemma.config import ModelConfig
from codegemma.model import GemmaForCausalLM

FORMATS = ("F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K")
# Byte offsets of each block's fp16 scale fields (finite in any real file), per format.
SCALE_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def finite_halves(raw: np.ndarray, offsets) -> np.ndarray:
    """Make the 16-bit words at `offsets` of each row finite: an all-ones exponent (inf/NaN) loses
    its top exponent bit. The mask 0x7C00 (fp16) / 0x7F80 (bf16) is given per word kind."""
    out = raw.copy()
    for off, mask in offsets:
        word = out[:, off].astype(np.uint16) | (out[:, off + 1].astype(np.uint16) << 8)
        word = np.where((word & mask) == mask, word & ~np.uint16(0x4000), word)
        out[:, off], out[:, off + 1] = word & 0xFF, word >> 8
    return out


def block_bytes(fmt: str, raw: bytes) -> np.ndarray:
    """`raw` as [blocks, type size] with every fp16/bf16 field finite."""
    f = quant.FORMATS[fmt]
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, f.type_size)
    if fmt in ("F16", "BF16"):
        return finite_halves(rows, [(0, 0x7C00 if fmt == "F16" else 0x7F80)])
    return finite_halves(rows, [(off, 0x7C00) for off in SCALE_FIELDS[fmt]])


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


@st.composite
def raw_blocks(draw, fmt: str):
    f = quant.FORMATS[fmt]
    n = draw(st.integers(1, 4)) * (8 if f.block_size == 1 else 1)
    kind = draw(st.sampled_from(["random", "zero", "edge"]))
    if kind == "zero":
        return np.zeros((n, f.type_size), dtype=np.uint8)
    raw = block_bytes(fmt, draw(st.binary(min_size=n * f.type_size, max_size=n * f.type_size)))
    if kind == "edge" and fmt in SCALE_FIELDS:  # the largest, the smallest subnormal, -0 scales
        for off in SCALE_FIELDS[fmt]:
            word = draw(st.sampled_from([0x7BFF, 0xFBFF, 0x0001, 0x03FF, 0x8000, 0x0400]))
            raw[:, off], raw[:, off + 1] = word & 0xFF, word >> 8
    return raw


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(data=st.data())
def test_dequantize_equals_gguf_bit_for_bit(fmt: str, data) -> None:
    raw = data.draw(raw_blocks(fmt))
    rows = raw.reshape(1, -1) if quant.FORMATS[fmt].block_size > 1 else raw.reshape(2, -1)
    expected = ref_dequantize(rows, GT[fmt])
    got = quant.dequantize(torch.from_numpy(rows.copy()), fmt)
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    np.testing.assert_array_equal(bits(got.numpy()), bits(expected))


def float_blocks(n_blocks: int):
    """Blocks of 32 float32 values over the whole finite range: huge, tiny, subnormal, zeros."""
    values = st.one_of(
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.floats(-2.0, 2.0, width=32),
        st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38, 0.5, -8.0]),
    )
    return arrays(np.float32, (n_blocks, 32), elements=values)


def reference_defined(x: np.ndarray, fmt: str) -> bool:
    """Whether ggml's reference is defined for every block: 1/d must not overflow (a block whose
    largest magnitude is below ~2^-121 leaves its cast of inf/nan to an integer undefined in C)."""
    amax = np.abs(x).max(axis=1)
    d = amax / np.float32(127 if fmt == "Q8_0" else 8)
    with np.errstate(divide="ignore", over="ignore"):
        return bool(np.all((d == 0) | np.isfinite(np.float32(1) / d)))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
@SETTINGS
@given(x=st.integers(1, 4).flatmap(float_blocks))
def test_quantize_equals_gguf_bit_for_bit(fmt: str, x: np.ndarray) -> None:
    assume(reference_defined(x, fmt))
    with np.errstate(all="ignore"):
        expected = ref_quantize(x.reshape(1, -1), GT[fmt])
    got = quant.quantize(torch.from_numpy(x.reshape(1, -1).copy()), fmt)
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
def test_quantize_zero_and_vanishing_blocks(fmt: str) -> None:
    zero = torch.zeros(2, 32)
    np.testing.assert_array_equal(
        quant.quantize(zero, fmt).numpy(), ref_quantize(zero.numpy(), GT[fmt])
    )
    # So small that 1/d overflows: the reference's cast is undefined; ours gives a zero fp16
    # scale and zero codes, so the block dequantizes to zeros.
    tiny = torch.full((1, 32), 1e-40)
    assert torch.count_nonzero(quant.dequantize(quant.quantize(tiny, fmt), fmt)) == 0


def test_q4_0_element_order_and_q8_0_layout() -> None:
    x = torch.arange(-16, 16, dtype=torch.float32).reshape(1, 32)
    q4 = quant.quantize(x, "Q4_0")[0]
    d = q4[:2].view(torch.float16).item()
    assert d == 16 / 8  # max magnitude -16 maps to -8
    assert q4[2] & 0x0F == round(-16 / d) + 8 and q4[2] >> 4 == round(0 / d) + 8  # 0 and 16
    q8 = quant.quantize(x, "Q8_0")[0]
    assert q8.numel() == 34 and q8[2:].view(torch.int8)[0] == -127


def test_float_formats_are_plain_casts() -> None:
    w = torch.randn(3, 8)
    assert torch.equal(quant.dequantize(quant.quantize(w, "F32"), "F32"), w)
    assert torch.equal(quant.dequantize(quant.quantize(w, "BF16"), "BF16"), w.bfloat16().float())
    assert torch.equal(quant.dequantize(quant.quantize(w, "F16"), "F16"), w.half().float())


def test_formats_refuse_partial_blocks_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        quant.quantize(torch.ones(2, 40), "Q8_0")
    with pytest.raises(ValueError, match="can be read, not written"):
        quant.quantize(torch.ones(2, 256), "Q4_K")
    with pytest.raises(ValueError, match="unknown weight format"):
        quant.block_format("Q5_K")


# -- modules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
def test_quantized_linear_and_embedding_use_the_dequantized_matrix(fmt: str, monkeypatch) -> None:
    w = torch.randn(48, 64)
    lin = quant.QuantizedLinear.from_float(w, fmt)
    dense = lin.dequantize()
    assert lin.weight.dtype == torch.uint8 and (lin.in_features, lin.out_features) == (64, 48)
    for rows in (1, 5, 40):  # the CPU kernels' few-row and tiled paths, where available
        x = torch.randn(2, rows, 64)
        torch.testing.assert_close(lin(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    with monkeypatch.context() as m:  # the reference path: dequantize, then the same matmul
        m.setattr(kernels, "library", lambda: None)
        torch.testing.assert_close(lin(x), x @ dense.T, rtol=0, atol=0)
    emb = quant.QuantizedEmbedding.from_float(w, fmt)
    ids = torch.tensor([[3, 0, 47], [5, 5, 1]])
    assert torch.equal(emb(ids), dense[ids])
    assert emb(ids, torch.bfloat16).dtype == torch.bfloat16


def tiny_model() -> GemmaForCausalLM:
    return GemmaForCausalLM(ModelConfig.preset("tiny")).init_weights(std=0.05, seed=0).eval()


def dequantized_copy(model: GemmaForCausalLM) -> GemmaForCausalLM:
    """A float model holding exactly the weights a quantized model computes with."""
    dense = GemmaForCausalLM(model.config).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, quant.QuantizedMatrix):
            state[f"{name}.weight"] = module.dequantize()
    for name, p in model.named_parameters():
        state[name] = p.detach()
    dense.load_state_dict(state, strict=True)
    return dense


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_quantized_model_equals_a_model_holding_the_dequantized_weights(fmt: str) -> None:
    model = tiny_model()
    float_logits = model(torch.tensor([[2, 40, 41, 300, 7]]))
    quant.quantize_model(model, fmt)
    assert model.quantized and not isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert model.compute_dtype == torch.float32
    ids = torch.tensor([[2, 40, 41, 300, 7], [2, 9, 10, 11, 12]])
    with torch.no_grad():
        got, want = model(ids), dequantized_copy(model)(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:1], float_logits, atol=1e-6)  # it did quantize


@torch.no_grad()
def test_quantized_model_decodes_with_a_cache_through_its_modules() -> None:
    model = quant.quantize_model(tiny_model(), "q8_0")
    cache = model.new_cache(1, 16)
    assert cache.layers[0].k.dtype == torch.float32
    ids = torch.tensor([[2, 40, 41, 300]])
    full = model(ids)
    model(ids[:, :3], cache=cache)
    step = model(ids[:, 3:], torch.tensor([[3]]), cache=cache)
    torch.testing.assert_close(step[0, -1], full[0, -1], rtol=1e-5, atol=1e-5)


def test_bf16_compute_over_quantized_weights() -> None:
    model = tiny_model().to(torch.bfloat16)
    quant.quantize_model(model, "q8_0")
    assert model.compute_dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[2, 3, 4]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
