"""The kernels for matrices in ggml's block formats (kernels/cpu_quant.h): each equals the plain-torch
reference (quant.dequantize, then the float matmul) within float error, for every format, odd
shapes, several rows, and every instruction-set variant; the engine's decode step on quantized
models (the quantized embedding and tied head included, formats mixed as in a Q4_K_M file)
equals the reference modules, and greedy decoding gives the same tokens."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_support import BF16_EPS, isa_variants, needs_kernels, random_cache, variant_library

from codegemma import kernels, quant
from codegemma.config import ModelConfig
from codegemma.engine import Engine, SamplingParams
from codegemma.kernels.step import DecodeStep
from codegemma.model import GemmaForCausalLM

FORMATS = ("Q8_0", "Q4_0", "Q4_K", "Q6_K")
# (byte offset of each fp16 scale in a block, log2 range of its magnitude): values of order 1
SCALES = {
    "Q8_0": ((0,), (-10, -7)),
    "Q4_0": ((0,), (-6, -4)),
    "Q4_K": ((0, 2), (-10, -8)),
    "Q6_K": ((208,), (-13, -11)),
}


@contextlib.contextmanager
def kernels_off():
    """The kernels off: quant.py's reference path, no decode step."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kernels, "library", lambda: None)
        yield


def random_blocks(n: int, k: int, fmt: str, g: torch.Generator) -> torch.Tensor:
    """uint8 [n, row bytes] of `fmt`: random codes (and Q6_K sub-scales), finite fp16 scales of
    either sign whose values come out of order 1."""
    f = quant.FORMATS[fmt]
    blocks = torch.randint(0, 256, (n, f.row_bytes(k)), dtype=torch.uint8, generator=g)
    view = blocks.view(n, -1, f.type_size)
    offsets, (lo, hi) = SCALES[fmt]
    for offset in offsets:
        magnitude = 2.0 ** (lo + (hi - lo) * torch.rand(view.shape[:2], generator=g))
        sign = torch.randint(0, 2, view.shape[:2], generator=g) * 2 - 1
        scales = (magnitude * sign).half().contiguous().view(torch.uint8).view(n, -1, 2)
        view[..., offset : offset + 2] = scales
    return blocks


def exact(x: torch.Tensor, blocks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ W^T in float64 for the dequantized W, and sum |x| |W| (the scale of rounding errors)."""
    w = quant.dequantize(blocks, fmt).double()
    return x.double() @ w.T, x.double().abs() @ w.abs().T


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, fmt: str) -> None:
    """fp32 sums of exact products: within fp32 summation error of the exact result; bf16: one
    rounding of that (half an ulp), with a margin for the sums."""
    want, scale = exact(x, blocks, fmt)
    err = (y.double() - want).abs()
    fp32_sums = 2.0**-20 * scale + 1e-30
    if y.dtype == torch.float32:
        assert (err <= fp32_sums).all(), (err - fp32_sums).max()
    else:
        assert (err <= BF16_EPS * want.abs() + fp32_sums).all(), (err / want.abs()).max()


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    m=st.integers(1, 2 * kernels.MAX_ROWS_QUANT),  # several passes of activation rows
    n=st.integers(1, 13),  # groups of weight rows, and the rows left over
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_qgemv_is_the_matmul_of_the_dequantized_matrix(fmt, dtype, m, n, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    k = blocks * quant.FORMATS[fmt].block_size
    w = random_blocks(n, k, fmt, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = kernels.qgemv(x, w, quant.FORMATS[fmt])
    assert y.shape == (m, n) and y.dtype == dtype
    assert_matmul_close(y, x, w, fmt)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_qgemv_on_2b_shapes_with_a_team_of_threads(fmt):
    """Rows of 2B's lengths (2048, 16384) on two threads, one and several activation rows."""
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, k in ((67, 2048), (9, 16384)):
            w = random_blocks(n, k, fmt, g)
            for m in (1, 4, 7):
                x = torch.randn(2, m, k, generator=g)  # leading dims kept
                y = kernels.qgemv(x, w, quant.FORMATS[fmt])
                assert y.shape == (2, m, n)
                assert_matmul_close(y.reshape(-1, n), x.reshape(-1, k), w, fmt)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_kernel_equals_quant_dequantize_bit_for_bit(fmt):
    """fp32: the very values (quant.dequantize equals gguf-py's); bf16: those rounded once, as
    torch rounds them. Random blocks, zero blocks, the largest and subnormal scales."""
    f = quant.FORMATS[fmt]
    g = torch.Generator().manual_seed(1)
    w = random_blocks(6, 2 * f.block_size, fmt, g)
    w[1] = 0
    view = w.view(6, -1, f.type_size)
    for row, word in ((2, 0x7BFF), (3, 0x0001), (4, 0x8400)):
        for offset in SCALES[fmt][0]:
            view[row, :, offset], view[row, :, offset + 1] = word & 0xFF, word >> 8
    want = quant.dequantize(w, fmt)
    assert torch.equal(kernels.dequantize(w, f, torch.float32), want)
    assert torch.equal(kernels.dequantize(w, f, torch.bfloat16), want.bfloat16())
    out = torch.empty(6, 2 * f.block_size, dtype=torch.bfloat16)
    assert kernels.dequantize(w, f, torch.bfloat16, out=out) is out


@needs_kernels
def test_the_quantized_kernels_refuse_what_they_cannot_read():
    q8 = quant.FORMATS["Q8_0"]
    w = random_blocks(3, 64, "Q8_0", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"uint8 \[N, 68\]"):
        kernels.qgemv(torch.randn(1, 64), w[:, :34], q8)
    with pytest.raises(ValueError, match="not F16"):
        kernels.qgemv(torch.randn(1, 64), w, quant.FORMATS["F16"])
    with pytest.raises(ValueError, match="fp32 or bf16 x"):
        kernels.qgemv(torch.randn(1, 64).half(), w, q8)
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize(w, q8, torch.float32, out=torch.empty(3, 64, dtype=torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_through_the_kernels_equals_the_reference_path(fmt, dtype, monkeypatch):
    """Few rows (qgemv) and many (tiles dequantized for F.linear; tiles made small here so there
    are several, the last one short): the reference path's result, within its rounding of the
    weights to the activations' dtype."""
    monkeypatch.setattr(quant, "DEQUANT_TILE", 7 * 96)
    lin = quant.QuantizedLinear.from_float(torch.randn(45, 96), fmt)
    g = torch.Generator().manual_seed(0)
    for rows in (1, kernels.MAX_ROWS_QUANT, kernels.MAX_ROWS_QUANT + 1, 50):
        x = torch.randn(1, rows, 96, generator=g).to(dtype)
        with torch.inference_mode():
            got = lin(x)
            with kernels_off():
                want = lin(x)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        _, scale = exact(x[0], lin.weight, fmt)
        tol = (2**-20 if dtype == torch.float32 else 2 * BF16_EPS) * scale
        assert ((got[0].double() - want[0].double()).abs() <= tol + 1e-6).all(), rows


def test_quantized_linear_keeps_autograd_on_the_reference_path():
    lin = quant.QuantizedLinear.from_float(torch.randn(8, 32), "Q8_0")
    x = torch.randn(2, 32, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.dequantize().sum(0).expand(2, 32))


# -- the whole decode step over quantized weights -------------------------------------------------
KQUANT_CONFIG = dict(  # every row length a multiple of 256, for the K-quants
    vocab_size=640,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
)
# Per layer, the formats of q, k, v, o, gate, up, down (None: float), mixed as llama.cpp's Q4_K_M
# mixes them, and mixed harder (a float gate beside a quantized up, and the reverse)
MIXES = {
    "q4_k_m": [
        ("Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q4_K", "Q6_K"),
        ("Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K"),
        ("Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q4_K", "Q6_K"),
    ],
    "mixed": [
        ("Q8_0", None, "Q4_0", "Q6_K", None, "Q4_K", "Q8_0"),
        (None, "Q4_K", "Q4_K", None, "Q6_K", None, None),
        ("Q6_K", "Q6_K", None, "Q4_0", "Q4_0", "Q8_0", "Q4_K"),
    ],
}
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_quantized(fmt: str, dtype: torch.dtype) -> GemmaForCausalLM:
    """The tiny test model (MQA) quantized by quant.quantize_model, in compute dtype `dtype`."""
    config = ModelConfig.preset("tiny").replace(num_attention_heads=4, num_key_value_heads=1)
    model = GemmaForCausalLM(config).init_weights(std=0.3, seed=0).to(dtype).eval()
    return quant.quantize_model(model, fmt)


def mixed_model(mix: str, dtype: torch.dtype, seed: int = 0) -> GemmaForCausalLM:
    """A model whose matrices are random blocks in MIXES[mix]'s formats, embedding Q6_K (tied)."""
    config = ModelConfig.preset("tiny").replace(**KQUANT_CONFIG)
    model = GemmaForCausalLM(config).init_weights(std=0.05, seed=seed).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    for layer, formats in zip(model.model.layers, MIXES[mix], strict=True):
        for name, fmt in zip(MATRICES, formats, strict=True):
            parent = (
                layer.self_attn
                if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                else layer.mlp
            )
            old = getattr(parent, name)
            if fmt is not None:
                blocks = random_blocks(old.out_features, old.in_features, fmt, g)
                setattr(
                    parent,
                    name,
                    quant.QuantizedLinear(old.out_features, old.in_features, fmt, blocks),
                )
    embed = model.model.embed_tokens.weight
    blocks = random_blocks(embed.shape[0], embed.shape[1], "Q6_K", g)
    model.model.embed_tokens = quant.QuantizedEmbedding(*embed.shape, "Q6_K", blocks)
    return model


def step_and_reference(model, ids, pos, rows, cache_rows, cache_len):
    """Logits of one step through DecodeStep and through the reference modules (kernels off),
    each on its own copy of one cache, and both caches."""
    caches = [random_cache(model, cache_rows, cache_len) for _ in range(2)]
    step = DecodeStep.build(model, caches[0])
    assert step is not None and step.max_rows >= ids.numel()
    with torch.inference_mode():
        fused = step(ids, pos, rows)
        with kernels_off():
            plain = model(ids, pos, caches[1], rows=rows)
    return fused, plain, *caches


def assert_close_to_reference(fused, plain, dtype):
    assert fused.shape == plain.shape and fused.dtype == plain.dtype == dtype
    scale = plain.float().abs().max()
    if dtype == torch.float32:
        assert (fused - plain).abs().max() <= 1e-4 * scale
    else:  # the reference also rounds every dequantized weight to bf16; the kernels do not
        assert (fused.float() - plain.float()).abs().max() <= 16 * BF16_EPS * scale


@needs_kernels
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])  # one token per row, or a draft's run of them
def test_decode_step_over_quantized_weights_equals_the_reference(fmt, dtype, tokens):
    model = tiny_quantized(fmt, dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (3, tokens), generator=g)
    pos = torch.tensor([[4], [0], [9]]) + torch.arange(tokens)
    rows = torch.tensor([3, 0, 1])
    fused, plain, fused_cache, plain_cache = step_and_reference(model, ids, pos, rows, 4, 16)
    assert_close_to_reference(fused, plain, dtype)
    for a, b in zip(fused_cache.layers, plain_cache.layers, strict=True):
        assert_close_to_reference(a.k, b.k, dtype)  # written at the same places, the same values


@needs_kernels
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_over_k_quants_and_mixed_formats_equals_the_reference(mix, dtype):
    """Q4_K_M's mix (Q4_K, Q6_K where it puts them, a Q6_K embedding as the tied head) and an
    arbitrary mix with float matrices, on two threads."""
    model = mixed_model(mix, dtype)
    ids = torch.tensor([[5, 6], [600, 7]])
    pos = torch.tensor([[2, 3], [7, 8]])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused, plain, *_ = step_and_reference(model, ids, pos, None, 2, 12)
    finally:
        torch.set_num_threads(threads)
    assert_close_to_reference(fused, plain, dtype)


@needs_kernels
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_greedy_decoding_of_a_quantized_model_equals_the_reference(fmt):
    """The engine with its decode step (and quant.py's kernels in prefill) against plain torch's
    dequantize-and-matmul: the same tokens, speculative verification included."""
    model = tiny_quantized(fmt, torch.float32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 23, 9)]
    prompts[1] = prompts[1] + prompts[1]  # a repetition, so prompt lookup drafts
    params = SamplingParams(max_new_tokens=20)
    engine = Engine(model, max_batch_size=3, speculative=True)
    fast = engine.generate(prompts, params)
    assert engine._step is not None and engine.decode_stats.verify_steps > 0
    with kernels_off():
        plain = Engine(model, max_batch_size=3, speculative=False).generate(prompts, params)
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]


@needs_kernels
@isa_variants
def test_every_instruction_set_variant_reads_the_block_formats_the_same(flags, isa, monkeypatch):
    lib = variant_library(flags, isa)
    g = torch.Generator().manual_seed(isa)
    for fmt in FORMATS:
        f = quant.FORMATS[fmt]
        for m, n in ((1, 1), (3, 5), (5, 7), (9, 4)):
            w = random_blocks(n, 2 * f.block_size, fmt, g)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, 2 * f.block_size, generator=g).to(dtype)
                y = kernels._qgemv(lib, x, w, kernels.QUANT_FORMATS[fmt])
                assert_matmul_close(y, x, w, fmt)
    monkeypatch.setattr(kernels, "library", lambda: lib)
    for fmt in FORMATS:
        w = random_blocks(3, 512, fmt, g)
        want = quant.dequantize(w, fmt)
        assert torch.equal(kernels.dequantize(w, quant.FORMATS[fmt], torch.float32), want)
        assert torch.equal(
            kernels.dequantize(w, quant.FORMATS[fmt], torch.bfloat16), want.bfloat16()
        )
    for dtype in (torch.float32, torch.bfloat16):
        ids, pos = torch.tensor([[5, 9], [9, 1]]), torch.tensor([[3, 4], [6, 7]])
        fused, plain, *_ = step_and_reference(mixed_model("mixed", dtype), ids, pos, None, 2, 8)
        assert_close_to_reference(fused, plain, dtype)
