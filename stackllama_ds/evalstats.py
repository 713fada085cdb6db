"""Statistics for ``stackllama-ds eval``: bootstrap intervals and pairwise win rates (numpy only).

    python -c "from stackllama_ds.evalstats import win_rate; print(win_rate([3, 1, 2, 5], [1, 1, 4, 0]))"

Pure functions of their arguments; randomness comes only from ``numpy.random.default_rng(seed)``,
so the same scores and seed give the same interval. Intervals are percentile bootstrap intervals
(Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13) over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_mean_ci", "win_outcomes", "win_rate", "win_rate_ci"]

ArrayLike = Sequence[float] | np.ndarray


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: non-finite values")
    return a


def bootstrap_mean_ci(x: ArrayLike, n_boot: int, seed: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean of ``x`` with a percentile bootstrap (1 - alpha) interval.

    Formula: draw B resamples of n indices with replacement, idx_b ~ Uniform{0..n-1}^n, from
    ``rng = default_rng(seed)`` as one ``rng.integers(0, n, size=(B, n))`` call; then
        m_b = mean(x[idx_b])                       b = 1..B
        lo  = percentile(m, 100 * alpha / 2)       hi = percentile(m, 100 * (1 - alpha / 2))
    with numpy's default (linear) percentile interpolation. Means are computed as
    x_0 + mean((x - x_0)[idx_b]), the same number up to rounding, so that a constant ``x`` gives
    exactly (c, c, c).

    Args:
        x: (n,) per-prompt values, n >= 1, finite.
        n_boot: B, the number of resamples (>= 1).
        seed: seed of the numpy generator.
        alpha: 1 - coverage; 0.05 gives a 95% interval.

    Returns:
        (mean, lo, hi) as floats.
    """
    a = _as_1d(x, "x")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))  # (B, n)
    shift = a - a[0]  # exactly 0 for a constant x
    mean = a[0] + shift.mean()
    means = a[0] + shift[idx].mean(axis=1)  # (B,) m_b = mean(x[idx_b])
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(mean), float(lo), float(hi)


def win_outcomes(a_scores: ArrayLike, b_scores: ArrayLike) -> np.ndarray:
    """Per-prompt outcome of A against B: 1 if A's score is higher, 0.5 on a tie, 0 if lower.

    Formula: o_i = 1[a_i > b_i] + 0.5 * 1[a_i == b_i]

    Args:
        a_scores: (n,) scores of model A's responses, one per prompt.
        b_scores: (n,) scores of model B's responses to the same prompts, same order.

    Returns:
        (n,) float64 outcomes in {0, 0.5, 1}.
    """
    a, b = _as_1d(a_scores, "a_scores"), _as_1d(b_scores, "b_scores")
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.size} vs {b.size}")
    return (a > b).astype(np.float64) + 0.5 * (a == b)  # 1[a > b] + 0.5 * 1[a == b]


def win_rate(a_scores: ArrayLike, b_scores: ArrayLike) -> float:
    """Share of prompts where A's response outscores B's; a tie counts as half a win.

    Formula: W = (1/n) * sum_i (1[a_i > b_i] + 0.5 * 1[a_i == b_i]);  W(A, B) + W(B, A) = 1.
    Example: a = [3, 1, 2, 5], b = [1, 1, 4, 0] -> 2 wins, 1 tie, 1 loss -> 2.5 / 4 = 0.625.

    Args:
        a_scores: (n,) scores of A, one per prompt.
        b_scores: (n,) scores of B on the same prompts.

    Returns:
        W in [0, 1].
    """
    o = win_outcomes(a_scores, b_scores)
    wins, ties = int((o == 1.0).sum()), int((o == 0.5).sum())
    return (wins + 0.5 * ties) / o.size  # one rounding: (#wins + #ties / 2) / n


def win_rate_ci(
    a_scores: ArrayLike, b_scores: ArrayLike, n_boot: int, seed: int, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Win rate of A over B with a paired percentile bootstrap interval over prompts.

    Formula: o_i = 1[a_i > b_i] + 0.5 * 1[a_i == b_i]; W = mean(o); resampling prompts (the pair
    (a_i, b_i) stays together) is resampling o, so (lo, hi) is the interval of
    ``bootstrap_mean_ci(o, n_boot, seed, alpha)``; W itself is ``win_rate(a, b)``.

    Args:
        a_scores: (n,) scores of A, one per prompt.
        b_scores: (n,) scores of B on the same prompts.
        n_boot: number of resamples.
        seed: seed of the numpy generator.
        alpha: 1 - coverage.

    Returns:
        (W, lo, hi), all in [0, 1].
    """
    _, lo, hi = bootstrap_mean_ci(win_outcomes(a_scores, b_scores), n_boot, seed, alpha)
    return win_rate(a_scores, b_scores), lo, hi
