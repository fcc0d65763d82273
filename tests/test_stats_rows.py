"""The row-wise statistics (`stats.*_rows`, many columns at once) against the one-column
functions and against scipy / numpy, on ragged rows of several distribution families.

Tolerances: what rounding allows and no more. Elementwise work and cumulative sums are
the same operations as the one-column functions', so KS, moments and binomial p-values
must be equal bit for bit; PSI, Jensen-Shannon and chi-square add the same terms in
another order (padding, per-row sums), so they agree to 1e-12 relative (1e-15 absolute
for values that are 0 up to rounding). Against scipy: 1e-9 relative (JS, as in
test_stats), 1e-10 for the chi-square statistic and 1e-8 for its p-value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from stream_monitor.core.stats import (
    binomial_excess_pvalue,
    binomial_excess_pvalue_rows,
    chi_square_from_counts,
    chi_square_merged_rows,
    js_distance,
    js_distance_rows,
    ks_from_counts,
    ks_from_counts_rows,
    merge_sparse_cells,
    merge_sparse_cells_rows,
    moments,
    moments_rows,
    profile_edges,
    psi,
    psi_rows,
)

REL, ABS = 1e-12, 1e-15
FAMILIES = ["normal", "cauchy", "integers", "zero_inflated", "sparse"]


def _column(family: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if family == "normal":
        return rng.normal(3.0, 2.0, n)
    if family == "cauchy":
        return rng.standard_cauchy(n)
    if family == "integers":                    # ties: every value an atom
        return rng.poisson(3, n).astype(np.float64)
    if family == "zero_inflated":
        return np.where(rng.random(n) < 0.7, 0.0, rng.exponential(50, n))
    return rng.normal(0, 1, n)                  # "sparse": few current values (below)


def _ragged(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Reference and current counts of one column per family, over each reference's own
    `profile_edges` bins (2 to 70 cells: ragged), current samples shifted or not; plus
    an empty current column and a one-cell column."""
    rng = np.random.default_rng(seed)
    refs, curs = [], []
    for family in FAMILIES:
        x = _column(family, rng, 5_000)
        m = 40 if family == "sparse" else int(rng.integers(500, 20_000))
        y = _column(family, rng, m) * rng.choice([1.0, 1.3]) + rng.choice([0.0, 0.5])
        edges = profile_edges(x, int(rng.integers(5, 50)))
        k = edges.size + 1
        refs.append(np.bincount(np.searchsorted(edges, x, side="right"), minlength=k))
        curs.append(np.bincount(np.searchsorted(edges, y, side="right"), minlength=k))
    refs.append(rng.integers(0, 50, 7))
    curs.append(np.zeros(7, np.int64))          # a column without values this window
    refs.append(np.array([1000]))
    curs.append(np.array([10]))
    return refs, curs


def _pad(cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(c.size for c in cols)
    out = np.zeros((len(cols), width))
    mask = np.zeros(out.shape, bool)
    for i, c in enumerate(cols):
        out[i, :c.size] = c
        mask[i, :c.size] = True
    return out, mask


def _close(row: np.ndarray, one: list[float]) -> None:
    np.testing.assert_allclose(row, one, rtol=REL, atol=ABS, equal_nan=True)


@pytest.mark.parametrize("seed", range(4))
def test_psi_js_ks_rows_equal_the_one_column_functions(seed: int) -> None:
    refs, curs = _ragged(seed)
    ref, mask = _pad(refs)
    cur, _ = _pad(curs)
    for s in (0.5, 1.0):
        _close(psi_rows(ref, cur, mask, smoothing=s),
               [psi(r, c, smoothing=s) for r, c in zip(refs, curs, strict=True)])
    one = [js_distance(r, c) for r, c in zip(refs, curs, strict=True)]
    _close(js_distance_rows(ref, cur), one)
    _close(js_distance_rows(ref, cur, mask), one)
    d, p = ks_from_counts_rows(ref, cur)
    want = [ks_from_counts(r, c) for r, c in zip(refs, curs, strict=True)]
    np.testing.assert_array_equal(d, [w[0] for w in want])     # bit for bit (NaN too)
    np.testing.assert_array_equal(p, [w[1] for w in want])
    assert math.isnan(d[-2]) and math.isnan(psi_rows(ref, cur, mask)[-2])


@pytest.mark.parametrize("seed", range(4))
def test_js_and_ks_rows_match_scipy(seed: int) -> None:
    refs, curs = _ragged(seed)
    ref, _ = _pad(refs)
    cur, _ = _pad(curs)
    js = js_distance_rows(ref, cur)
    d, _ = ks_from_counts_rows(ref, cur)
    for i, (r, c) in enumerate(zip(refs, curs, strict=True)):
        if c.sum() == 0:
            continue
        assert js[i] == pytest.approx(jensenshannon(r / r.sum(), c / c.sum(), base=2),
                                      rel=1e-9, abs=1e-12)
        # D from an independent CDF: numpy's cumulative shares at each bin boundary
        gap = np.abs(np.cumsum(r) / r.sum() - np.cumsum(c) / c.sum()).max()
        assert d[i] == pytest.approx(gap, abs=1e-12)


def _categorical(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Category counts (reference 'other' as the last cell): 2 (boolean) to 5,000
    categories, Zipf tails, categories absent from one side, an empty window."""
    rng = np.random.default_rng(seed)
    refs, curs = [], []
    for k in (2, 4, 40, 1_000, 5_000):
        w = 1.0 / np.arange(1, k + 1) ** rng.uniform(0.5, 1.5)
        r = rng.multinomial(50_000, w / w.sum())
        w2 = np.roll(w, int(rng.integers(0, 3)))
        c = rng.multinomial(int(rng.integers(200, 20_000)), w2 / w2.sum())
        c[rng.random(k) < 0.1] = 0              # absent this window
        refs.append(r)
        curs.append(c)
    refs.append(np.array([30, 20, 0]))
    curs.append(np.zeros(3, np.int64))
    return refs, curs


@pytest.mark.parametrize("seed", range(4))
def test_merged_chi_square_psi_js_rows_equal_one_column_and_scipy(seed: int) -> None:
    refs, curs = _categorical(seed)
    ref, mask = _pad(refs)
    cur, _ = _pad(curs)
    ref_m, cur_m, mask_m = merge_sparse_cells_rows(ref, cur, mask)
    stat, p = chi_square_merged_rows(ref_m, cur_m, mask_m)
    for i, (r, c) in enumerate(zip(refs, curs, strict=True)):
        one_r, one_c = merge_sparse_cells(r, c)
        # the same cells, kept ones in order, the pooled one last
        np.testing.assert_array_equal(ref_m[i][mask_m[i]], one_r)
        np.testing.assert_array_equal(cur_m[i][mask_m[i]], one_c)
        want = chi_square_from_counts(r, c)
        _close(np.array([stat[i], p[i]]), list(want))
        if c.sum() and one_r.size >= 2:
            res = sps.chi2_contingency(np.vstack((one_r, one_c)), correction=False)
            assert stat[i] == pytest.approx(res.statistic, rel=1e-10)
            assert p[i] == pytest.approx(res.pvalue, rel=1e-8, abs=1e-300)
    _close(psi_rows(ref_m, cur_m, mask_m),
           [psi(*merge_sparse_cells(r, c)) for r, c in zip(refs, curs, strict=True)])
    _close(js_distance_rows(ref_m, cur_m, mask_m),
           [js_distance(*merge_sparse_cells(r, c)) for r, c in zip(refs, curs, strict=True)])


def test_chi_square_rows_with_one_cell_left() -> None:
    # everything pooled into one cell: (0, 1) as the one-column function says
    ref, cur = np.array([[3.0, 2.0, 0.0]]), np.array([[1.0, 0.0, 1.0]])
    stat, p = chi_square_merged_rows(*merge_sparse_cells_rows(ref, cur))
    assert (stat[0], p[0]) == chi_square_from_counts(ref[0], cur[0]) == (0.0, 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_moments_and_binomial_rows_are_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = rng.integers(0, 10_000, 50)
    n[:3] = 0
    s1 = rng.normal(0, 100, 50)
    s2 = np.abs(rng.normal(0, 1e4, 50)) + s1 * s1 / np.maximum(n, 1)
    shift, scale = rng.normal(0, 10, 50), rng.uniform(0.1, 5, 50)
    mean, var = moments_rows(n, s1, s2, shift, scale)
    want = [moments(int(a), float(b), float(c), shift=float(d), scale=float(e))
            for a, b, c, d, e in zip(n, s1, s2, shift, scale, strict=True)]
    np.testing.assert_array_equal(mean, [w[0] for w in want])
    np.testing.assert_array_equal(var, [w[1] for w in want])
    trials = rng.integers(0, 20_000, (4, 50))
    hits = (trials * rng.uniform(0, 0.1, (4, 50))).astype(np.int64)
    p0 = rng.choice([0.0, 1e-5, 0.02, 0.3], (4, 50))
    got = binomial_excess_pvalue_rows(hits, trials, p0)
    for k, t, q, g in zip(hits.ravel(), trials.ravel(), p0.ravel(), got.ravel(), strict=True):
        assert g == binomial_excess_pvalue(int(k), int(t), float(q))
        if 0 < q and 0 < k <= t:
            assert g == pytest.approx(sps.binomtest(int(k), int(t), float(q),
                                                    alternative="greater").pvalue,
                                      rel=1e-9, abs=1e-300)


def test_rows_reject_bad_shapes_and_negative_counts() -> None:
    with pytest.raises(ValueError):
        psi_rows(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError):
        js_distance_rows(np.ones(3), np.ones(3))
    with pytest.raises(ValueError):
        ks_from_counts_rows(np.array([[1.0, -1.0]]), np.ones((1, 2)))
