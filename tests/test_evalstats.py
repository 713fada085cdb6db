"""Bootstrap intervals, win rates and length controls of ``stackllama_ds.evaluation.stats`` against hand-computed values.

    python -m pytest tests/test_evalstats.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from stackllama_ds.evaluation.stats import (
    adversarial_accuracy_ci,
    adversarial_mask,
    bootstrap_mean_ci,
    bootstrap_ratio_ci,
    cluster_resample_idx,
    group_codes,
    length_baseline,
    length_baseline_ci,
    length_matched_mask,
    length_matched_win_rate_ci,
    rank_average,
    spearman,
    spearman_ci,
    win_outcomes,
    win_rate,
    win_rate_ci,
)


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


def test_ratio_of_sums_by_hand():
    # token-weighted mean loss: texts with summed NLL [2, 9, 1] over [1, 3, 1] tokens -> 12 / 5 = 2.4
    # (the unweighted mean of per-text means would be (2 + 3 + 1) / 3 = 2)
    num, den = np.array([2.0, 9.0, 1.0]), np.array([1.0, 3.0, 1.0])
    r, lo, hi = bootstrap_ratio_ci(num, den, 200, seed=5)
    assert r == 2.4
    idx = np.random.default_rng(5).integers(0, 3, size=(200, 3))  # the same resamples, by hand
    rb = np.sort(num[idx].sum(1) / den[idx].sum(1))
    assert (lo, hi) == tuple(np.percentile(rb, [2.5, 97.5]))
    assert 1.0 <= lo <= r <= hi <= 3.0  # each R_b is a weighted mean of per-text means 2, 3, 1
    assert bootstrap_ratio_ci([3.0, 6.0], [1.0, 2.0], 50, 0) == (3.0, 3.0, 3.0)  # equal per-text means
    with pytest.raises(ValueError, match="den"):
        bootstrap_ratio_ci([1.0], [0.0], 10, 0)


def test_length_baseline_by_hand():
    lc, lr = [10, 5, 7, 7], [3, 8, 7, 2]  # longer preferred: yes, no, tie, yes -> (2 + 0.5) / 4
    assert length_baseline(lc, lr) == 0.625
    assert length_baseline(lr, lc) == 0.375
    assert length_baseline([4, 4], [4, 4]) == 0.5  # all ties count half
    b, lo, hi = length_baseline_ci(lc, lr, 300, 2)
    assert b == 0.625 and 0.0 <= lo <= b <= hi <= 1.0
    assert (lo, hi) == win_rate_ci(lc, lr, 300, 2)[1:]


def test_adversarial_accuracy_by_hand():
    # pair:        0    1    2    3    4    5
    lc = np.array([10, 5, 7, 3, 2, 20])  # preferred answer's length
    lr = np.array([3, 8, 7, 9, 4, 1])  # other answer's length
    rc = np.array([0.1, 0.9, 0.3, 0.2, 0.5, 0.0])
    rr = np.array([0.5, 0.4, 0.3, 0.7, 0.5, 1.0])
    # preferred strictly shorter: pairs 1 (5<8), 3 (3<9), 4 (2<4); pair 2 (7 = 7) is in no subset
    assert adversarial_mask(lc, lr).tolist() == [False, True, False, True, True, False]
    # on them: 0.9 > 0.4 win, 0.2 < 0.7 loss, 0.5 = 0.5 tie -> (1 + 0 + 0.5) / 3 = 0.5
    acc, lo, hi, n = adversarial_accuracy_ci(rc, rr, lc, lr, 400, 1)
    assert (acc, n) == (0.5, 3)
    assert 0.0 <= lo <= acc <= hi <= 1.0
    assert (lo, hi) == win_rate_ci([0.9, 0.2, 0.5], [0.4, 0.7, 0.5], 400, 1)[1:]  # bootstrap over the subset
    # a length-only reward (r = length) scores exactly 0 there; over all pairs it is the length
    # baseline: longer preferred in pairs 0 and 5, pair 2 a tie -> (2 + 0.5) / 6
    assert adversarial_accuracy_ci(lc, lr, lc, lr, 100, 0)[:2] == (0.0, 0.0)
    assert length_baseline(lc, lr) == (2 + 0.5) / 6
    # empty subset: NaN figures, n = 0
    acc, lo, hi, n = adversarial_accuracy_ci([1.0], [0.0], [5], [5], 100, 0)
    assert n == 0 and all(np.isnan(v) for v in (acc, lo, hi))


def test_length_matched_win_rate_by_hand():
    la = [10, 10, 10, 100, 0, 0]
    lb = [8, 7, 12, 50, 0, 5]
    # |la - lb| <= 0.2 * max: 2 <= 2 yes; 3 > 2 no; 2 <= 2.4 yes; 50 > 20 no; 0 <= 0 yes; 5 > 1 no
    assert length_matched_mask(la, lb).tolist() == [True, False, True, False, True, False]
    a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    b = [0.0, 0.0, 3.0, 0.0, 9.0, 0.0]
    # on prompts 0, 2, 4: win, tie, loss -> (1 + 0.5 + 0) / 3 = 0.5 (all prompts: 4.5 / 6 = 0.75)
    w, lo, hi, n = length_matched_win_rate_ci(a, b, la, lb, 300, 4)
    assert (w, n) == (0.5, 3) and win_rate(a, b) == 0.75
    assert (lo, hi) == win_rate_ci([1.0, 3.0, 5.0], [0.0, 3.0, 9.0], 300, 4)[1:]
    # a looser tolerance admits (10, 7): 3 <= 0.3 * 10 -> a fourth prompt, a win -> 2.5 / 4
    w, _, _, n = length_matched_win_rate_ci(a, b, la, lb, 100, 0, tol=0.3)
    assert (w, n) == (0.625, 4)
    w, lo, hi, n = length_matched_win_rate_ci([1.0], [0.0], [10], [1], 100, 0)
    assert n == 0 and np.isnan(w)


def test_rank_average_and_spearman_by_hand():
    assert rank_average([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rank_average([7, 7, 7]).tolist() == [2.0, 2.0, 2.0]  # mean of 1, 2, 3
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 5, 2, -1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    # ties in x: rx = [1, 2.5, 2.5, 4], ry = [1, 2, 3, 4]; deviations dx = [-1.5, 0, 0, 1.5],
    # dy = [-1.5, -0.5, 0.5, 1.5]: sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.sqrt(0.9), rel=1e-12)
    # x = [3, 1, 4, 1, 5] -> rx = [3, 1.5, 4, 1.5, 5]; y = [9, 2, 6, 5, 3] -> ry = [5, 1, 4, 3, 2];
    # dx = [0, -1.5, 1, -1.5, 2], dy = [2, -2, 1, 0, -1]: sum dx dy = 0 + 3 + 1 + 0 - 2 = 2,
    # sum dx^2 = 9.5, sum dy^2 = 10 -> rho = 2 / sqrt(95)
    assert spearman([3, 1, 4, 1, 5], [9, 2, 6, 5, 3]) == pytest.approx(2 / np.sqrt(95), rel=1e-12)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant: undefined


def test_spearman_ci():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    rho, lo, hi = spearman_ci(x, y, 300, seed=3)
    assert rho == spearman(x, y) and -1.0 <= lo <= rho <= hi <= 1.0 and lo > 0
    assert spearman_ci(x, y, 300, seed=3) == (rho, lo, hi)
    # the same resamples, recomputed one by one
    idx = np.random.default_rng(3).integers(0, 50, size=(300, 50))
    rb = [spearman(x[i], y[i]) for i in idx]
    assert (lo, hi) == tuple(np.percentile(rb, [2.5, 97.5]))
    assert spearman_ci([1, 2, 3], [4, 5, 6], 100, 0) == (1.0, 1.0, 1.0)  # every defined resample is +1
    assert all(np.isnan(v) for v in spearman_ci([2, 2, 2], [1, 2, 3], 100, 0))


def test_cluster_bootstrap_by_hand():
    """2 questions, B = 5: redraw the group indices and take each resample's mean over its units."""
    x = [1.0, 0.0, 1.0, 1.0, 1.0]  # outcomes of 5 pairs
    groups = ["b", "b", "a", "a", "a"]  # question b (group 0: sum 1 over 2 pairs), a (group 1: 3 over 3)
    assert group_codes(groups, 5).tolist() == [0, 0, 1, 1, 1]  # numbered by first appearance
    gidx = np.random.default_rng(0).integers(0, 2, size=(5, 2))
    assert gidx.tolist() == [[1, 1], [1, 0], [0, 0], [0, 0], [0, 1]]  # numpy 2's generator
    assert [i.tolist() for i in cluster_resample_idx(groups, 5, 0)] == \
        [[2, 3, 4, 2, 3, 4], [2, 3, 4, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 2, 3, 4]]
    # means over the units drawn: 6/6, 4/5, 2/4, 2/4, 4/5 -> sorted [0.5, 0.5, 0.8, 0.8, 1.0];
    # percentile ranks 0.1 and 3.9: lo = 0.5, hi = 0.8 + 0.9 * (1.0 - 0.8) = 0.98
    mean, lo, hi = bootstrap_mean_ci(x, 5, 0, groups=groups)
    assert mean == 0.8 and lo == pytest.approx(0.5, rel=1e-12) and hi == pytest.approx(0.98, rel=1e-12)
    # a ratio of sums: num [2, 0, 3, 1, 1] over den [1, 1, 1, 1, 2]: group b (2, 2), a (5, 4)
    r, rlo, rhi = bootstrap_ratio_ci([2.0, 0.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 2.0], 5, 0, groups=groups)
    rb = np.sort([10 / 8, 7 / 6, 4 / 4, 4 / 4, 7 / 6])  # the same five resamples
    assert r == 7 / 6 and (rlo, rhi) == pytest.approx(tuple(np.percentile(rb, [2.5, 97.5])), rel=1e-12)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_mean_ci(x, 5, 0, groups=groups[:4])


def test_cluster_bootstrap_without_groups_or_one_unit_each_is_the_plain_one():
    rng = np.random.default_rng(9)
    x, d = rng.normal(size=23) ** 3, rng.integers(1, 9, size=23).astype(float)
    y = x + rng.normal(size=23)
    lc, lr = rng.integers(1, 30, size=23), rng.integers(1, 30, size=23)
    own = [f"q{k}" for k in rng.permutation(23)]  # distinct labels, not in sorted order
    for f, args in ((bootstrap_mean_ci, (x,)), (bootstrap_ratio_ci, (x, d)), (win_rate_ci, (x, y)),
                    (length_baseline_ci, (lc, lr)), (spearman_ci, (x, y)),
                    (adversarial_accuracy_ci, (x, y, lc, lr)), (length_matched_win_rate_ci, (x, y, lc, lr))):
        plain = f(*args, 300, 4)
        assert f(*args, 300, 4, groups=None) == plain, f.__name__
        assert f(*args, 300, 4, groups=own) == plain, f.__name__  # number for number


def test_cluster_bootstrap_resamples_questions():
    # 8 questions of 5 pairs each, every pair of a question with the same outcome: the pairs are
    # 8 draws, not 40, and the interval over questions is wider than the one over pairs
    o = np.repeat([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0], 5)
    q = np.repeat(np.arange(8), 5)
    _, lo, hi = bootstrap_mean_ci(o, 2000, 0)
    _, clo, chi = bootstrap_mean_ci(o, 2000, 0, groups=q)
    assert chi - clo > 1.5 * (hi - lo)
    # one question holding every adversarial pair: each resample draws that question -> no spread
    lc, lr = [1, 1, 9, 9], [5, 5, 2, 2]  # pairs 0, 1 adversarial, both of question "a"
    acc, lo, hi, n = adversarial_accuracy_ci([1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], lc, lr, 200, 0,
                                             groups=["a", "a", "b", "c"])
    assert (acc, lo, hi, n) == (0.5, 0.5, 0.5, 2)
    assert adversarial_accuracy_ci([1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], lc, lr, 200, 0)[1:3] == (0.0, 1.0)
