"""Statistics for ``stackllama-ds eval``: bootstrap intervals, win rates, length controls (numpy only).

    python -c "from stackllama_ds.evaluation.stats import win_rate; print(win_rate([3, 1, 2, 5], [1, 1, 4, 0]))"

Pure functions of their arguments; randomness comes only from ``numpy.random.default_rng(seed)``,
so the same scores and seed give the same interval. Intervals are percentile bootstrap intervals
(Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13) over the resampled units
(prompts, held-out texts or preference pairs); every ``*_ci`` function draws its resamples as one
``default_rng(seed).integers(0, n, size=(B, n))`` call, so two figures on the same units and seed
use the same resamples. A figure on an empty subset is NaN (the caller writes null).

Clustered units (held-out preference pairs: up to ``max_pairs_per_question`` pairs of one question)
are not independent draws; given ``groups`` (one label per unit, e.g. "site/qid"), every ``*_ci``
function runs a cluster bootstrap instead (Davison & Hinkley, "Bootstrap Methods and their
Application", 1997, sec. 3.8): it resamples the G distinct groups with replacement, one
``default_rng(seed).integers(0, G, size=(B, G))`` call, and each resample takes every unit of the
groups drawn; a mean is then the ratio sum of outcomes / number of units of the resample
(``cluster_resample_idx``). One unit per group is the plain bootstrap, number for number.

Length controls (a reward model can learn "longer is better" and PPO can exploit it):
    length_baseline           share of pairs where the longer answer is the preferred one
    adversarial_accuracy_ci   RM accuracy on pairs whose preferred answer is the shorter one
    length_matched_win_rate_ci  win rate on prompts whose two responses have similar lengths
    spearman_ci               rank correlation of reward with response length
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = [
    "adversarial_accuracy_ci",
    "adversarial_mask",
    "bootstrap_mean_ci",
    "bootstrap_ratio_ci",
    "cluster_resample_idx",
    "group_codes",
    "length_baseline",
    "length_baseline_ci",
    "length_matched_mask",
    "length_matched_win_rate_ci",
    "pair_figures",
    "rank_average",
    "spearman",
    "spearman_ci",
    "win_outcomes",
    "win_rate",
    "win_rate_ci",
]

ArrayLike = Sequence[float] | np.ndarray
Groups = Sequence[Hashable] | np.ndarray | None  # one label per unit; None: every unit is its own


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: non-finite values")
    return a


def _resample_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(B, n) bootstrap indices, idx_b ~ Uniform{0..n-1}^n: one ``default_rng(seed).integers`` call."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def group_codes(groups: Sequence[Hashable] | np.ndarray, n: int) -> np.ndarray:
    """(n,) int64 group numbers 0..G-1 of the units, numbered in order of first appearance.

    Example: ["b", "a", "b", "c"] -> [0, 1, 0, 2]. A unit per group (all labels distinct) numbers
    the units 0..n-1 in their own order, so a cluster resample of them is the plain one.
    """
    g = np.asarray(groups)
    if g.ndim != 1 or g.size != n:
        raise ValueError(f"groups: expected one label per unit ({n}), got shape {g.shape}")
    _, first, inv = np.unique(g, return_index=True, return_inverse=True)
    number = np.empty(first.size, dtype=np.int64)
    number[np.argsort(first)] = np.arange(first.size)  # sorted-label order -> first-appearance order
    return number[inv.reshape(-1)]


def cluster_resample_idx(groups: Sequence[Hashable] | np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Unit indices of B cluster-bootstrap resamples: G groups drawn with replacement, all units of each.

    Formula: c = group_codes(groups) (groups numbered 0..G-1 by first appearance);
        gidx = default_rng(seed).integers(0, G, size=(B, G))       one call, as ``_resample_idx(G, B, seed)``
        resample_b = concat_{k = 1..G} [i : c_i = gidx[b, k]]      (a group's units in their order)
    so resample b has sum_k |group gidx[b, k]| units (not always n). The ``*_ci`` functions compute
    the same resamples' sums from per-group sums without building these lists.

    Returns:
        B int64 index arrays into the units.
    """
    codes = group_codes(groups, len(groups))
    members = [np.flatnonzero(codes == g) for g in range(int(codes.max()) + 1)]  # units of each group
    gidx = _resample_idx(len(members), n_boot, seed)  # (B, G)
    return [np.concatenate([members[g] for g in row]) for row in gidx]


def _resample_sums(cols: list[np.ndarray], n_boot: int, seed: int, groups: Groups) -> list[np.ndarray]:
    """(B,) sums of each (n,) column over the units of every resample: plain or clustered.

    Formula: plain: S_b = sum_k col[idx_b,k], idx = _resample_idx(n, B, seed);
    clustered: per-group sums T_g = sum_{i : c_i = g} col_i, gidx = _resample_idx(G, B, seed),
    S_b = sum_k T[gidx_b,k]: the sum over every unit of the groups drawn (``cluster_resample_idx``).
    """
    if groups is None:
        idx = _resample_idx(cols[0].size, n_boot, seed)  # (B, n)
        return [c[idx].sum(axis=1) for c in cols]
    codes = group_codes(groups, cols[0].size)
    G = int(codes.max()) + 1
    gidx = _resample_idx(G, n_boot, seed)  # (B, G): the groups of each resample
    return [np.bincount(codes, weights=c, minlength=G)[gidx].sum(axis=1) for c in cols]  # T_g, then S_b


def _percentiles(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """(lo, hi) = percentiles 100*alpha/2 and 100*(1 - alpha/2) of ``values`` (linear interpolation)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def _pair(x: ArrayLike, y: ArrayLike, nx: str, ny: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d(x, nx), _as_1d(y, ny)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {nx} {a.size} vs {ny} {b.size}")
    return a, b


NAN = float("nan")


def bootstrap_mean_ci(x: ArrayLike, n_boot: int, seed: int, alpha: float = 0.05, *,
                      groups: Groups = None) -> tuple[float, float, float]:
    """Mean of ``x`` with a percentile bootstrap (1 - alpha) interval, over units or over their groups.

    Formula: draw B resamples of n indices with replacement, idx_b ~ Uniform{0..n-1}^n, from
    ``rng = default_rng(seed)`` as one ``rng.integers(0, n, size=(B, n))`` call; then
        m_b = mean(x[idx_b])                       b = 1..B
        lo  = percentile(m, 100 * alpha / 2)       hi = percentile(m, 100 * (1 - alpha / 2))
    with numpy's default (linear) percentile interpolation. Means are computed as
    x_0 + mean((x - x_0)[idx_b]), the same number up to rounding, so that a constant ``x`` gives
    exactly (c, c, c).
    With ``groups`` (cluster bootstrap): gidx = default_rng(seed).integers(0, G, size=(B, G)) over
    the G groups (numbered by first appearance), and
        m_b = sum_k sum_{i in group gidx_bk} x_i / sum_k |group gidx_bk|
    the mean over every unit of the groups drawn (a ratio: the number of units varies). The point
    figure is still mean(x).

    Args:
        x: (n,) per-unit values, n >= 1, finite.
        n_boot: B, the number of resamples (>= 1).
        seed: seed of the numpy generator.
        alpha: 1 - coverage; 0.05 gives a 95% interval.
        groups: (n,) group label of each unit (e.g. the question of a preference pair); None: the
            units are resampled alone.

    Returns:
        (mean, lo, hi) as floats.
    """
    a = _as_1d(x, "x")
    shift = a - a[0]  # exactly 0 for a constant x
    mean = a[0] + shift.mean()
    if groups is None:
        idx = _resample_idx(a.size, n_boot, seed)  # (B, n)
        means = a[0] + shift[idx].mean(axis=1)  # (B,) m_b = mean(x[idx_b])
    else:
        s, k = _resample_sums([shift, np.ones_like(a)], n_boot, seed, groups)
        means = a[0] + s / k  # (B,) m_b = sum of x over the resample's units / their number
    lo, hi = _percentiles(means, alpha)
    return float(mean), lo, hi


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
    a_scores: ArrayLike, b_scores: ArrayLike, n_boot: int, seed: int, alpha: float = 0.05, *, groups: Groups = None
) -> tuple[float, float, float]:
    """Win rate of A over B with a paired percentile bootstrap interval over prompts.

    Formula: o_i = 1[a_i > b_i] + 0.5 * 1[a_i == b_i]; W = mean(o); resampling prompts (the pair
    (a_i, b_i) stays together) is resampling o, so (lo, hi) is the interval of
    ``bootstrap_mean_ci(o, n_boot, seed, alpha, groups=groups)``; W itself is ``win_rate(a, b)``.

    Args:
        a_scores: (n,) scores of A, one per prompt.
        b_scores: (n,) scores of B on the same prompts.
        n_boot: number of resamples.
        seed: seed of the numpy generator.
        alpha: 1 - coverage.
        groups: (n,) group labels: resample groups (cluster bootstrap), as in ``bootstrap_mean_ci``.

    Returns:
        (W, lo, hi), all in [0, 1].
    """
    _, lo, hi = bootstrap_mean_ci(win_outcomes(a_scores, b_scores), n_boot, seed, alpha, groups=groups)
    return win_rate(a_scores, b_scores), lo, hi


def bootstrap_ratio_ci(
    num: ArrayLike, den: ArrayLike, n_boot: int, seed: int, alpha: float = 0.05, *, groups: Groups = None
) -> tuple[float, float, float]:
    """Ratio of sums sum(num) / sum(den) with a percentile bootstrap interval over units.

    Formula: R = sum_i num_i / sum_i den_i;  R_b = sum(num[idx_b]) / sum(den[idx_b]), idx_b drawn as
    in ``bootstrap_mean_ci``; (lo, hi) = percentiles of R_b. A token-weighted mean loss is this with
    num_i = summed NLL of text i and den_i = its token count: every token counts alike, and the
    resampled unit is the text (tokens of one text are not independent).
    With ``groups``: R_b = sum of num / sum of den over every unit of the groups drawn (cluster
    bootstrap, as in ``bootstrap_mean_ci``).

    Args:
        num: (n,) numerators, finite.
        den: (n,) denominators, every one > 0.
        n_boot, seed, alpha, groups: as in ``bootstrap_mean_ci``.

    Returns:
        (R, lo, hi) as floats.
    """
    a, d = _pair(num, den, "num", "den")
    if np.any(d <= 0):
        raise ValueError("den: every denominator must be > 0")
    s_num, s_den = _resample_sums([a, d], n_boot, seed, groups)
    ratios = s_num / s_den  # (B,) R_b
    lo, hi = _percentiles(ratios, alpha)
    return float(a.sum() / d.sum()), lo, hi


def length_baseline(len_chosen: ArrayLike, len_rejected: ArrayLike) -> float:
    """Accuracy of the length-only reward "the longer answer is better" on preference pairs.

    Formula: L = (1/n) * sum_i (1[lc_i > lr_i] + 0.5 * 1[lc_i == lr_i]) = win_rate(lc, lr).
    Example: lc = [10, 5, 7, 7], lr = [3, 8, 7, 2] -> 1 + 0 + 0.5 + 1 = 2.5 / 4 = 0.625.
    A reward model whose accuracy is not above L may have learned length and little else.

    Args:
        len_chosen: (n,) lengths of the preferred answers (tokens).
        len_rejected: (n,) lengths of the other answers, same pairs.

    Returns:
        L in [0, 1].
    """
    return win_rate(len_chosen, len_rejected)


def length_baseline_ci(
    len_chosen: ArrayLike, len_rejected: ArrayLike, n_boot: int, seed: int, alpha: float = 0.05, *,
    groups: Groups = None,
) -> tuple[float, float, float]:
    """``length_baseline`` with a percentile bootstrap interval over pairs (= ``win_rate_ci(lc, lr)``).

    Formula: o_i = 1[lc_i > lr_i] + 0.5 * 1[lc_i == lr_i]; L = mean(o); (lo, hi) from resampled o,
    over pairs or, with ``groups`` (the pairs' questions), over questions.

    Returns:
        (L, lo, hi).
    """
    return win_rate_ci(len_chosen, len_rejected, n_boot, seed, alpha, groups=groups)


def _win_rate_on(a: np.ndarray, b: np.ndarray, m: np.ndarray, n_boot: int, seed: int, alpha: float,
                 groups: Groups) -> tuple[float, float, float, int]:
    """``win_rate_ci`` of ``a`` over ``b`` on the units where ``m`` holds, and their number;
    (nan, nan, nan, 0) when there are none."""
    if m.shape != a.shape:
        raise ValueError(f"lengths and scores differ in length: {m.size} vs {a.size}")
    n = int(m.sum())
    if n == 0:
        return NAN, NAN, NAN, 0
    sub = None if groups is None else np.asarray(groups)[m]
    return (*win_rate_ci(a[m], b[m], n_boot, seed, alpha, groups=sub), n)


def adversarial_mask(len_chosen: ArrayLike, len_rejected: ArrayLike) -> np.ndarray:
    """(n,) bool: the length-adversarial pairs, whose preferred answer is strictly the shorter one.

    Formula: m_i = 1[lc_i < lr_i]. On these pairs "longer is better" scores exactly 0, so accuracy
    there is what the reward model knows beyond length. Pairs of equal length are in neither side.
    """
    lc, lr = _pair(len_chosen, len_rejected, "len_chosen", "len_rejected")
    return lc < lr


def adversarial_accuracy_ci(
    r_chosen: ArrayLike, r_rejected: ArrayLike, len_chosen: ArrayLike, len_rejected: ArrayLike,
    n_boot: int, seed: int, alpha: float = 0.05, *, groups: Groups = None,
) -> tuple[float, float, float, int]:
    """Reward-model accuracy on the length-adversarial pairs, with its interval and size.

    Formula: S = {i : lc_i < lr_i};  A_adv = (1/|S|) * sum_{i in S} (1[rc_i > rr_i] + 0.5 * 1[rc_i == rr_i]);
    (lo, hi): percentile bootstrap over the |S| pairs of S (conditional on the subset); with
    ``groups``, over the groups that hold a pair of S, each drawn with its pairs in S.
    Example: lc = [2, 5, 9], lr = [4, 3, 9], rc = [1, 0, 0], rr = [1, 2, 0] -> S = {0}: a tie -> 0.5, n 1.

    Args:
        r_chosen, r_rejected: (n,) reward scores of the preferred and the other answer.
        len_chosen, len_rejected: (n,) their lengths.
        n_boot, seed, alpha, groups: as in ``bootstrap_mean_ci``.

    Returns:
        (A_adv, lo, hi, |S|); (nan, nan, nan, 0) when S is empty.
    """
    rc, rr = _pair(r_chosen, r_rejected, "r_chosen", "r_rejected")
    return _win_rate_on(rc, rr, adversarial_mask(len_chosen, len_rejected), n_boot, seed, alpha, groups)


def length_matched_mask(len_a: ArrayLike, len_b: ArrayLike, tol: float = 0.2) -> np.ndarray:
    """(n,) bool: prompts whose two responses differ in length by at most ``tol`` of the longer.

    Formula: m_i = 1[|la_i - lb_i| <= tol * max(la_i, lb_i)]  (two empty responses match).
    Example, tol 0.2: (10, 8) yes (2 <= 2); (10, 7) no; (10, 12) yes (2 <= 2.4); (0, 0) yes; (0, 5) no.
    """
    la, lb = _pair(len_a, len_b, "len_a", "len_b")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return np.abs(la - lb) <= tol * np.maximum(la, lb)


def length_matched_win_rate_ci(
    a_scores: ArrayLike, b_scores: ArrayLike, len_a: ArrayLike, len_b: ArrayLike,
    n_boot: int, seed: int, tol: float = 0.2, alpha: float = 0.05, *, groups: Groups = None,
) -> tuple[float, float, float, int]:
    """Win rate of A over B on the length-matched prompts only, with its interval and size.

    Formula: S = {i : |la_i - lb_i| <= tol * max(la_i, lb_i)};
    W_S = (1/|S|) * sum_{i in S} (1[a_i > b_i] + 0.5 * 1[a_i == b_i]); (lo, hi): paired percentile
    bootstrap over the |S| prompts. A win rate that holds on S is not (only) a length effect.

    Args:
        a_scores, b_scores: (n,) reward scores of A's and B's response to each prompt.
        len_a, len_b: (n,) the responses' lengths (tokens).
        n_boot, seed, alpha, groups: as in ``bootstrap_mean_ci``; tol: relative length tolerance.

    Returns:
        (W_S, lo, hi, |S|); (nan, nan, nan, 0) when S is empty.
    """
    a, b = _pair(a_scores, b_scores, "a_scores", "b_scores")
    return _win_rate_on(a, b, length_matched_mask(len_a, len_b, tol), n_boot, seed, alpha, groups)


def rank_average(x: ArrayLike) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the average of the ranks they span.

    Formula: for a group of c equal values whose last sorted position (1-based) is e, each gets
    rank e - (c - 1) / 2, the mean of e - c + 1 .. e.
    Example: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1].

    Returns:
        (n,) float64 ranks.
    """
    a = _as_1d(x, "x")
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based last sorted position of each distinct value
    return (last - (counts - 1) / 2.0)[inv]  # e - (c - 1) / 2


def _pearson(u: np.ndarray, v: np.ndarray) -> float:
    du, dv = u - u.mean(), v - v.mean()
    den = np.sqrt((du * du).sum() * (dv * dv).sum())
    return float((du * dv).sum() / den) if den > 0 else NAN


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rank correlation with average ranks for ties (Pearson correlation of the ranks).

    Formula: rx = rank_average(x), ry = rank_average(y);
        rho = sum_i (rx_i - mean rx)(ry_i - mean ry) / sqrt(sum_i (rx_i - mean rx)^2 * sum_i (ry_i - mean ry)^2)
    (not 1 - 6 sum d^2 / (n (n^2 - 1)), which is exact only without ties). NaN when x or y is
    constant (a zero-variance ranking has no correlation).
    Example: x = [1, 2, 2, 3], y = [1, 2, 3, 4] -> rx = [1, 2.5, 2.5, 4] -> rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).

    Returns:
        rho in [-1, 1], or nan.
    """
    a, b = _pair(x, y, "x", "y")
    return _pearson(rank_average(a), rank_average(b))


def spearman_ci(x: ArrayLike, y: ArrayLike, n_boot: int, seed: int, alpha: float = 0.05, *,
                groups: Groups = None) -> tuple[float, float, float]:
    """``spearman(x, y)`` with a percentile bootstrap interval over the (x_i, y_i) pairs.

    Formula: rho_b = spearman(x[idx_b], y[idx_b]), idx_b drawn as in ``bootstrap_mean_ci``; ranks are
    recomputed per resample. Resamples where x or y is constant (rho_b undefined) are left out of the
    percentiles; when every one is, or rho itself is undefined, the result is (nan, nan, nan).
    With ``groups``: the resamples of ``cluster_resample_idx(groups, n_boot, seed)``.

    Returns:
        (rho, lo, hi).
    """
    a, b = _pair(x, y, "x", "y")
    rho = spearman(a, b)
    if not np.isfinite(rho):
        return NAN, NAN, NAN
    if groups is not None:
        group_codes(groups, a.size)  # one label per pair, or a ValueError
    idx = _resample_idx(a.size, n_boot, seed) if groups is None else cluster_resample_idx(groups, n_boot, seed)
    rhos = np.array([spearman(a[i], b[i]) for i in idx])  # (B,) ranks per resample: a loop, n is small
    rhos = rhos[np.isfinite(rhos)]
    if rhos.size == 0:
        return NAN, NAN, NAN
    lo, hi = _percentiles(rhos, alpha)
    return rho, lo, hi


def pair_figures(r_chosen: ArrayLike, r_rejected: ArrayLike, len_chosen: ArrayLike,
                 len_rejected: ArrayLike) -> dict[str, float | int]:
    """Point figures of one reward (a head of a reward model) on preference pairs, beside length.

    Formula: accuracy = win_rate(rc, rr);  S = {i : lc_i < lr_i};  adversarial_accuracy =
    win_rate(rc[S], rr[S]);  length_spearman = spearman([rc; rr], [lc; lr]), over every answer of
    every pair (the reward against its answer's length).
    Example: rc = [2, 0], rr = [1, 1], lc = [3, 1], lr = [1, 4] -> accuracy 0.5, S = {1}:
    adversarial 0.0; ranks [4, 1, 2.5, 2.5] vs [3, 1.5, 1.5, 4] -> length_spearman 2.25 / 4.5 = 0.5.

    Returns:
        {"accuracy", "adversarial_accuracy", "n_adversarial" (|S|), "length_spearman"}; NaN where
        undefined (S empty, a constant reward or length).
    """
    rc, rr = _pair(r_chosen, r_rejected, "r_chosen", "r_rejected")
    lc, lr = _pair(len_chosen, len_rejected, "len_chosen", "len_rejected")
    if lc.shape != rc.shape:
        raise ValueError(f"lengths and scores differ in length: {lc.size} vs {rc.size}")
    m = adversarial_mask(lc, lr)
    return {"accuracy": win_rate(rc, rr), "adversarial_accuracy": win_rate(rc[m], rr[m]) if m.any() else NAN,
            "n_adversarial": int(m.sum()),
            "length_spearman": spearman(np.concatenate([rc, rr]), np.concatenate([lc, lr]))}
