"""Bootstrap intervals and win rates of ``stackllama_ds.evalstats`` against hand-computed values.

    python -m pytest tests/test_evalstats.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from stackllama_ds.evalstats import bootstrap_mean_ci, win_outcomes, win_rate, win_rate_ci


def test_win_rate_by_hand():
    a, b = [3, 1, 2, 5], [1, 1, 4, 0]  # win, tie, loss, win -> (2 + 0.5) / 4
    assert win_outcomes(a, b).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert win_rate(a, b) == 0.625
    assert win_rate(b, a) == 0.375  # W(A, B) + W(B, A) = 1
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5  # all ties
    assert win_rate([2.0], [1.0]) == 1.0 and win_rate([1.0], [2.0]) == 0.0


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="non-empty"):
        win_rate([], [])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_mean_ci([1.0, float("nan")], 10, 0)


def test_constant_array_gives_degenerate_interval():
    for c in (2.0, 0.1, -3.7):
        mean, lo, hi = bootstrap_mean_ci([c] * 7, 200, seed=3)
        assert mean == lo == hi  # exactly: no rounding noise can put the mean outside
        assert mean == pytest.approx(c, rel=1e-15)
    assert bootstrap_mean_ci([2.0] * 5, 50, 0) == (2.0, 2.0, 2.0)


def test_percentile_interval_by_hand():
    """Tiny B: redraw the same indices from the same generator and interpolate the percentiles by hand."""
    x = np.array([1.0, 2.0, 3.0, 10.0])
    idx = np.random.default_rng(0).integers(0, 4, size=(5, 4))  # numpy 2: [[3,2,2,1],[1,0,0,0],[0,3,2,3],...]
    m = np.sort(x[idx].mean(axis=1))  # numpy 2: [1.25, 4.5, 4.75, 4.75, 6.0]
    # Linear interpolation at rank p/100 * (B - 1): 2.5% -> 0.1, 97.5% -> 3.9.
    lo = m[0] + 0.1 * (m[1] - m[0])
    hi = m[3] + 0.9 * (m[4] - m[3])
    mean, got_lo, got_hi = bootstrap_mean_ci(x, n_boot=5, seed=0)
    assert mean == 4.0
    assert got_lo == pytest.approx(lo, rel=1e-12) and got_hi == pytest.approx(hi, rel=1e-12)


def test_interval_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(123)
    for n in (3, 10, 64):
        x = rng.normal(size=n) ** 3  # skewed
        mean, lo, hi = bootstrap_mean_ci(x, 1000, seed=7)
        assert lo <= mean <= hi
        assert mean == pytest.approx(x.mean())
        assert bootstrap_mean_ci(x, 1000, seed=7) == (mean, lo, hi)
        if n > 3:  # with n = 3 both seeds give [min, max] (each all-one-value resample has p = 1/27)
            assert bootstrap_mean_ci(x, 1000, seed=8) != (mean, lo, hi)
    # a 90% interval sits inside the 95% one (same resamples)
    x = rng.normal(size=30)
    _, lo95, hi95 = bootstrap_mean_ci(x, 2000, 1, alpha=0.05)
    _, lo90, hi90 = bootstrap_mean_ci(x, 2000, 1, alpha=0.10)
    assert lo95 <= lo90 <= hi90 <= hi95


def test_win_rate_ci_is_paired_bootstrap_of_outcomes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40) - 0.5
    rate, lo, hi = win_rate_ci(a, b, 500, seed=11)
    assert rate == win_rate(a, b)
    assert 0.0 <= lo <= rate <= hi <= 1.0
    mean, blo, bhi = bootstrap_mean_ci(win_outcomes(a, b), 500, 11)
    assert (lo, hi) == (blo, bhi) and mean == pytest.approx(rate, rel=1e-12)
    # swapping A and B mirrors the interval: o'_i = 1 - o_i on the same resamples
    r2, lo2, hi2 = win_rate_ci(b, a, 500, seed=11)
    assert r2 == pytest.approx(1 - rate) and lo2 == pytest.approx(1 - hi) and hi2 == pytest.approx(1 - lo)
    assert win_rate_ci([1.0] * 5, [0.0] * 5, 100, 0) == (1.0, 1.0, 1.0)
