"""What the kernel tests share: the skip where no kernels build, bf16's precision, and the
instruction-set variants that other CPUs get, built and run here (this CPU runs the lower ISAs)."""

from __future__ import annotations

import pytest
import torch

from codegemma import kernels

needs_kernels = pytest.mark.skipif(
    kernels.library() is None, reason="kernels unavailable here (no C compiler or not x86-64)"
)
BF16_EPS = 2.0**-8  # bf16 has 8 bits of precision: round-to-nearest is within half of 2^-7

# (extra compiler flags, the ISA id the build must report)
isa_variants = pytest.mark.parametrize(
    "flags, isa", [(("-mno-avx512bf16",), 2), (("-mno-avx512f",), 1)], ids=["avx512", "avx2"]
)


def variant_library(flags: tuple[str, ...], isa: int) -> kernels._Library:
    """The kernels built with `flags` (cached like the default build); skips where this CPU's
    default build already is that variant."""
    if isa >= kernels.library().isa:
        pytest.skip("this CPU builds that variant by default (tested above)")
    lib = kernels._Library(kernels.build(extra_flags=flags))
    assert lib.isa == isa
    return lib


def random_cache(model, rows: int, length: int, seed: int = 0):
    """A cache full of random keys and values (as if earlier tokens had been prefilled)."""
    cache = model.new_cache(rows, length)
    g = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        for buf in (layer.k, layer.v):
            buf.copy_(torch.randn(buf.shape, generator=g))
    return cache
