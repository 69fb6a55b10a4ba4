"""The CPU decode kernels: same results as torch's ops, and an engine that decodes the same with
its decode step (kernels.step.DecodeStep) as through the model's modules. Quantized matrices:
tests/test_quant_kernels.py."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_support import BF16_EPS, isa_variants, needs_kernels, random_cache, variant_library

from codegemma import kernels
from codegemma.config import ModelConfig
from codegemma.engine import Engine, SamplingParams
from codegemma.kernels.step import DecodeStep
from codegemma.model import GemmaForCausalLM


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "library", lambda: None)


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), w.double())


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, kernels.MAX_ROWS[torch.float32]),
    n=st.integers(1, 70),
    k=st.integers(1, 300),  # not multiples of the vector width: the tails are exercised
    seed=st.integers(0, 2**16),
)
def test_gemv_fp32_matches_linear(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    y = kernels.gemv(x, w)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5 * k**0.5)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, kernels.MAX_ROWS[torch.bfloat16]),
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_gemv_bf16_is_one_rounding_of_the_exact_product(m, n, k, seed):
    """fp32 accumulation rounded once to bf16, as torch's bf16 linear: within half a bf16 ulp of
    the exact result (plus fp32 summation error), and at most one ulp from torch's answer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    y = kernels.gemv(x, w)
    assert y.dtype == torch.bfloat16
    exact = reference(x, w)
    assert ((y.double() - exact).abs() <= BF16_EPS * exact.abs() + 1e-5 * k).all()
    theirs = F.linear(x, w).double()
    assert ((y.double() - theirs).abs() <= 2 * BF16_EPS * theirs.abs() + 1e-5 * k).all()


@needs_kernels
@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    m=st.integers(2, kernels.MAX_ROWS[torch.float32]),
    n=st.integers(1, 13),  # blocks of 4 weight rows, and the rows left over
    k=st.integers(2048, 2100),  # long enough for the several-rows path, with tails
    seed=st.integers(0, 2**16),
)
def test_gemv_several_rows_against_long_weight_rows(dtype, m, n, k, seed):
    m = min(m, kernels.MAX_ROWS[dtype])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    exact = reference(x, w)
    err = (kernels.gemv(x, w).double() - exact).abs()
    eps = 1e-5 if dtype == torch.float32 else BF16_EPS
    assert (err <= eps * exact.abs() + 1e-5 * k).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_long_rows_like_7b_down_proj(dtype):
    """K = 24576 (7B's intermediate size) + a tail: rows longer than L1, every activation row."""
    g = torch.Generator().manual_seed(0)
    k = 24576 + 5
    x, w = torch.randn(kernels.MAX_ROWS[dtype], k, generator=g), torch.randn(9, k, generator=g)
    x, w = x.to(dtype), w.to(dtype)
    exact = reference(x, w)
    err = (kernels.gemv(x, w).double() - exact).abs()
    if dtype == torch.float32:
        assert err.max() < 1e-3
    else:
        assert (err <= BF16_EPS * exact.abs() + 1e-3).all()


@needs_kernels
def test_gemv_keeps_leading_dims_and_handles_empty_and_strided_input():
    x = torch.randn(2, 1, 40)[:, :, ::2]  # [2, 1, 20], not contiguous
    w = torch.randn(7, 20)
    torch.testing.assert_close(kernels.gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert kernels.gemv(torch.randn(1, 0), torch.randn(3, 0)).eq(0).all()
    assert kernels.gemv(torch.randn(1, 5), torch.randn(0, 5)).shape == (1, 0)


@needs_kernels
def test_gemv_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="one dtype"):
        kernels.gemv(torch.randn(1, 8), torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="fp32 or bf16"):
        kernels.gemv(torch.randn(1, 8).half(), torch.randn(4, 8).half())
    with pytest.raises(ValueError, match=r"got \(1, 8\) and \(4, 9\)"):
        kernels.gemv(torch.randn(1, 8), torch.randn(4, 9))
    for dtype, rows in kernels.MAX_ROWS.items():
        with pytest.raises(ValueError, match=f"<= {rows} rows"):
            kernels.gemv(torch.randn(rows + 1, 8).to(dtype), torch.randn(4, 8).to(dtype))


def test_gemv_without_kernels_says_so(no_kernels):
    with pytest.raises(RuntimeError, match="not available"):
        kernels.gemv(torch.randn(1, 8), torch.randn(4, 8))


def test_usable_refuses_grad_subclasses_devices_and_strides():
    x = torch.randn(2, 8)
    assert kernels.usable(x.t()) is None  # not contiguous
    assert kernels.usable(torch.randn(2, 8, requires_grad=True)) is None
    assert kernels.usable(x, torch.randn(2, 8, device="meta")) is None
    with torch.no_grad():
        p = torch.nn.Parameter(torch.randn(2, 8))
        assert kernels.usable(p) is kernels.library()  # the grad is off: allowed if available


def tiny_model(dtype: torch.dtype) -> GemmaForCausalLM:
    config = ModelConfig.preset("tiny").replace(num_attention_heads=4, num_key_value_heads=1)
    return GemmaForCausalLM(config).init_weights(std=0.3, seed=0).to(dtype).eval()


@pytest.fixture
def kernel_matmuls(monkeypatch):
    """The modules' matmuls through the same float kernel the decode step uses (where it takes
    the rows), so that a comparison of the two paths sees every other rounding."""
    linear = F.linear

    def via_kernel(x, w, bias=None):
        if (
            bias is None
            and x.dtype == w.dtype
            and x.numel() <= kernels.max_rows(x.dtype, x.shape[-1]) * x.shape[-1]
        ):
            return kernels.gemv(x, w)
        return linear(x, w, bias)

    monkeypatch.setattr(F, "linear", via_kernel)


def engine_without_step(monkeypatch) -> None:
    """Engines built from here on decode through the model's modules."""
    monkeypatch.setattr(DecodeStep, "build", classmethod(lambda cls, model, cache: None))


@needs_kernels
def test_engine_logits_and_greedy_decoding_are_the_same_with_and_without_kernels(monkeypatch):
    model = tiny_model(torch.float32)
    ids = torch.randint(
        3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)
    )
    prompts = [ids[0].tolist(), ids[0, :7].tolist()]
    params = SamplingParams(max_new_tokens=24)
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        model(ids[:, :-1], cache=cache)
        step = DecodeStep.build(model, cache)(ids[:, -1:], torch.tensor([[11]]), None)
        full = model(ids)[:, -1:]  # no cache, all torch
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    fused = Engine(model, max_batch_size=2).generate(prompts, params)
    monkeypatch.setattr(kernels, "library", lambda: None)
    plain = Engine(model, max_batch_size=2).generate(prompts, params)
    assert [r.token_ids for r in fused] == [r.token_ids for r in plain]


@needs_kernels
def test_bf16_decode_step_stays_within_bf16_error_of_fp32():
    fp32, bf16 = tiny_model(torch.float32), tiny_model(torch.bfloat16)
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        outs = []
        for m in (fp32, bf16):
            cache = m.new_cache(1, 16)
            m(ids[:, :-1], cache=cache)
            outs.append(DecodeStep.build(m, cache)(ids[:, -1:], torch.tensor([[8]]), None).float())
    ref, got = outs
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


@needs_kernels
@isa_variants
def test_every_instruction_set_variant_computes_the_same(flags, isa, monkeypatch):
    """The variants other CPUs get, built and run here (this CPU runs the lower ISAs too)."""
    lib = variant_library(flags, isa)
    g = torch.Generator().manual_seed(isa)
    long = [(3, 6, 16411), (1, 5, 9000)]  # rows longer than KLONG: two at a time, odd one alone
    for m, n, k in [(1, 1, 1), (3, 5, 17), (4, 33, 100), (16, 64, 256), (2, 7, 2053), *long]:
        for dtype in (torch.float32, torch.bfloat16):
            if m > kernels.MAX_ROWS[dtype]:
                continue
            x, w = (
                torch.randn(m, k, generator=g).to(dtype),
                torch.randn(n, k, generator=g).to(dtype),
            )
            exact = reference(x, w)
            err = (kernels._gemv(lib, x, w).double() - exact).abs()
            eps = 1e-5 if dtype == torch.float32 else BF16_EPS
            assert (err <= eps * exact.abs() + 1e-5 * k).all(), (isa, m, n, k, dtype)
    monkeypatch.setattr(kernels, "library", lambda: lib)  # the whole decode step, this variant
    for dtype in (torch.float32, torch.bfloat16):
        ids, pos = torch.tensor([[5], [9]]), torch.tensor([[3], [6]])
        fused, plain, *_ = decode_both(tiny_model(dtype), ids, pos, None, 2, 8)
        assert_logits_close(fused, plain, dtype)


def test_build_compiles_once_into_the_given_directory(tmp_path):
    if kernels.library() is None:
        pytest.skip("kernels unavailable here")
    first = kernels.build(tmp_path)
    assert first.exists() and first.parent.parent == tmp_path
    mtime = first.stat().st_mtime_ns
    assert kernels.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp files left


def test_build_reports_a_missing_or_failing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="compiling cpu.c with false failed"):
        kernels.build(tmp_path)
    assert not any(tmp_path.rglob("*.so")), "a failed build must leave nothing behind"
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    with pytest.raises(RuntimeError, match="no C compiler found"):
        kernels.build(tmp_path)


def test_kernels_off_by_environment_and_without_compiler_fall_back_quietly(tmp_path):
    """In a fresh process: CODEGEMMA_KERNELS=0, or a broken compiler, leaves plain torch."""
    code = (
        "import torch; from codegemma import kernels, load; "
        "from codegemma.config import ModelConfig; from codegemma.model import GemmaForCausalLM; "
        "from codegemma.kernels.step import DecodeStep; "
        "assert kernels.isa() is None and kernels.library() is None; "
        "m = GemmaForCausalLM(ModelConfig.preset('tiny')).eval(); "
        "assert DecodeStep.build(m, m.new_cache(1, 8)) is None; print('ok')"
    )
    for env in ({"CODEGEMMA_KERNELS": "0"}, {"CC": "false", "XDG_CACHE_HOME": str(tmp_path)}):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "ok"


# -- the whole decode step in one call (kernels.step.DecodeStep, built by the engine) ------------
def decode_both(model, ids, pos, rows, cache_rows, cache_len, seed=0):
    """One decode step by DecodeStep and through the modules, each on its own copy of the same
    cache: (step logits, module logits, step cache, module cache, the untouched original)."""
    caches = [random_cache(model, cache_rows, cache_len, seed) for _ in range(3)]
    step = DecodeStep.build(model, caches[0])
    assert step is not None, "no decode step for this model"
    with torch.inference_mode():
        fused = step(ids, pos, rows)
        plain = model(ids, pos, caches[1], rows=rows)
    return fused, plain, *caches


def assert_logits_close(fused, plain, dtype):
    assert fused.shape == plain.shape and fused.dtype == plain.dtype == dtype
    if dtype == torch.float32:  # the matmuls' and attention's sums differ in order: errors of
        # a few float32 ulps of the largest logit (2048-wide layers reach 1.6e-4 of 21)
        atol = max(1e-4, 1e-5 * plain.abs().max().item())
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=atol)
    else:  # a bf16 ulp in an attention output or gelu moves later roundings by an ulp or two
        scale = plain.float().abs().max()
        assert (fused.float() - plain.float()).abs().max() <= 8 * BF16_EPS * scale


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    heads=st.sampled_from([(4, 1), (4, 2), (2, 2), (6, 3)]),  # MQA, GQA, MHA
    head_dim=st.sampled_from([6, 16, 40, 72]),  # tails shorter than a vector, and longer
    batch=st.integers(1, 8),  # fp32: up to two passes of MCHUNK activation rows
    tokens=st.integers(1, 3),  # several tokens of one row: a draft being verified
    spare_rows=st.integers(0, 3),
    scattered=st.booleans(),
    cache_len=st.integers(3, 40),
    seed=st.integers(0, 2**16),
)
def test_decode_step_matches_the_modules(
    dtype, heads, head_dim, batch, tokens, spare_rows, scattered, cache_len, seed
):
    """Any rows of the cache (a slice, or scattered ids), each at its own positions (one token, or
    a run of them, each seeing those before it): the same logits as the module path, the same
    keys/values written at exactly (row, position) of every layer, and nothing else touched."""
    model_rows = kernels.max_rows(dtype, head_dim)
    batch = max(1, min(batch, model_rows // tokens))
    config = ModelConfig.preset("tiny").replace(
        num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=head_dim
    )
    model = GemmaForCausalLM(config).init_weights(std=0.3, seed=seed).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    cache_rows = batch + spare_rows
    if scattered:
        rows = torch.randperm(cache_rows, generator=g)[:batch]
    else:
        start = int(torch.randint(0, spare_rows + 1, (1,), generator=g))
        rows = slice(start, start + batch)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=g)
    first = torch.randint(0, cache_len - tokens + 1, (batch, 1), generator=g)
    pos = first + torch.arange(tokens)
    fused, plain, fused_cache, plain_cache, original = decode_both(
        model, ids, pos, rows, cache_rows, cache_len, seed
    )
    assert_logits_close(fused, plain, dtype)
    row_ids = torch.arange(cache_rows)[rows] if isinstance(rows, slice) else rows
    written = torch.zeros(cache_rows, cache_len, dtype=torch.bool)
    written[row_ids[:, None], pos] = True
    for i, (a, b, o) in enumerate(
        zip(fused_cache.layers, plain_cache.layers, original.layers, strict=True)
    ):
        for got, expected, before in ((a.k, b.k, o.k), (a.v, b.v, o.v)):
            mask = written[:, None, :, None].expand_as(got)
            assert torch.equal(got[~mask], before[~mask]), f"layer {i}: wrote outside its slots"
            assert_logits_close(got[mask], expected[mask], dtype)


@needs_kernels
@pytest.mark.parametrize("heads", [(4, 1), (4, 2)])
def test_decode_step_rounds_where_the_modules_round(heads, kernel_matmuls):
    """At position 0 attention reads one key (its softmax is exactly 1) and, with the modules'
    matmuls through the same kernel, every other piece is the same math in both paths, so in bf16
    only a tanh ulp could tell the two apart: the logits agree bit for bit (here all of them; a
    missing rounding, e.g. of gelu's output, changes most). This pins every rounding but those
    inside the softmax."""
    differ = []
    for seed in range(6):
        config = ModelConfig.preset("tiny").replace(
            num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=40
        )
        model = GemmaForCausalLM(config).init_weights(std=0.3, seed=seed).bfloat16().eval()
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (3, 1), generator=g)
        fused, plain, *_ = decode_both(
            model, ids, torch.zeros(3, 1, dtype=torch.long), None, 3, 8, seed
        )
        differ.append((fused != plain).float().mean().item())
    assert max(differ) <= 0.005, differ


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "hidden, intermediate, head_dim, batch",
    [(128, 8200, 32, 1), (128, 8200, 32, 3), (2048, 2048, 512, 3), (2048, 2048, 512, 8)],
)
def test_decode_step_with_a_team_of_threads_and_long_rows(
    dtype, hidden, intermediate, head_dim, batch
):
    """Layers large enough that the step runs on two threads, with long weight rows: down_proj's
    (8200 values: two at a time for one row, blocks of rows for several), or every matrix's (2048:
    blocks of rows, gate/up's product included, and up to MAX_ROWS_WIDE rows): as the modules."""
    config = ModelConfig.preset("tiny").replace(
        hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=1, head_dim=head_dim
    )
    model = GemmaForCausalLM(config).init_weights(std=0.1, seed=3).to(dtype).eval()
    ids = torch.randint(
        0, config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(3)
    )
    pos = (torch.arange(batch)[:, None] * 5 + 2) % 16
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused, plain, *_ = decode_both(model, ids, pos, None, batch, 16)
    finally:
        torch.set_num_threads(threads)
    assert_logits_close(fused, plain, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_decoding_is_the_same_with_the_step_and_through_the_modules(dtype, monkeypatch):
    model = tiny_model(dtype)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 11, 8)]
    params = SamplingParams(max_new_tokens=24)
    engine = Engine(model, max_batch_size=3)
    fused = engine.generate(prompts, params)
    assert engine._step is not None
    engine_without_step(monkeypatch)
    plain = Engine(model, max_batch_size=3).generate(prompts, params)
    assert [r.token_ids for r in fused] == [r.token_ids for r in plain]


@needs_kernels
def test_the_engine_follows_weights_changed_in_place_replaced_or_converted():
    """The engine's step reads weights changed in place as they are, and is rebuilt at the next
    prefill when the model's tensors were replaced (load_state_dict(assign=True), a new
    Parameter, .to()): each generation equals a fresh engine's."""
    model = tiny_model(torch.float32)
    prompts, params = [[2, 40, 41, 300, 7]], SamplingParams(max_new_tokens=12)
    engine = Engine(model, max_batch_size=1, prefix_cache=False)

    def check():
        ours = engine.generate(prompts, params)[0].token_ids
        assert ours == Engine(model, max_batch_size=1).generate(prompts, params)[0].token_ids
        return ours, engine._step

    first, step = check()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(3)  # in place: the same memory
    second, same = check()
    assert same is step and same.current(model, engine.cache)
    layer = model.model.layers[1].self_attn
    layer.o_proj.weight = torch.nn.Parameter(torch.randn_like(layer.o_proj.weight))  # replaced
    assert not step.current(model, engine.cache)
    third, rebuilt = check()
    assert rebuilt is not step
    assert len({tuple(first), tuple(second), tuple(third)}) == 3
    model.load_state_dict(
        {k: torch.randn_like(v) * 0.3 for k, v in model.state_dict().items()}, assign=True
    )
    check()
    model.to(torch.bfloat16)  # every parameter's .data replaced
    _, step = check()
    assert step.dtype == torch.bfloat16


@needs_kernels
def test_a_model_and_cache_copied_decode_the_same_with_their_own_step():
    model = tiny_model(torch.float32)
    cache = random_cache(model, 1, 8, seed=0)
    step = DecodeStep.build(model, cache)
    ids, pos = torch.tensor([[7]]), torch.tensor([[3]])
    with torch.inference_mode():
        step(ids, pos, None)
    model2, cache2 = copy.deepcopy((model, cache))
    assert copy.deepcopy(step) is None  # ctypes pointers are not copied: a copy builds its own
    assert not step.current(model2, cache2)
    step2 = DecodeStep.build(model2, cache2)
    with torch.inference_mode():
        assert torch.equal(step(ids, pos + 1, None), step2(ids, pos + 1, None))


def test_rows_the_kernel_takes_depend_on_the_dtype_and_the_row_length():
    assert kernels.max_rows(torch.bfloat16, 2047) == kernels.MAX_ROWS[torch.bfloat16] == 4
    assert kernels.max_rows(torch.bfloat16, 2048) == kernels.MAX_ROWS_WIDE[torch.bfloat16] == 8
    assert kernels.max_rows(torch.float32, 256) == 16 and kernels.max_rows(torch.half, 4096) == 0


@needs_kernels
def test_the_engine_steps_aside_where_the_kernel_must_not_run(monkeypatch):
    """More tokens than the step takes, fp16, a cache of another dtype, a layer with a bias: no
    step, or the modules for that forward; the tokens are the modules' either way."""
    calls = []
    call = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda *a: calls.append(a[1].numel()) or call(*a))
    fp16 = tiny_model(torch.half)
    assert DecodeStep.build(fp16, fp16.new_cache(1, 8)) is None
    model = tiny_model(torch.float32)
    assert DecodeStep.build(model, tiny_model(torch.bfloat16).new_cache(1, 8)) is None
    biased = tiny_model(torch.float32)
    down = biased.model.layers[0].mlp.down_proj
    down.bias = torch.nn.Parameter(torch.randn(down.out_features))  # not Gemma's: no kernel
    assert DecodeStep.build(biased, biased.new_cache(1, 8)) is None
    rows = kernels.max_rows(torch.bfloat16, 16) + 1
    prompts = [[2, 5 + i, 9] for i in range(rows)]
    params = SamplingParams(max_new_tokens=4, stop_token_ids=())
    for m, batch in ((fp16, 2), (biased, 2), (tiny_model(torch.bfloat16), rows)):
        engine = Engine(m, max_batch_size=batch, speculative=False)
        got = engine.generate(prompts, params)
        with monkeypatch.context() as mp:
            engine_without_step(mp)
            want = Engine(m, max_batch_size=batch).generate(prompts, params)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    # bf16 with rows sequences: every decode step had one token too many for the step
    assert not calls and engine._step is not None and engine.decode_stats.decode_steps == 3
    Engine(model, max_batch_size=1, speculative=False).generate([[2, 5]], params)
    assert calls == [1, 1, 1]  # the one-token steps after the prefill


@needs_kernels
def test_decode_step_rejects_out_of_range_input_and_writes_nothing():
    model = tiny_model(torch.float32)
    cache = random_cache(model, 2, 8, seed=0)
    step = DecodeStep.build(model, cache)
    before = [layer.k.clone() for layer in cache.layers]
    bad = [
        (torch.tensor([[1], [model.config.vocab_size]]), torch.tensor([[0], [1]]), None),
        (torch.tensor([[1], [2]]), torch.tensor([[0], [8]]), None),  # position == cache length
        (torch.tensor([[1], [2]]), torch.tensor([[0], [-1]]), None),
        (torch.tensor([[1], [2]]), torch.tensor([[0], [1]]), torch.tensor([0, 2])),  # no row 2
    ]
    with torch.inference_mode():
        for ids, pos, rows in bad:
            with pytest.raises(IndexError, match="decode step out of range"):
                step(ids, pos, rows)
        with pytest.raises(ValueError, match="at most 16 rows"):
            step(torch.ones(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long), None)
    assert all(torch.equal(layer.k, b) for layer, b in zip(cache.layers, before, strict=True))


# -- kernels.linear: torch's oneDNN GEMM where MKL's sgemm keeps to AVX2 -------------------------
def _ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.fixture
def onednn(monkeypatch):
    """kernels.linear with the oneDNN choice forced on (where torch has oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setenv("CODEGEMMA_ONEDNN", "1")
    kernels.onednn_fp32.cache_clear()
    yield
    monkeypatch.undo()
    kernels.onednn_fp32.cache_clear()


def test_linear_by_onednn_is_f_linear(onednn) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(768, 192, generator=g)
    x = torch.randn(4, 48, 384, generator=g)[..., ::2]  # [4, 48, 192], not contiguous
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: kernels.linear(x, w))
        out = kernels.linear(x, w)
    assert out.shape == (4, 48, 768) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_keeps_f_linear_for_autograd_small_products_and_other_dtypes(onednn) -> None:
    w = torch.randn(768, 192, requires_grad=True)
    x = torch.randn(64, 192)
    out = kernels.linear(x, w)  # autograd: torch's op, whose backward exists
    assert torch.equal(out, F.linear(x, w))
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(768, 192))
    with torch.no_grad():
        small = x[:8]  # 8 x 192 x 768 multiply-adds: below ONEDNN_MIN_MACS
        assert kernels.ONEDNN_MIN_MACS > 8 * 192 * 768
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: kernels.linear(small, w))
        doubles = x.double(), w.double()
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: kernels.linear(*doubles))
        assert "mkldnn::_linear_pointwise" in _ops(lambda: kernels.linear(x, w))


def test_onednn_choice_follows_the_cpu(monkeypatch) -> None:
    amd = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f"
    cases = [
        (amd, None, True),
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2", None, False),  # no AVX-512: MKL's AVX2
        ("vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f", None, False),  # MKL's AVX-512
        ("flags\t\t: fpu avx512f", None, False),  # vendor unknown
        (amd, "0", False),
        ("vendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f", "1", True),
    ]
    try:
        for key, forced, want in cases:
            monkeypatch.setattr(kernels, "_cpu_key", lambda k=key: k)
            if forced is None:
                monkeypatch.delenv("CODEGEMMA_ONEDNN", raising=False)
            else:
                monkeypatch.setenv("CODEGEMMA_ONEDNN", forced)
            kernels.onednn_fp32.cache_clear()
            assert kernels.onednn_fp32() is (want and torch.backends.mkldnn.is_available()), key
    finally:
        monkeypatch.undo()
        kernels.onednn_fp32.cache_clear()


def test_model_matmuls_go_through_linear(onednn, monkeypatch) -> None:
    """Every float matmul of the model (projections, MLP, tied head) is kernels.linear's: with
    oneDNN chosen, a prefill runs no MKL GEMM and gives the logits of F.linear's model."""
    model = GemmaForCausalLM(ModelConfig.preset("mini")).init_weights(std=0.1, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 96), generator=g)
    with torch.inference_mode():
        ops = _ops(lambda: model(ids))
        fast = model(ids)
    assert "mkldnn::_linear_pointwise" in ops and "aten::mm" not in ops, ops
    monkeypatch.setenv("CODEGEMMA_ONEDNN", "0")
    kernels.onednn_fp32.cache_clear()
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: model(ids))
        torch.testing.assert_close(fast, model(ids), rtol=1e-4, atol=1e-4)
