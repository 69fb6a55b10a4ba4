"""Unbiased pass@k (Chen et al. 2021, the HumanEval paper).

For a task with n samples of which c pass, the probability that at least one of k samples drawn
without replacement passes is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

(the product form avoids huge binomials). A task set's pass@k is the mean over tasks; it is only
defined when every task has n >= k samples, so `pass_at_k_table` reports only those k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over tasks of pass@k, from (n, c) per task."""
    if not counts:
        raise ValueError("no tasks to score")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def pass_at_k_table(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": value} for each k that every task has enough samples for."""
    n_min = min(n for n, _ in counts) if counts else 0
    return {f"pass@{k}": mean_pass_at_k(counts, k) for k in sorted(set(ks)) if 1 <= k <= n_min}
