"""The lr schedule: linear warmup to the peak, cosine down to min_lr_ratio * peak."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codegemma.train.schedule import lr_at

schedules = st.builds(
    dict,
    peak_lr=st.floats(1e-6, 1.0),
    warmup_steps=st.integers(0, 50),
    total_steps=st.integers(1, 500),
    min_lr_ratio=st.floats(0.0, 1.0),
)


@given(schedules)
def test_warmup_rises_linearly_then_cosine_falls_to_the_floor(s):
    lrs = [lr_at(i, **s) for i in range(max(s["total_steps"], s["warmup_steps"]) + 10)]
    peak, floor, w = s["peak_lr"], s["peak_lr"] * s["min_lr_ratio"], s["warmup_steps"]
    for i in range(w):
        assert lrs[i] == pytest.approx(peak * (i + 1) / w)
    after = lrs[w:]
    eps = 1e-12 * peak
    assert all(a >= b - eps for a, b in zip(after, after[1:], strict=False))  # non-increasing
    assert all(0 < x <= peak + eps for x in lrs[:w])
    assert all(floor - eps <= x <= peak + eps for x in after)
    assert after[0] == pytest.approx(peak)
    if s["total_steps"] > w:
        assert lrs[s["total_steps"]] == pytest.approx(floor)  # and it stays there
        assert lrs[-1] == pytest.approx(floor)


def test_known_values():
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.0)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_at(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, peak_lr=1.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.1)
