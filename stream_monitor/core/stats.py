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

import math

import numpy as np
from scipy import special  # not scipy.stats: 0.5 s more at start-up for chi2.sf alone

__all__ = [
    "FIXED_POINT_BITS",
    "atom_values",
    "bin_index",
    "binomial_excess_pvalue",
    "binomial_excess_pvalue_rows",
    "chi_square_from_counts",
    "chi_square_merged_rows",
    "js_distance",
    "js_distance_rows",
    "ks_from_counts",
    "ks_from_counts_rows",
    "mean_shift",
    "merge_sparse_cells",
    "merge_sparse_cells_rows",
    "fixed_point_sums",
    "fixed_point_value",
    "grid_sums",
    "moments",
    "moments_rows",
    "proportions",
    "psi",
    "psi_rows",
    "profile_edges",
    "quantile_edges",
    "variance_ratio",
]

_NAN = float("nan")


def _as_counts(counts: np.ndarray, name: str = "counts") -> np.ndarray:
    """1-D float64 copy of a count vector; rejects other shapes and negative counts."""
    arr = np.asarray(counts, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.min() < 0:     # one reduction (NaN passes, as before)
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
    if smoothing < 0:
        raise ValueError("smoothing must be >= 0")
    # `proportions` of each, without validating the counts again (once per window and
    # feature, so the calls' overhead is what counts)
    p = (ref + smoothing) / (ref.sum() + smoothing * ref.size)
    q = (cur + smoothing) / (cur.sum() + smoothing * cur.size)
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
    return stat, float(special.chdtrc(dof, stat))  # = scipy.stats.chi2.sf(stat, dof)


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


# Window sums of standardised values are kept as integers in units of 2**-32: each value
# is rounded once to that grid (error <= 1.2e-10 per value), then added exactly, so the
# sums do not depend on how a stream was cut into batches or partial windows, nor on the
# order in which partial windows merge: scale-out instances compare bit for bit.
FIXED_POINT_BITS = 32
_FIXED_SCALE = float(2**FIXED_POINT_BITS)
_LIMB = 31
_INT64_SAFE = float(2**62)
_FLOAT_SAFE = float(2**53)   # integers below this add exactly in float64


def fixed_point_sums(values: np.ndarray) -> list[int]:
    """Exact column sums of a 2-D float array on the grid ``2**-FIXED_POINT_BITS``.

    Each value is rounded to the nearest multiple of ``2**-32``; the result is the sum of
    those multiples as Python integers (units of ``2**-32``), exact and therefore
    independent of summation order. Vectorised: int64 sums when they cannot overflow,
    else each value is split in two 31-bit limbs summed separately; only values beyond
    ``2**30`` in magnitude (``2**62`` grid units, over 30,000 reference sds squared) are
    converted one by one. Non-finite values saturate at ``+-2**1000``.

    >>> fixed_point_sums(np.array([[0.5, -1.0], [0.25, 3.0]]))
    [3221225472, 8589934592]
    """
    q = np.asarray(values, dtype=np.float64) * _FIXED_SCALE
    np.rint(q, out=q)
    if q.size == 0:
        return [0] * (q.shape[1] if q.ndim == 2 else 0)
    return grid_sums(q)


def grid_sums(q: np.ndarray, peak: np.ndarray | None = None) -> list[int]:
    """Exact column sums of a 2-D float array of integers (values already on the grid,
    e.g. ``rint(z * 2**32)``), as Python ints; the second half of `fixed_point_sums`.

    ``peak``, when given, bounds ``|q|`` per column (NaN: no bound): columns whose sum
    cannot pass ``2**53`` are summed in float64 directly, which is exact for integers
    below that and saves the conversion to int64 (the engine knows the bound from the
    batch's min and max, so it costs nothing to find).
    """
    rows = q.shape[0]
    if peak is not None:
        safe = (peak + 1.0) * rows < _FLOAT_SAFE        # NaN peak: False
        if safe.all():
            return [int(v) for v in q.sum(axis=0).tolist()]
        if safe.any():
            out = q.sum(axis=0).tolist()
            rest = np.flatnonzero(~safe)
            for j, v in zip(rest.tolist(), grid_sums(q[:, rest]), strict=True):
                out[j] = v
            return [int(v) for v in out]
    peak = float(np.abs(q).max()) if q.size else 0.0
    if peak * rows < _INT64_SAFE:       # a plain int64 sum cannot overflow
        return [int(v) for v in q.astype(np.int64).sum(axis=0)]
    big = ~(np.abs(q) < _INT64_SAFE)           # also NaN / inf
    small = np.where(big, 0.0, q).astype(np.int64)
    hi = (small >> _LIMB).sum(axis=0)
    lo = (small & ((1 << _LIMB) - 1)).sum(axis=0)
    out = [(int(a) << _LIMB) + int(b) for a, b in zip(hi, lo, strict=True)]
    for i, j in zip(*np.nonzero(big), strict=True):
        v = float(q[i, j])
        out[j] += int(v) if math.isfinite(v) else (1 << 1000) * (1 if v > 0 else -1)
    return out


def fixed_point_value(total: int) -> float:
    """A fixed-point sum as a float (correctly rounded)."""
    return total / 2**FIXED_POINT_BITS


def binomial_excess_pvalue(k: int, n: int, p0: float) -> float:
    """One-sided binomial p-value of ``k`` or more hits in ``n`` trials at rate ``p0``.

    The data-quality checks ask "is this window's rate above the reference's?", so only
    an excess counts. 1.0 when k == 0 or n == 0; ``p0`` is clipped to [0, 1].

    >>> binomial_excess_pvalue(0, 10, 0.5)
    1.0
    >>> binomial_excess_pvalue(10, 10, 0.5) == 0.5 ** 10
    True
    """
    if n <= 0 or k <= 0:
        return 1.0
    p0 = min(max(p0, 0.0), 1.0)
    # special.bdtrc(k-1, n, p) = P(X > k-1): the ufunc costs ~1 us where
    # scipy.stats.binom.sf costs ~40 us, and it runs for every check of every feature
    return float(min(max(special.bdtrc(k - 1, n, p0), 0.0), 1.0))


# -- row-wise forms: many columns at once ------------------------------------------------
# A window close scores every feature of a model; one column at a time, the overhead of
# the numpy calls (a few us each) is most of the cost. These take one row per column,
# ragged rows padded with zero counts at the end (`mask` marks the real cells where that
# matters: PSI's smoothing counts cells). Each equals its one-column function within
# float rounding (the same sums, added in another order; cumulative sums and
# everything elementwise are bit for bit the same).


def _rows(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref_counts, dtype=np.float64)
    cur = np.asarray(cur_counts, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != cur.shape:
        raise ValueError(f"row counts must be 2-D of one shape, got {ref.shape} and {cur.shape}")
    if ref.size and (ref.min() < 0 or cur.min() < 0):
        raise ValueError("counts must be non-negative")
    return ref, cur


def _cells(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells per row of a mask, and the row of each cell in row-major order: the
    transcendental work runs on real cells only (a 1,000-category feature beside
    2-category ones pads most of its rows)."""
    k = mask.sum(axis=1)
    return k, np.repeat(np.arange(mask.shape[0]), k)


def psi_rows(ref_counts: np.ndarray, cur_counts: np.ndarray, mask: np.ndarray | None = None,
             *, smoothing: float = 0.5) -> np.ndarray:
    """`psi` of every row; ``mask`` (same shape) marks each row's cells, by default all.

    >>> psi_rows(np.array([[10, 10, 0], [50, 50, 0]]), np.array([[10, 10, 0], [80, 20, 0]]),
    ...          np.array([[True, True, False]] * 2), smoothing=0.0).round(6)
    array([0.      , 0.415888])
    """
    ref, cur = _rows(ref_counts, cur_counts)
    if smoothing < 0:
        raise ValueError("smoothing must be >= 0")
    if mask is None:
        mask = np.ones(ref.shape, bool)
    k, row = _cells(mask)
    n, m = ref.sum(axis=1), cur.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = ref[mask] + smoothing
        p /= (n + smoothing * k)[row]
        q = cur[mask] + smoothing
        q /= (m + smoothing * k)[row]
        terms = (q - p) * np.log(q / p)
    terms[p == q] = 0.0
    out = np.bincount(row, terms, minlength=ref.shape[0])
    out[(n <= 0) | (m <= 0)] = _NAN
    return out


def js_distance_rows(ref_counts: np.ndarray, cur_counts: np.ndarray,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """`js_distance` of every row; cells outside ``mask`` must be empty in both (they
    add nothing: the mask only saves work).

    >>> js_distance_rows(np.array([[1, 0], [3, 1]]), np.array([[0, 1], [3, 1]]))
    array([1., 0.])
    """
    ref, cur = _rows(ref_counts, cur_counts)
    if mask is None:
        mask = np.ones(ref.shape, bool)
    _, row = _cells(mask)
    n, m = ref.sum(axis=1), cur.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = ref[mask] / n[row]
        q = cur[mask] / m[row]
        mid = (p + q) / 2.0
        rows = ref.shape[0]
        div = (np.bincount(row, special.rel_entr(p, mid), minlength=rows)
               + np.bincount(row, special.rel_entr(q, mid), minlength=rows)) / 2.0
    div /= math.log(2.0)
    out = np.sqrt(np.minimum(np.maximum(div, 0.0), 1.0))
    out[(n <= 0) | (m <= 0)] = _NAN
    return out


def ks_from_counts_rows(ref_counts: np.ndarray, cur_counts: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """`ks_from_counts` of every row: ``(D, p)`` arrays, bit for bit the one-column values
    (zero padding at the end of a row leaves both CDFs at 1).

    >>> ks_from_counts_rows(np.array([[5, 5], [10, 0]]), np.array([[5, 5], [0, 10]]))[0]
    array([0., 1.])
    """
    ref, cur = _rows(ref_counts, cur_counts)
    n, m = ref.sum(axis=1), cur.sum(axis=1)
    cdf_ref = np.cumsum(ref, axis=1)
    cdf_cur = np.cumsum(cur, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.abs(cdf_ref / cdf_ref[:, -1:] - cdf_cur / cdf_cur[:, -1:]).max(
            axis=1, initial=0.0)
        n_eff = n * m / (n + m)
        p = np.minimum(np.maximum(special.kolmogorov(np.sqrt(n_eff) * d), 0.0), 1.0)
    bad = (n <= 0) | (m <= 0)
    d[bad] = _NAN
    p[bad] = _NAN
    return d, p


def merge_sparse_cells_rows(ref_counts: np.ndarray, cur_counts: np.ndarray,
                            mask: np.ndarray | None = None, *, min_expected: float = 5.0
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`merge_sparse_cells` of every row: ``(ref, cur, mask)`` with one more column, the
    pooled cell. Kept cells stay where they were; dropped and pooled ones become zero
    and leave the mask; the pooled column is in the mask when a row pooled anything.

    >>> r, c, m = merge_sparse_cells_rows(np.array([[50, 50, 1, 0]]), np.array([[40, 55, 3, 2]]))
    >>> r[m].tolist(), c[m].tolist()
    ([50.0, 50.0, 1.0], [40.0, 55.0, 5.0])
    """
    ref, cur = _rows(ref_counts, cur_counts)
    used = (ref + cur) > 0
    if mask is not None:
        used &= mask
    n, m = ref.sum(axis=1), cur.sum(axis=1)
    ok = (n > 0) & (m > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = m[:, None] * ref / n[:, None]
    sparse = used & ((expected < min_expected) | ~ok[:, None])
    kept = used & ~sparse
    pool = sparse.any(axis=1)
    out_ref = np.concatenate([np.where(kept, ref, 0.0),
                              np.where(sparse, ref, 0.0).sum(axis=1)[:, None]], axis=1)
    out_cur = np.concatenate([np.where(kept, cur, 0.0),
                              np.where(sparse, cur, 0.0).sum(axis=1)[:, None]], axis=1)
    return out_ref, out_cur, np.concatenate([kept, pool[:, None]], axis=1)


def chi_square_merged_rows(ref_counts: np.ndarray, cur_counts: np.ndarray, mask: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """`chi_square_from_counts` of every row, on tables already merged by
    `merge_sparse_cells_rows` (its three outputs): ``(stat, p)`` arrays.

    >>> r, c, m = merge_sparse_cells_rows(np.array([[10, 10]]), np.array([[10, 10]]))
    >>> chi_square_merged_rows(r, c, m)
    (array([0.]), array([1.]))
    """
    ref, cur = _rows(ref_counts, cur_counts)
    k, row = _cells(mask)
    n, m = ref.sum(axis=1), cur.sum(axis=1)
    total = (n + m)[row]
    r, c = ref[mask], cur[mask]
    col = r + c
    with np.errstate(divide="ignore", invalid="ignore"):
        exp_ref = n[row] * col / total
        exp_cur = m[row] * col / total
        terms = (r - exp_ref) ** 2 / exp_ref + (c - exp_cur) ** 2 / exp_cur
    stat = np.bincount(row, terms, minlength=ref.shape[0])
    few = k < 2
    stat[few] = 0.0
    p = special.chdtrc(np.maximum(k - 1, 1).astype(np.float64), stat)
    p[few] = 1.0
    bad = (n <= 0) | (m <= 0)
    stat[bad] = _NAN
    p[bad] = _NAN
    return stat, p


def moments_rows(n: np.ndarray, s1: np.ndarray, s2: np.ndarray, shift: np.ndarray,
                 scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`moments` of every column (elementwise: bit for bit the same)."""
    n = np.asarray(n, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_z = s1 / n
        var_z = np.maximum(s2 / n - mean_z * mean_z, 0.0)
    empty = n == 0
    mean, var = shift + scale * mean_z, scale * scale * var_z
    mean[empty] = _NAN
    var[empty] = _NAN
    return mean, var


def binomial_excess_pvalue_rows(k: np.ndarray, n: np.ndarray, p0: np.ndarray) -> np.ndarray:
    """`binomial_excess_pvalue` of every element (the same ufunc and arguments: bit for
    bit the same).

    >>> binomial_excess_pvalue_rows(np.array([0, 10]), np.array([10, 10]), np.array([.5, .5])
    ...                             ).tolist() == [1.0, 0.5 ** 10]
    True
    """
    k = np.asarray(k, np.int64)
    n = np.asarray(n, np.int64)
    p0 = np.minimum(np.maximum(np.asarray(p0, np.float64), 0.0), 1.0)
    out = np.minimum(np.maximum(special.bdtrc((k - 1).astype(np.float64), n, p0), 0.0), 1.0)
    out[(n <= 0) | (k <= 0)] = 1.0
    return out


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


def atom_values(values: np.ndarray, min_share: float) -> np.ndarray:
    """Sorted distinct values that each hold at least ``min_share`` of the sample (NaNs ignored).

    >>> atom_values(np.array([0.0, 0.0, 0.0, 1.0, 2.0, np.nan]), 0.5)
    array([0.])
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return np.empty(0, dtype=np.float64)
    uniq, counts = np.unique(x, return_counts=True)
    return uniq[counts >= min_share * x.size]


def profile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Reference bin edges: quantile bins, plus a bin of its own for every atom.

    An atom is a value holding at least half a quantile bin's share (``1 / (2 bins)``)
    of the sample: the zero of a zero-inflated feature, the levels of an integer one.
    Sharing a bin with its neighbours would hide how the window's mass sits around it
    (the binned KS statistic lost 0.034 on a 70%-zero feature), so atom ``a`` gets
    ``[a, nextafter(a))`` and the other values share ``round(bins * their share)``
    quantile bins. Edges that would leave a bin empty in the sample are dropped (an
    empty reference bin only adds smoothing noise to PSI), so every bin holds at least
    one reference value and atoms' bins hold nothing else. At most ``bins - 1`` plus two
    per atom (at most ``2 bins`` atoms) edges.

    >>> profile_edges(np.array([0.0] * 6 + [1.0, 2.0, 3.0, 4.0]), 4)  # (-inf, 0+) holds 0
    array([4.9e-324, 2.5e+000])
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    atoms = atom_values(x, 1.0 / (2 * bins)) if bins > 1 else np.empty(0)
    if atoms.size == 0:
        return quantile_edges(x, bins)
    rest = x[~np.isin(x, atoms)]
    k = max(1, round(bins * rest.size / x.size))
    edges = np.unique(np.concatenate((quantile_edges(rest, k), atoms,
                                      np.nextafter(atoms, np.inf))))
    counts = np.bincount(bin_index(edges, x), minlength=edges.size + 1)
    edges = edges[counts[1:] > 0]        # an edge survives if the bin it opens is used
    if edges.size and not (x < edges[0]).any():
        edges = edges[1:]                # nothing below the first edge
    return edges


def bin_index(inner_edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin of each value: ``searchsorted(inner_edges, values, side="right")``.

    Bin i holds ``[e_{i-1}, e_i)``; values below the first edge go to 0 and values
    at or above the last edge to K-1. NaN handling is the caller's (NaN -> K-1).

    >>> bin_index(np.array([1.0, 2.0]), np.array([0.5, 1.0, 1.5, 2.0, 9.0]))
    array([0, 1, 1, 2, 2])
    """
    return np.searchsorted(np.asarray(inner_edges), np.asarray(values), side="right")


class GridBins:
    """`bin_index` for one fixed set of edges, a few times faster, identical results.

    `searchsorted` costs about 40 ns a value (a binary search whose branches the CPU
    cannot predict). Here a value is mapped to a cell of a uniform grid over the edges
    with three vectorised operations, and a table gives its bin whenever that cell,
    widened by one cell on each side against rounding, holds no edge; only the values
    in the few cells around an edge (and NaN) are searched. On data whose values sit
    on the edges (integers, atoms) most values need the search: the table is then set
    aside for a while, and integer values are looked up in a second table, indexed by
    the integer itself, built from `searchsorted` of the integers around the edges
    (`_integers`); other values, and integer data spanning too wide a range, are searched.
    """

    CELLS = 4096
    REST = 16           # calls without the table after one where it did not pay
    INTEGERS = 4096     # widest range of integers (around the edges) the integer table spans

    def __init__(self, inner_edges: np.ndarray, offset: int = 0):
        # `offset` is added to every bin: the engine's slot of each bin, written straight
        # into its slots matrix (`__call__`'s out) without a pass to add it afterwards
        self.edges = e = np.ascontiguousarray(inner_edges, dtype=np.float64)
        self.offset = offset
        self.table = None
        self.rest = 0
        self.ints = None
        self.ints_rest = 0
        if e.size and np.isfinite(e).all() and abs(e[0]) < 2.0**52 and abs(e[-1]) < 2.0**52:
            base = math.floor(e[0]) - 1.0
            top = math.ceil(e[-1]) + 1.0 - base     # every integer from base + top up: bin K
            if top < self.INTEGERS:
                self.ints = np.searchsorted(e, base + np.arange(int(top) + 1, dtype=np.float64),
                                            side="right") + offset
                self.ints_base, self.ints_top = base, top
        if e.size < 2 or not np.isfinite(e).all() or not e[-1] > e[0]:
            return
        g = self.CELLS
        scale = g / (float(e[-1]) - float(e[0]))
        if not math.isfinite(scale) or not math.isfinite(g / scale):
            return
        # value x -> k = clip((x - e0) * scale + 1, 0, g + 4), so cell k holds values of
        # about [e0 + (k-1)/scale, e0 + k/scale); k = 0 exactly the values below e0
        k = np.arange(g + 5, dtype=np.float64)
        lo = np.searchsorted(e, e[0] + (k - 2) / scale, side="right")
        hi = np.searchsorted(e, e[0] + (k + 1) / scale, side="right")
        lo[0] = hi[0] = 0
        hi[-1] = e.size
        table = np.where(lo == hi, lo + offset, -1)
        self.table = np.append(table, -1).astype(np.int64)   # last: NaN, searched
        self.first, self.scale, self.top = float(e[0]), scale, g + 4.0

    def __call__(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Bins (plus `offset`) of 1-D values, into `out` (int64, same length) if given."""
        if self.table is None or self.rest > 0:
            self.rest -= 1
            return self._integers(values, out)
        with np.errstate(over="ignore"):            # huge values: inf, clipped below
            c = np.subtract(values, self.first)
            c *= self.scale
        c += 1.0
        # NaN (and +inf) -> the top cell, whose bin is the last one: searchsorted's answer
        # for NaN too; then -inf -> cell 0. Two ufuncs instead of clip and nan_to_num.
        np.fmin(c, self.top, out=c)
        np.maximum(c, 0.0, out=c)
        # indices are in range (clipped above): 'clip' skips the bounds check and writes
        # into `out` unbuffered
        out = np.take(self.table, c.astype(np.intp), out=out, mode="clip")
        unsure = np.flatnonzero(out < 0)
        if unsure.size:
            out[unsure] = self._search(values[unsure])
            if unsure.size * 4 > out.size:
                self.rest = self.REST
        return out

    def _search(self, values: np.ndarray) -> np.ndarray:
        found = np.searchsorted(self.edges, values, side="right")
        if self.offset:
            found += self.offset
        return found

    def _integers(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """`bin_index` for data that sits on the edges (integers, atoms): a value equal
        to the integer `base + k` (exactly: `k + base` is computed as the table's own
        values were) takes the table's `searchsorted` of that integer; any other value
        (fractions, NaN, beyond the table's range) is searched. Measured on integer
        features of 4-71 edges: 4-9 vs 4-27 ns a value for `searchsorted` alone."""
        if self.ints is None or self.ints_rest > 0:
            self.ints_rest -= 1
            if out is None:
                return self._search(values)
            out[:] = self._search(values)
            return out
        c = np.subtract(values, self.ints_base)
        np.fmin(c, self.ints_top, out=c)      # NaN and large values -> the top entry
        np.maximum(c, 0.0, out=c)              # -inf and small values -> entry 0
        k = c.astype(np.intp)
        out = np.take(self.ints, k, out=out, mode="clip")
        np.add(k, self.ints_base, out=c)
        other = np.flatnonzero(c != values)    # not that integer (NaN never equals)
        if other.size:
            out[other] = self._search(values[other])
            if other.size * 4 > out.size:      # not integer data: plain search for a while
                self.ints_rest = self.REST
        return out
