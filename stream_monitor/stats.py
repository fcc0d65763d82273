"""Drift statistics computed from binned counts and moments (pure functions).

Every function here maps arrays / numbers to numbers: no I/O, no state. The engine
keeps per-window bin counts and running sums, and calls these when a window closes,
so nothing here ever needs the raw samples.

Conventions:
  * ``ref_counts`` / ``cur_counts`` are 1-D arrays of non-negative counts over the
    same K bins (for the KS / Wasserstein functions the bins must be *ordered*).
  * A statistic that is undefined (an empty sample, a zero reference spread) is
    returned as ``nan`` rather than raising, so one empty window never stops the
    monitor; the caller decides how to report it.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np


class _OnFirstUse:
    """A module imported on first attribute access. scipy takes 1-2 s to import: `run`
    should be serving and joining its consumer group meanwhile, not waiting for it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


special = _OnFirstUse("scipy.special")
_sps = _OnFirstUse("scipy.stats")

__all__ = [
    "bin_index",
    "chi_square_from_counts",
    "js_distance",
    "ks_from_counts",
    "mean_shift",
    "merge_sparse_cells",
    "moments",
    "proportions",
    "psi",
    "quantile_edges",
    "variance_ratio",
    "wasserstein_from_counts",
]

_NAN = float("nan")


def _as_counts(counts: np.ndarray, name: str = "counts") -> np.ndarray:
    """1-D float64 copy of a count vector; rejects other shapes and negative counts."""
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative")
    return arr


def _pair(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = _as_counts(ref_counts, "ref_counts")
    cur = _as_counts(cur_counts, "cur_counts")
    if ref.shape != cur.shape:
        raise ValueError(f"bin counts differ in length: {ref.shape[0]} vs {cur.shape[0]}")
    return ref, cur


def proportions(counts: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    """Bin shares ``(c + s) / (sum(c) + s * K)`` with additive (Laplace) smoothing.

    All-nan if the denominator is 0 (no counts and no smoothing).

    >>> proportions(np.array([1, 3]))
    array([0.25, 0.75])
    >>> proportions(np.array([0, 2]), smoothing=1.0)
    array([0.25, 0.75])
    """
    c = _as_counts(counts)
    if smoothing < 0:
        raise ValueError("smoothing must be >= 0")
    denom = c.sum() + smoothing * c.size
    if denom <= 0:
        return np.full(c.shape, np.nan)
    return (c + smoothing) / denom


def psi(ref_counts: np.ndarray, cur_counts: np.ndarray, *, smoothing: float = 0.5) -> float:
    """Population stability index ``sum((q - p) * ln(q / p))`` over bins.

    ``p`` / ``q`` are the smoothed reference / current shares, so a bin empty in one
    sample gives a large but finite term instead of ``inf``. nan if either total is 0.

    >>> psi(np.array([10, 10]), np.array([10, 10]))
    0.0
    >>> round(psi(np.array([50, 50]), np.array([80, 20]), smoothing=0.0), 6)
    0.415888
    """
    ref, cur = _pair(ref_counts, cur_counts)
    if ref.sum() <= 0 or cur.sum() <= 0:
        return _NAN
    p = proportions(ref, smoothing)
    q = proportions(cur, smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (q - p) * np.log(q / p)
    # Equal shares contribute exactly 0 even when both are 0 (only possible with
    # smoothing=0, where 0 * log(0/0) would otherwise be nan).
    terms = np.where(p == q, 0.0, terms)
    return float(terms.sum())


def js_distance(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the normalised counts.

    Same arithmetic as ``scipy.spatial.distance.jensenshannon(p, q, base=2)``.
    nan if either total is 0.

    >>> js_distance(np.array([1, 0]), np.array([0, 1]))
    1.0
    >>> js_distance(np.array([3, 1]), np.array([3, 1]))
    0.0
    """
    ref, cur = _pair(ref_counts, cur_counts)
    n, m = ref.sum(), cur.sum()
    if n <= 0 or m <= 0:
        return _NAN
    p, q = ref / n, cur / m
    mid = (p + q) / 2.0
    # rel_entr handles the 0 * log(0) = 0 convention for empty bins.
    div = (special.rel_entr(p, mid).sum() + special.rel_entr(q, mid).sum()) / 2.0
    div /= math.log(2.0)
    # Rounding can push the divergence a hair below 0 or above 1; the distance
    # is mathematically in [0, 1], so clip instead of returning nan from sqrt.
    return float(math.sqrt(min(max(div, 0.0), 1.0)))


def ks_from_counts(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov ``(D, p)`` from counts over the same ordered bins.

    ``D = max |F_ref - F_cur|`` evaluated at bin boundaries only. The order of values
    inside a bin is unknown, so this is a lower bound of the raw-sample D (the gap is
    at most the largest bin share of either sample). The p-value uses the asymptotic
    Kolmogorov distribution with ``n_eff = n*m/(n+m)``; because D is a lower bound
    (and the asymptotic tail is above the finite-n one), p errs on the side of "no
    drift". ``(nan, nan)`` if either total is 0.

    >>> ks_from_counts(np.array([5, 5]), np.array([5, 5]))
    (0.0, 1.0)
    >>> ks_from_counts(np.array([10, 0]), np.array([0, 10]))[0]
    1.0
    """
    ref, cur = _pair(ref_counts, cur_counts)
    n, m = ref.sum(), cur.sum()
    if n <= 0 or m <= 0:
        return _NAN, _NAN
    cdf_ref = np.cumsum(ref)
    cdf_cur = np.cumsum(cur)
    # Divide by the last cumulative value (not sum()) so both CDFs end at exactly 1.
    d = float(np.max(np.abs(cdf_ref / cdf_ref[-1] - cdf_cur / cdf_cur[-1])))
    n_eff = n * m / (n + m)
    # special.kolmogorov is O(1) for any n; scipy.stats.kstwo.sf costs ~1 s at
    # n ~ 1e6, too slow to run per feature per window.
    p = float(special.kolmogorov(math.sqrt(n_eff) * d))
    return d, min(max(p, 0.0), 1.0)


def _abs_integral_linear(a: np.ndarray, b: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Exact integral of ``|f|`` over segments where f is linear from ``a`` to ``b``."""
    abs_a, abs_b = np.abs(a), np.abs(b)
    same_sign = a * b >= 0
    # With a sign change the zero sits at t = |a| / (|a| + |b|); the two triangles
    # add up to width * (a^2 + b^2) / (2 (|a| + |b|)). The denominator is > 0
    # whenever the signs differ, the `where` just silences the other branch.
    denom = np.where(same_sign, 1.0, abs_a + abs_b)
    crossing = width * (a * a + b * b) / (2.0 * denom)
    return np.where(same_sign, width * (abs_a + abs_b) / 2.0, crossing)


def wasserstein_from_counts(
    inner_edges: np.ndarray,
    ref_counts: np.ndarray,
    cur_counts: np.ndarray,
    *,
    lo: float,
    hi: float,
) -> float:
    """Wasserstein-1 distance between two binned samples.

    K bins are separated by K-1 increasing ``inner_edges``; bin 0 spans ``[lo, e_0]``
    and bin K-1 spans ``[e_{K-2}, hi]`` (``lo`` / ``hi`` = min / max over both samples).
    Each bin's mass is spread uniformly over it, so both CDFs are piecewise linear
    and ``W1 = integral |F_ref - F_cur| dx`` is computed exactly for them. Edges
    outside ``[lo, hi]`` are clipped (their bins can only be empty). nan if either
    total is 0.

    >>> wasserstein_from_counts(np.array([1.0]), np.array([1, 0]), np.array([0, 1]), lo=0, hi=2)
    1.0
    """
    ref, cur = _pair(ref_counts, cur_counts)
    edges = np.asarray(inner_edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size != ref.size - 1:
        raise ValueError(f"need {ref.size - 1} inner edges for {ref.size} bins, got {edges.size}")
    if np.any(np.diff(edges) < 0):
        raise ValueError("inner_edges must be non-decreasing")
    if not hi >= lo:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    n, m = ref.sum(), cur.sum()
    if n <= 0 or m <= 0:
        return _NAN
    # Reference edges can lie outside the observed range (e.g. edges fixed at
    # training time, a narrower current window). All values are in [lo, hi], so
    # clipping only collapses bins that are empty in both samples.
    knots = np.concatenate(([lo], np.clip(edges, lo, hi), [hi]))
    zero = np.zeros(1)
    diff = np.concatenate((zero, np.cumsum(ref) / n - np.cumsum(cur) / m))
    diff[-1] = 0.0  # both CDFs reach 1 at hi; remove cumsum rounding
    return float(_abs_integral_linear(diff[:-1], diff[1:], np.diff(knots)).sum())


def merge_sparse_cells(
    ref_counts: np.ndarray, cur_counts: np.ndarray, *, min_expected: float = 5.0
) -> tuple[np.ndarray, np.ndarray]:
    """Pool sparse categories into one column so chi-square / PSI cells are not tiny.

    Columns empty in both rows are dropped. A column is sparse when its expected
    count in the current row, ``cur_total * ref_share``, is below ``min_expected``
    (a category unseen in the reference has expected 0, so it is always pooled).
    All sparse columns are summed into one pooled column appended at the end; kept
    columns stay in their original order. If a total is 0 every column is sparse.

    >>> merge_sparse_cells(np.array([50, 50, 1, 0]), np.array([40, 55, 3, 2]))
    (array([50., 50.,  1.]), array([40., 55.,  5.]))
    """
    ref, cur = _pair(ref_counts, cur_counts)
    used = (ref + cur) > 0
    ref, cur = ref[used], cur[used]
    n, m = ref.sum(), cur.sum()
    if n > 0 and m > 0:
        expected = m * ref / n
    else:
        expected = np.zeros_like(ref)
    sparse = expected < min_expected
    if not sparse.any():
        return ref, cur
    return (
        np.append(ref[~sparse], ref[sparse].sum()),
        np.append(cur[~sparse], cur[sparse].sum()),
    )


def chi_square_from_counts(
    ref_counts: np.ndarray, cur_counts: np.ndarray, *, min_expected: float = 5.0
) -> tuple[float, float]:
    """Chi-square test of homogeneity on the 2xK table ``[ref; cur]``: ``(stat, p)``.

    Sparse columns are pooled first (``merge_sparse_cells``); the statistic and p-value
    then match ``scipy.stats.chi2_contingency(table, correction=False)`` on the merged
    table. ``(0.0, 1.0)`` if fewer than 2 columns remain; ``(nan, nan)`` if a total is 0.

    >>> chi_square_from_counts(np.array([10, 10]), np.array([10, 10]))
    (0.0, 1.0)
    """
    ref, cur = merge_sparse_cells(ref_counts, cur_counts, min_expected=min_expected)
    n, m = ref.sum(), cur.sum()
    if n <= 0 or m <= 0:
        return _NAN, _NAN
    if ref.size < 2:
        return 0.0, 1.0
    observed = np.vstack((ref, cur))
    total = n + m
    expected = np.outer([n, m], observed.sum(axis=0)) / total
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = ref.size - 1  # (rows - 1) * (cols - 1) with 2 rows
    return stat, float(_sps.chi2.sf(stat, dof))


def mean_shift(ref_mean: float, ref_std: float, cur_mean: float) -> float:
    """Standardised mean shift ``(cur_mean - ref_mean) / ref_std``; nan if ref_std is 0.

    >>> mean_shift(10.0, 2.0, 13.0)
    1.5
    """
    if ref_std == 0:
        return _NAN
    return float((cur_mean - ref_mean) / ref_std)


def variance_ratio(ref_var: float, cur_var: float) -> float:
    """``cur_var / ref_var``; nan if ref_var is 0.

    >>> variance_ratio(4.0, 2.0)
    0.5
    """
    if ref_var == 0:
        return _NAN
    return float(cur_var / ref_var)


def moments(
    n: float, s1: float, s2: float, *, shift: float = 0.0, scale: float = 1.0
) -> tuple[float, float]:
    """Mean and population variance (ddof=0) from running sums of standardised values.

    ``s1 = sum(z)``, ``s2 = sum(z**2)`` with ``z = (x - shift) / scale``; results are in
    the original units of x. Accumulating z instead of x (shift ~ reference mean,
    scale ~ reference std) avoids the cancellation in ``s2/n - mean**2`` for data
    with a large offset. ``(nan, nan)`` for n == 0.

    >>> moments(4, 10.0, 30.0)
    (2.5, 1.25)
    >>> moments(2, 0.0, 2.0, shift=100.0, scale=10.0)
    (100.0, 100.0)
    """
    if n == 0:
        return _NAN, _NAN
    mean_z = s1 / n
    # Rounding can make this slightly negative for (near-)constant data.
    var_z = max(s2 / n - mean_z * mean_z, 0.0)
    return float(shift + scale * mean_z), float(scale * scale * var_z)


def quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges from the sample quantiles at ``1/bins, ..., (bins-1)/bins``.

    NaNs are ignored and repeated quantiles (ties, discrete data) are collapsed, so
    the result has at most ``bins - 1`` edges. A constant (or empty) sample gives no
    edges, i.e. a single bin.

    >>> quantile_edges(np.array([1.0, 2.0, 3.0, 4.0, np.nan]), 2)
    array([2.5])
    >>> quantile_edges(np.array([7.0, 7.0, 7.0]), 10)
    array([], dtype=float64)
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if bins == 1 or x.size == 0 or x.min() == x.max():
        return np.empty(0, dtype=np.float64)
    return np.unique(np.quantile(x, np.arange(1, bins) / bins))


def bin_index(inner_edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of each value: ``searchsorted(inner_edges, values, side="right")``.

    Bin i holds ``[e_{i-1}, e_i)``; values below the first edge go to 0 and values
    at or above the last edge to K-1. NaN handling is the caller's (NaN -> K-1).

    >>> bin_index(np.array([1.0, 2.0]), np.array([0.5, 1.0, 1.5, 2.0, 9.0]))
    array([0, 1, 1, 2, 2])
    """
    return np.searchsorted(np.asarray(inner_edges), np.asarray(values), side="right")
