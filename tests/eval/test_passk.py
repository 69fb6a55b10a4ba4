"""pass@k against the closed form and at its edges."""

from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codegemma.eval.passk import mean_pass_at_k, pass_at_k, pass_at_k_table


@st.composite
def nck(draw):
    n = draw(st.integers(1, 60))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@given(nck())
def test_matches_closed_form(t):
    n, c, k = t
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


@given(nck())
def test_bounds_and_edges(t):
    n, c, k = t
    v = pass_at_k(n, c, k)
    assert 0.0 <= v <= 1.0
    assert (v == 0.0) == (c == 0)
    if c == n or n - c < k:
        assert v == 1.0


@given(nck())
def test_monotone_in_c_and_k(t):
    n, c, k = t
    if c < n:
        assert pass_at_k(n, c + 1, k) >= pass_at_k(n, c, k) - 1e-12
    if k < n:
        assert pass_at_k(n, c, k + 1) >= pass_at_k(n, c, k) - 1e-12


def test_pass_at_1_is_the_pass_rate():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 5) == 1.0
    assert pass_at_k(2, 1, 2) == 1.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="no tasks"):
        mean_pass_at_k([], 1)


def test_table_reports_only_k_at_most_n():
    counts = [(5, 1), (5, 5), (3, 0)]
    table = pass_at_k_table(counts, [1, 3, 5, 10])
    assert set(table) == {"pass@1", "pass@3"}
    assert table["pass@1"] == pytest.approx((0.2 + 1.0 + 0.0) / 3)
