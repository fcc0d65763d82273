"""Tests for stream_monitor.core.stats: each statistic against an independent implementation."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from stream_monitor.core.stats import (
    bin_index,
    binomial_excess_pvalue,
    chi_square_from_counts,
    fixed_point_sums,
    fixed_point_value,
    js_distance,
    ks_from_counts,
    mean_shift,
    merge_sparse_cells,
    moments,
    profile_edges,
    proportions,
    psi,
    quantile_edges,
    variance_ratio,
)

BINS = 50

# D_exact - D_binned for 50 reference-quantile bins, measured over 100 seeds x the six
# sample pairs below x sizes (5000/5000, 20000/20000, 5000/20000): max 0.0052, 99th
# percentile 0.0032. The theoretical bound is the largest bin share of either sample
# (~0.02 here, more when drift piles current mass into one bin), but the max gap sits
# where F_ref - F_cur varies slowly, so the binned D loses far less than that.
KS_BINNING_TOL = 0.0075

SIZES = [(5000, 5000), (20000, 20000), (5000, 20000)]


def _sample_pair(kind: str, n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "normal/same":
        return rng.normal(0, 1, n), rng.normal(0, 1, m)
    if kind == "normal/shift":
        return rng.normal(0, 1, n), rng.normal(0.25, 1, m)
    if kind == "t2/same":
        return rng.standard_t(2, n), rng.standard_t(2, m)
    if kind == "t2/shift":
        return rng.standard_t(2, n), rng.standard_t(2, m) + 0.25
    if kind == "lognormal/same":
        return rng.lognormal(0, 1, n), rng.lognormal(0, 1, m)
    if kind == "lognormal/wider":
        return rng.lognormal(0, 1, n), rng.lognormal(0, 1.2, m)
    raise AssertionError(kind)


KINDS = ["normal/same", "normal/shift", "t2/same", "t2/shift", "lognormal/same", "lognormal/wider"]


def _binned(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges at 50 reference quantiles, and both samples' counts over them."""
    edges = quantile_edges(x, BINS)
    k = edges.size + 1
    ref = np.bincount(bin_index(edges, x), minlength=k)
    cur = np.bincount(bin_index(edges, y), minlength=k)
    assert ref.size == cur.size == k
    return edges, ref, cur


# --------------------------------------------------------------------------- proportions


def test_proportions_formula() -> None:
    c = np.array([0, 3, 7])
    np.testing.assert_allclose(proportions(c), [0.0, 0.3, 0.7])
    np.testing.assert_allclose(proportions(c, 0.5), [0.5 / 11.5, 3.5 / 11.5, 7.5 / 11.5])
    assert np.isnan(proportions(np.zeros(3))).all()
    np.testing.assert_allclose(proportions(np.zeros(4), 1.0), [0.25] * 4)


# --------------------------------------------------------------------------- PSI


def _psi_direct(ref: np.ndarray, cur: np.ndarray, s: float) -> float:
    k = ref.size
    p = (ref + s) / (ref.sum() + s * k)
    q = (cur + s) / (cur.sum() + s * k)
    return float(np.sum((q - p) * np.log(q / p)))


@pytest.mark.parametrize("kind", KINDS)
def test_psi_matches_direct_formula(kind: str) -> None:
    x, y = _sample_pair(kind, 5000, 20000, seed=1)
    _, ref, cur = _binned(x, y)
    for s in (0.5, 1.0):
        assert psi(ref, cur, smoothing=s) == pytest.approx(_psi_direct(ref, cur, s), rel=1e-12)


def test_psi_known_values_and_edge_cases() -> None:
    # 0.3 * ln(1.6) + 0.3 * ln(1.25) by hand
    assert psi(np.array([50, 50]), np.array([80, 20]), smoothing=0) == pytest.approx(
        0.3 * math.log(0.8 / 0.5) - 0.3 * math.log(0.2 / 0.5)
    )
    # an empty bin stays finite with smoothing, infinite without
    assert math.isfinite(psi(np.array([10, 0]), np.array([5, 5])))
    assert psi(np.array([10, 0]), np.array([5, 5]), smoothing=0) == math.inf
    # bins empty in both samples contribute nothing, even unsmoothed
    assert psi(np.array([4, 0, 6]), np.array([4, 0, 6]), smoothing=0) == 0.0
    assert math.isnan(psi(np.zeros(3), np.array([1, 2, 3])))
    assert math.isnan(psi(np.array([1, 2, 3]), np.zeros(3)))
    with pytest.raises(ValueError):
        psi(np.array([1, 2]), np.array([1, 2, 3]))


# --------------------------------------------------------------------------- JS


@pytest.mark.parametrize("kind", KINDS)
def test_js_matches_scipy(kind: str) -> None:
    x, y = _sample_pair(kind, 5000, 20000, seed=2)
    _, ref, cur = _binned(x, y)
    expected = jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2)
    assert js_distance(ref, cur) == pytest.approx(expected, rel=1e-9)


def test_js_with_empty_bins_and_edge_cases() -> None:
    ref = np.array([10, 0, 5, 0, 1])
    cur = np.array([0, 3, 5, 0, 9])
    expected = jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2)
    assert js_distance(ref, cur) == pytest.approx(expected, rel=1e-9)
    assert js_distance(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    assert math.isnan(js_distance(np.zeros(2), np.array([1, 1])))


# --------------------------------------------------------------------------- KS


@pytest.mark.parametrize("n,m", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_ks_binned_close_to_exact(kind: str, n: int, m: int) -> None:
    x, y = _sample_pair(kind, n, m, seed=3)
    _, ref, cur = _binned(x, y)
    d, p = ks_from_counts(ref, cur)
    exact = sps.ks_2samp(x, y, method="asymp")
    # Boundaries are a subset of the points ks_2samp maximises over.
    assert d <= exact.statistic + 1e-12
    assert exact.statistic - d <= KS_BINNING_TOL
    max_share = max((ref / n).max(), (cur / m).max())
    assert exact.statistic - d <= max_share + 1e-12
    # Smaller D and the asymptotic tail (>= finite-n kstwo) => p never below scipy's.
    assert p >= exact.pvalue * (1 - 1e-9)
    assert 0.0 <= p <= 1.0


@pytest.mark.parametrize("n", [5000, 20000])
@pytest.mark.parametrize("family", ["normal", "t2", "lognormal"])
def test_ks_pvalues_ordered(family: str, n: int) -> None:
    same_kind, drift_kind = {
        "normal": ("normal/same", "normal/shift"),
        "t2": ("t2/same", "t2/shift"),
        "lognormal": ("lognormal/same", "lognormal/wider"),
    }[family]
    _, ref0, cur0 = _binned(*_sample_pair(same_kind, n, n, seed=4))
    _, ref1, cur1 = _binned(*_sample_pair(drift_kind, n, n, seed=4))
    d0, p0 = ks_from_counts(ref0, cur0)
    d1, p1 = ks_from_counts(ref1, cur1)
    assert d1 > d0
    assert p1 < 1e-3 < 0.01 < p0


def test_ks_exact_when_bins_hold_single_values() -> None:
    # Integer data binned one value per bin: the binned D *is* the exact D.
    rng = np.random.default_rng(5)
    x = rng.poisson(4.0, 3000)
    y = rng.poisson(4.4, 2000)
    edges = np.arange(1, 30) - 0.5
    k = edges.size + 1
    ref = np.bincount(bin_index(edges, x), minlength=k)
    cur = np.bincount(bin_index(edges, y), minlength=k)
    d, p = ks_from_counts(ref, cur)
    exact = sps.ks_2samp(x, y, method="asymp")
    assert d == pytest.approx(exact.statistic, abs=1e-12)
    en = 3000 * 2000 / 5000
    assert p == pytest.approx(sps.kstwobign.sf(math.sqrt(en) * exact.statistic), rel=1e-9)
    assert math.isnan(ks_from_counts(np.zeros(3), np.ones(3))[1])


# D_exact - D_binned for a window of m events against a 50,000-value reference binned
# by `profile_edges` (50 quantile bins, atoms in bins of their own), measured over 30
# seeds x {stationary, shifted} for normal, t(2), lognormal, 70%-zero + exponential,
# Poisson(4) and integers 0..299 (benchmarks/precision.py prints it):
#   m = 200: max 0.014 (t2), 1,000: max 0.0078, 10,000: max 0.0025 (Poisson(4): 0, every
#   value has its own bin). Before atoms had their own bins the 70%-zero feature lost
#   0.031 at 200 events and 0.0077 at 10,000. The rigorous bound is the largest bin
#   share of either sample; at 200 events one event is 0.005 of the window.
KS_TOL_BY_WINDOW = {200: 0.02, 1000: 0.01, 10_000: 0.004}
REF_FAMILIES = ["normal", "t2", "lognormal", "zero70", "poisson4", "int_wide"]


def _family(kind: str, rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    if kind == "normal":
        return rng.normal(shift, 1, n)
    if kind == "t2":
        return rng.standard_t(2, n) + shift
    if kind == "lognormal":
        return rng.lognormal(shift, 1, n)
    if kind == "zero70":
        return np.where(rng.random(n) < 0.7 - shift, 0.0, rng.exponential(3.0, n))
    if kind == "poisson4":
        return rng.poisson(4 + 2 * shift, n).astype(float)
    if kind == "int_wide":
        return rng.integers(0, 300, n).astype(float) + round(80 * shift)
    raise AssertionError(kind)


@pytest.mark.parametrize("m", sorted(KS_TOL_BY_WINDOW))
@pytest.mark.parametrize("kind", REF_FAMILIES)
def test_ks_binned_within_tolerance_at_every_window_size(kind: str, m: int) -> None:
    worst = 0.0
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        x = _family(kind, rng, 50_000)
        edges = profile_edges(x, BINS)
        k = edges.size + 1
        ref = np.bincount(bin_index(edges, x), minlength=k)
        for shift in (0.0, 0.1):
            y = _family(kind, rng, m, shift)
            cur = np.bincount(bin_index(edges, y), minlength=k)
            d, p = ks_from_counts(ref, cur)
            exact = sps.ks_2samp(x, y, method="asymp")
            assert d <= exact.statistic + 1e-12
            assert exact.statistic - d <= max((ref / x.size).max(), (cur / m).max()) + 1e-12
            assert p >= exact.pvalue * (1 - 1e-9)       # conservative
            worst = max(worst, exact.statistic - d)
    assert worst <= KS_TOL_BY_WINDOW[m], f"{kind} at {m}: {worst}"


@pytest.mark.parametrize("seed", range(4))
def test_atoms_get_their_own_bins(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = np.where(rng.random(30_000) < 0.7, 0.0, rng.exponential(3.0, 30_000))
    x[rng.random(x.size) < 0.05] = 5.0          # a second atom inside the continuous part
    edges = profile_edges(x, BINS)
    idx = bin_index(edges, x)
    for atom in (0.0, 5.0):
        inside = idx == bin_index(edges, np.array([atom]))[0]
        assert set(np.unique(x[inside])) == {atom}
    counts = np.bincount(idx, minlength=edges.size + 1)
    assert (counts > 0).all()                    # no empty reference bin
    # the continuous part keeps quantile bins of about 1/50 of the sample each
    rest = counts[[i for i in range(counts.size)
                   if i not in bin_index(edges, np.array([0.0, 5.0]))]]
    assert rest.max() <= 2.5 * x.size / BINS
    # without atoms, plain quantile edges are kept
    y = rng.normal(size=5000)
    np.testing.assert_array_equal(profile_edges(y, 10), quantile_edges(y, 10))


# --------------------------------------------------------------------------- fixed point


def test_fixed_point_sums_are_exact_integer_sums() -> None:
    rng = np.random.default_rng(21)
    for scale in (1.0, 1e4, 1e9, 1e15):      # int64 path, limb path, one-by-one path
        v = rng.standard_cauchy((500, 3)) * scale
        v[0, 0], v[1, 1] = np.inf, -np.inf if scale > 1e9 else 0.0
        got = fixed_point_sums(v)
        for j in range(3):
            expected = 0
            for x in v[:, j].tolist():
                if math.isfinite(x):
                    expected += int(round(x * 2**32))     # Python: exact, half to even
                else:
                    expected += (1 << 1000) * (1 if x > 0 else -1)
            assert got[j] == expected, (scale, j)
    # order independence is what the integers buy: any permutation, same bits
    v = rng.standard_cauchy((1000, 2)) * 1e3
    assert fixed_point_sums(v) == fixed_point_sums(v[::-1]) == fixed_point_sums(
        v[rng.permutation(1000)])
    assert fixed_point_value(fixed_point_sums(v)[0]) == pytest.approx(
        math.fsum(v[:, 0]), abs=1000 * 2**-33)
    assert fixed_point_sums(np.empty((0, 2))) == [0, 0]


# --------------------------------------------------------------------------- binomial


@pytest.mark.parametrize("seed", range(3))
def test_binomial_excess_pvalue_matches_scipy_binomtest(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 20_000))
        p0 = float(rng.choice([0.0, 1e-5, 0.02, 0.3, 0.9]))
        k = int(rng.integers(0, n + 1))
        expected = sps.binomtest(k, n, p0, alternative="greater").pvalue if p0 > 0 else (
            1.0 if k == 0 else 0.0)
        assert binomial_excess_pvalue(k, n, p0) == pytest.approx(expected, rel=1e-9,
                                                                 abs=1e-300)
    assert binomial_excess_pvalue(0, 0, 0.5) == 1.0


# --------------------------------------------------------------------------- chi-square


def test_chi_square_no_merging_matches_scipy_raw_table() -> None:
    rng = np.random.default_rng(9)
    for k in (2, 3, 10):  # k=2 is the dof=1 case where Yates' correction would apply
        ref = rng.integers(50, 500, k)
        cur = rng.integers(50, 500, k)
        merged_ref, merged_cur = merge_sparse_cells(ref, cur)
        np.testing.assert_array_equal(merged_ref, ref)
        np.testing.assert_array_equal(merged_cur, cur)
        res = sps.chi2_contingency(np.vstack((ref, cur)), correction=False)
        stat, p = chi_square_from_counts(ref, cur)
        assert stat == pytest.approx(res.statistic, rel=1e-10)
        assert p == pytest.approx(res.pvalue, rel=1e-8, abs=1e-300)


def test_chi_square_with_merging_matches_scipy_on_merged_table() -> None:
    ref = np.array([400, 300, 200, 3, 2, 0, 1, 0, 50])
    cur = np.array([150, 160, 110, 4, 0, 6, 0, 0, 20])
    merged_ref, merged_cur = merge_sparse_cells(ref, cur)
    # cur_total 450, ref_total 956: expected 188.3, 141.2, 94.1, 1.4, 0.9, 0, 0.5, -, 23.5
    np.testing.assert_array_equal(merged_ref, [400, 300, 200, 50, 6])
    np.testing.assert_array_equal(merged_cur, [150, 160, 110, 20, 10])
    res = sps.chi2_contingency(np.vstack((merged_ref, merged_cur)), correction=False)
    stat, p = chi_square_from_counts(ref, cur)
    assert stat == pytest.approx(res.statistic, rel=1e-10)
    assert p == pytest.approx(res.pvalue, rel=1e-8)
    # Merging matters here: the raw table (minus its all-empty column) differs.
    used = (ref + cur) > 0
    raw = sps.chi2_contingency(np.vstack((ref[used], cur[used])), correction=False)
    assert stat != pytest.approx(raw.statistic, rel=1e-3)


def test_chi_square_detects_shift_and_edge_cases() -> None:
    rng = np.random.default_rng(10)
    p0 = np.array([0.4, 0.3, 0.2, 0.1])
    ref = rng.multinomial(5000, p0)
    same = rng.multinomial(3000, p0)
    drift = rng.multinomial(3000, [0.3, 0.3, 0.2, 0.2])
    assert chi_square_from_counts(ref, same)[1] > 0.01
    assert chi_square_from_counts(ref, drift)[1] < 1e-10
    # A category empty in both samples is dropped, not pooled into an all-zero column.
    stat, p = chi_square_from_counts(np.array([100, 0, 100]), np.array([50, 0, 60]))
    res = sps.chi2_contingency(np.array([[100, 100], [50, 60]]), correction=False)
    assert (stat, p) == pytest.approx((res.statistic, res.pvalue), rel=1e-10)
    # Everything pooled into one column -> no test possible.
    assert chi_square_from_counts(np.array([1, 1, 0]), np.array([0, 1, 1])) == (0.0, 1.0)
    assert chi_square_from_counts(np.array([100]), np.array([30])) == (0.0, 1.0)
    stat, p = chi_square_from_counts(np.zeros(3), np.ones(3))
    assert math.isnan(stat) and math.isnan(p)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=20),
    st.floats(0.0, 20.0),
)
def test_merge_sparse_cells_properties(pairs: list[tuple[int, int]], min_expected: float) -> None:
    ref = np.array([a for a, _ in pairs])
    cur = np.array([b for _, b in pairs])
    mref, mcur = merge_sparse_cells(ref, cur, min_expected=min_expected)
    assert mref.sum() == ref.sum() and mcur.sum() == cur.sum()
    assert mref.size == mcur.size <= ref.size
    if ref.sum() > 0 and cur.sum() > 0:
        expected = cur.sum() * ref / ref.sum()
        keep = ((ref + cur) > 0) & (expected >= min_expected)
        n_sparse = int((((ref + cur) > 0) & ~keep).sum())
        # Kept columns first, in order, then at most one pooled column.
        np.testing.assert_array_equal(mref[: keep.sum()], ref[keep])
        assert mref.size == keep.sum() + (1 if n_sparse else 0)
        if mref.size >= 2:
            res = sps.chi2_contingency(np.vstack((mref, mcur)), correction=False)
            stat, p = chi_square_from_counts(ref, cur, min_expected=min_expected)
            assert stat == pytest.approx(res.statistic, rel=1e-9, abs=1e-12)
            assert p == pytest.approx(res.pvalue, rel=1e-7, abs=1e-300)


# --------------------------------------------------------------------------- moments etc.


def test_moments_match_numpy() -> None:
    rng = np.random.default_rng(11)
    # Large offset: the case where raw s2/n - mean^2 would lose most digits.
    x = 1e6 + 3.0 * rng.standard_normal(10_000)
    shift, scale = 1e6 + 0.5, 2.5  # deliberately not the exact mean/std
    z = (x - shift) / scale
    n, s1, s2 = float(z.size), float(z.sum()), float((z * z).sum())
    mean, var = moments(n, s1, s2, shift=shift, scale=scale)
    assert mean == pytest.approx(np.mean(x), rel=1e-12)
    assert var == pytest.approx(np.var(x), rel=1e-9)
    # Defaults: raw sums.
    y = rng.gamma(2.0, 3.0, 1000)
    mean, var = moments(y.size, y.sum(), (y * y).sum())
    assert mean == pytest.approx(np.mean(y), rel=1e-12)
    assert var == pytest.approx(np.var(y), rel=1e-9)
    # Constant data never gives a negative variance.
    c = np.full(7, 0.1)
    assert moments(7, c.sum(), (c * c).sum())[1] >= 0.0
    assert all(math.isnan(v) for v in moments(0, 0.0, 0.0))


@pytest.mark.parametrize("kind", ["normal/shift", "t2/shift", "lognormal/wider"])
def test_mean_shift_and_variance_ratio_from_window_sums_match_scipy(kind: str) -> None:
    # The whole path the engine takes (standardise, fixed-point sums, moments, ratio)
    # against scipy.stats.describe on the raw samples, over several seeds.
    for seed in range(4):
        x, y = _sample_pair(kind, 20_000, 5_000, seed=seed)
        x, y = x + 1e3, y + 1e3                       # an offset that invites cancellation
        ref, cur = sps.describe(x), sps.describe(y)
        ref_var = ref.variance * (x.size - 1) / x.size
        cur_var = cur.variance * (y.size - 1) / y.size
        shift, scale = float(np.mean(x)), float(np.std(x))
        z = ((y - shift) / scale).reshape(-1, 1)
        s1, s2 = (fixed_point_value(v[0]) for v in (fixed_point_sums(z),
                                                     fixed_point_sums(z * z)))
        mean, var = moments(y.size, s1, s2, shift=shift, scale=scale)
        assert mean_shift(ref.mean, math.sqrt(ref_var), mean) == pytest.approx(
            (cur.mean - ref.mean) / math.sqrt(ref_var), rel=1e-9, abs=1e-9)
        assert variance_ratio(ref_var, var) == pytest.approx(cur_var / ref_var, rel=1e-9)
    assert mean_shift(1.0, 2.0, 0.0) == -0.5
    assert math.isnan(mean_shift(1.0, 0.0, 2.0))
    assert math.isnan(variance_ratio(0.0, 1.0))


# --------------------------------------------------------------------------- binning


def test_quantile_edges_match_numpy() -> None:
    rng = np.random.default_rng(13)
    x = rng.lognormal(0, 1, 4000)  # quantile positions fall between order statistics
    edges = quantile_edges(x, 10)
    np.testing.assert_array_equal(edges, np.quantile(x, np.arange(1, 10) / 10))
    assert edges.size == 9
    with_nan = np.concatenate((x, [np.nan] * 50))
    np.testing.assert_array_equal(quantile_edges(with_nan, 10), edges)
    # Discrete data: tied quantiles collapse.
    d = rng.integers(0, 3, 1000).astype(float)
    ed = quantile_edges(d, 20)
    np.testing.assert_array_equal(ed, np.unique(np.quantile(d, np.arange(1, 20) / 20)))
    assert ed.size < 19 and np.all(np.diff(ed) > 0)
    assert quantile_edges(np.full(100, 3.0), 10).size == 0
    assert quantile_edges(np.array([np.nan, np.nan]), 10).size == 0
    assert quantile_edges(x, 1).size == 0
    # Reference quantile bins hold ~equal shares.
    counts = np.bincount(bin_index(edges, x), minlength=10)
    assert counts.min() == counts.max() == 400


def test_bin_index_matches_bisect_right() -> None:
    edges = np.array([-1.0, 0.0, 0.0, 2.5])
    values = np.array([-5.0, -1.0, -0.5, 0.0, 1.0, 2.5, 9.0])
    expected = [bisect.bisect_right(edges.tolist(), v) for v in values]
    np.testing.assert_array_equal(bin_index(edges, values), expected)
    np.testing.assert_array_equal(bin_index(edges, values), [0, 1, 1, 3, 3, 4, 4])
    assert bin_index(np.empty(0), np.array([1.0, -1.0])).tolist() == [0, 0]


# --------------------------------------------------------------------------- properties

_counts = st.lists(st.integers(0, 10_000), min_size=1, max_size=30)


def _pair_strategy():
    return _counts.flatmap(
        lambda a: st.tuples(
            st.just(np.array(a)),
            st.lists(st.integers(0, 10_000), min_size=len(a), max_size=len(a)).map(np.array),
        )
    ).filter(lambda t: t[0].sum() > 0 and t[1].sum() > 0)


@settings(max_examples=200, deadline=None)
@given(_pair_strategy(), st.floats(0.01, 5.0))
def test_psi_properties(pair: tuple[np.ndarray, np.ndarray], smoothing: float) -> None:
    ref, cur = pair
    value = psi(ref, cur, smoothing=smoothing)
    assert value >= 0.0
    assert value == pytest.approx(_psi_direct(ref, cur, smoothing), rel=1e-9, abs=1e-15)
    assert psi(ref, ref, smoothing=smoothing) == 0.0
    # Scaling the counts keeps the unsmoothed shares, hence PSI(x, k x) == 0.
    assert psi(ref, 3 * ref, smoothing=0.0) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(_pair_strategy())
def test_js_properties(pair: tuple[np.ndarray, np.ndarray]) -> None:
    ref, cur = pair
    d = js_distance(ref, cur)
    assert 0.0 <= d <= 1.0
    assert d == js_distance(cur, ref)
    assert js_distance(ref, ref) == 0.0
    assert d == pytest.approx(
        jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2), rel=1e-9, abs=1e-12
    )


@settings(max_examples=200, deadline=None)
@given(_pair_strategy())
def test_ks_properties(pair: tuple[np.ndarray, np.ndarray]) -> None:
    ref, cur = pair
    d, p = ks_from_counts(ref, cur)
    assert 0.0 <= d <= 1.0
    assert 0.0 <= p <= 1.0
    assert ks_from_counts(cur, ref) == (d, p)
    assert ks_from_counts(ref, ref)[0] == 0.0
    # Independent CDF: per-bin running sums via a Python loop.
    fr = fc = 0.0
    best = 0.0
    for a, b in zip(ref, cur, strict=True):
        fr += a / ref.sum()
        fc += b / cur.sum()
        best = max(best, abs(fr - fc))
    assert d == pytest.approx(best, abs=1e-12)


def test_grid_sums_with_a_bound_are_the_exact_sums() -> None:
    # the engine passes a per-column bound of |q|: columns whose sums stay below 2**53
    # are summed in float64, the others as before; every column must be the exact sum
    from stream_monitor.core.stats import grid_sums
    rng = np.random.default_rng(5)
    for rows in (1, 700, 20_000):
        q = np.rint(np.column_stack([
            rng.normal(0, 2**32, rows),                 # float-safe
            rng.normal(0, 2**45, rows),                 # needs int64 at 20,000 rows
            rng.standard_cauchy(rows) * 2**50,          # beyond int64: limbs
            np.full(rows, 2.0**52 / rows)]))            # at the float bound
        peak = np.abs(q).max(axis=0)
        want = [sum(int(v) for v in q[:, j].tolist()) for j in range(q.shape[1])]
        assert grid_sums(q.copy(), peak) == want == grid_sums(q.copy())
        assert grid_sums(q.copy(), np.full(4, np.nan)) == want   # no bound: general path
