"""Performance statistics against independent implementations (river, scipy, loops).

Tolerances: 1e-9 where both sides compute the same exact quantity in floating point;
CBPE is an expectation, checked against realized figures on calibrated draws (0.02).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from river import metrics as rm
from scipy.stats import mannwhitneyu

from stream_monitor.core import perfstats as ps


def _river(metric, ys, yhats):
    for a, b in zip(ys, yhats, strict=True):
        metric.update(a, b)
    return metric.get()


def _draw(seed, family, n=3000, k=2):
    rng = np.random.default_rng(seed)
    if family == "ties":  # scores on a coarse grid: many ties
        p = np.round(rng.beta(2, 3, n), 1)
    elif family == "extreme":
        p = rng.beta(0.2, 0.2, n)
    else:
        p = rng.beta(2, 5, n)
    y = (rng.random(n) < p).astype(np.int64)
    return p, y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("family", ["beta", "ties", "extreme"])
def test_binary_metrics_match_river_and_scipy(seed, family):
    p, y = _draw(seed, family)
    yhat = (p >= 0.5).astype(np.int64)
    proba = np.column_stack([1 - p, p])
    m = ps.classification_metrics(y, yhat, proba, 2, positive=1)
    yb, hb = (y == 1).tolist(), (yhat == 1).tolist()
    assert m["accuracy"] == pytest.approx(_river(rm.Accuracy(), yb, hb), abs=1e-9)
    assert m["precision"] == pytest.approx(_river(rm.Precision(), yb, hb), abs=1e-9)
    assert m["recall"] == pytest.approx(_river(rm.Recall(), yb, hb), abs=1e-9)
    assert m["f1"] == pytest.approx(_river(rm.F1(), yb, hb), abs=1e-9)
    ll = rm.LogLoss()
    for a, q in zip(yb, p.tolist(), strict=True):
        ll.update(a, q)
    assert m["log_loss"] == pytest.approx(ll.get(), abs=1e-9)
    u = mannwhitneyu(p[y == 1], p[y == 0]).statistic
    assert m["roc_auc"] == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-9)
    # ECE against a plain loop
    conf = np.maximum(p, 1 - p)
    hit = yhat == y
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        sel = [(c >= lo and (c < hi or b == 9)) for c in conf]
        sel = np.array(sel)
        if sel.any():
            ece += abs(hit[sel].mean() - conf[sel].mean()) * sel.sum() / len(p)
    assert m["ece"] == pytest.approx(ece, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_macro_metrics_match_river(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 2000)
    yhat = np.where(rng.random(2000) < 0.6, y, rng.integers(0, 4, 2000))
    m = ps.classification_metrics(y, yhat, None, 4, positive=None)
    assert m["accuracy"] == pytest.approx(_river(rm.Accuracy(), y.tolist(), yhat.tolist()))
    assert m["precision"] == pytest.approx(_river(rm.MacroPrecision(), y.tolist(),
                                                  yhat.tolist()), abs=1e-9)
    assert m["recall"] == pytest.approx(_river(rm.MacroRecall(), y.tolist(), yhat.tolist()),
                                        abs=1e-9)
    assert m["f1"] == pytest.approx(_river(rm.MacroF1(), y.tolist(), yhat.tolist()), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_metrics_match_river(seed):
    rng = np.random.default_rng(seed)
    y = rng.standard_cauchy(2000) if seed == 2 else rng.gamma(2.0, 3.0, 2000)
    y[::50] = 0.0  # zeros are left out of MAPE
    yhat = y + rng.normal(0, 1.0, y.size)
    m = ps.regression_metrics(y, yhat)
    assert m["mae"] == pytest.approx(_river(rm.MAE(), y.tolist(), yhat.tolist()), rel=1e-9)
    assert m["rmse"] == pytest.approx(_river(rm.RMSE(), y.tolist(), yhat.tolist()), rel=1e-9)
    nz = y != 0
    assert m["mape"] == pytest.approx(np.mean(np.abs((yhat[nz] - y[nz]) / y[nz])), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_cbpe_expectation_matches_realized_on_calibrated_scores(seed):
    p, _ = _draw(seed, "beta", n=20000)
    rng = np.random.default_rng(100 + seed)
    y = (rng.random(p.size) < p).astype(np.int64)
    yhat = (p >= 0.5).astype(np.int64)
    proba = np.column_stack([1 - p, p])
    est = ps.cbpe(proba, yhat, 1)
    real = ps.classification_metrics(y, yhat, proba, 2, 1)
    assert abs(est["accuracy"] - real["accuracy"]) < 0.02
    assert abs(est["roc_auc"] - real["roc_auc"]) < 0.02


def test_expected_auc_of_certain_scores_is_exact():
    p = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    assert ps.expected_roc_auc(p) == 1.0
    assert math.isnan(ps.expected_roc_auc(np.ones(4)))


def test_tests_of_means_and_proportions():
    assert ps.mean_test_p(1000, 0.3, 0.21, 1000, 0.2, 0.16) < 1e-6
    assert ps.mean_test_p(1000, 0.2, 0.16, 1000, 0.2, 0.16) == pytest.approx(0.5)
    assert ps.proportion_test_p(100, 1000, 200, 1000) < 1e-6
    assert ps.proportion_test_p(200, 1000, 200, 1000) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_ranks_equal_scipy_rankdata_bit_for_bit(seed):
    """roc_auc's ranks: the same float64 values as scipy's `rankdata` (average ties), so
    the AUC keeps every bit; ties, integer ties, Cauchy tails, signed zeros, n=1."""
    from scipy.stats import rankdata
    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, 2000, 5003):
        for x in (rng.random(n), rng.integers(0, 5, n).astype(float),
                  np.round(rng.standard_cauchy(n), 1), np.round(rng.random(n), 2),
                  np.where(rng.random(n) < 0.5, 0.0, -0.0)):
            got, want = ps.average_ranks(x), rankdata(x)
            assert got.dtype == want.dtype and np.array_equal(got, want)
            y = rng.random(n) < 0.3
            if 0 < y.sum() < n:
                assert ps.roc_auc(y, x) == float(
                    (want[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (n - y.sum())))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_roc_auc_distinct_scores_take_the_same_sums(seed):
    """Distinct scores skip the grouping: the figure keeps every bit of the grouped sums
    (np.unique + bincount, written out here), signed zeros and exact 0 and 1 included."""
    rng = np.random.default_rng(seed)
    for p in (rng.random(10_000), rng.beta(0.3, 0.3, 2000), np.array([-0.0, 0.25, 1.0]),
              np.concatenate([[0.0, 1.0], rng.random(997)]), np.round(rng.random(3000), 2)):
        q = np.clip(p, 0.0, 1.0)
        values, inverse = np.unique(-q, return_inverse=True)
        tpr = np.concatenate([[0.0], np.cumsum(np.bincount(inverse, q)) / q.sum()])
        fpr = np.concatenate([[0.0], np.cumsum(np.bincount(inverse, 1 - q)) / (1 - q).sum()])
        want = float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))
        assert ps.expected_roc_auc(p) == want


def _expected_roc_auc_by_full_sort(p):
    """The figure as computed before the radix sort and the inlined trapezoid: np.sort,
    concatenations and np.trapezoid (the independent spelling the new one must match)."""
    p = np.clip(np.asarray(p, float), 0.0, 1.0)
    pos, neg = p.sum(), (1 - p).sum()
    if pos <= 0 or neg <= 0:
        return math.nan
    if np.isnan(p).any():
        _, inverse = np.unique(-p, return_inverse=True)
        tp, fp = np.bincount(inverse, p), np.bincount(inverse, 1 - p)
    else:
        s = np.sort(p)[::-1]
        new = np.concatenate([[True], s[1:] != s[:-1]])
        group = np.cumsum(new) - 1
        tp, fp = np.bincount(group, s), np.bincount(group, 1 - s)
    tpr = np.concatenate([[0.0], np.cumsum(tp) / pos])
    fpr = np.concatenate([[0.0], np.cumsum(fp) / neg])
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def _awkward_unit_scores(rng, n):
    """Scores in [0, 1] that a radix sort on the top 48 bits can get wrong or tie."""
    base = rng.random(n)
    twins = base.copy()  # equal in the top 48 bits, different below: the fallback
    twins[1::2] = (base[::2][: twins[1::2].size].view(np.uint64) ^ np.uint64(0x3)).view(float)
    return {
        "uniform": base,
        "rounded ties": np.round(base, 2),
        "six decimals": np.round(base, 6),
        "float32 scores": base.astype(np.float32).astype(float),
        "low-bit twins": np.clip(twins, 0.0, 1.0),
        "signed zeros": np.where(rng.random(n) < 0.1, -0.0, base),
        "zeros and ones": np.where(rng.random(n) < 0.5, 0.0, 1.0),
        "extreme beta": rng.beta(0.05, 0.05, n),
        "subnormals": np.where(rng.random(n) < 0.3, 5e-324 * rng.integers(1, 9, n), base),
        "descending": np.sort(base)[::-1].copy(),
        "with NaN": np.where(rng.random(n) < 0.01, np.nan, base),
        "out of range": base * 3 - 1,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sorted_unit_is_np_sort_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 100, 4095, 4096, 10_000, 25_001):
        for name, p in _awkward_unit_scores(rng, n).items():
            q = np.clip(p, 0.0, 1.0)
            if np.isnan(q).any():
                continue
            got, want = ps.sorted_unit(q), np.sort(q)
            assert got.tobytes() == want.tobytes() or (
                # -0.0 and 0.0 compare equal: np.sort may order them either way
                np.array_equal(got, want) and name == "signed zeros"), (name, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_roc_auc_keeps_every_bit_of_the_full_sort(seed):
    """The radix sort and the inlined trapezoid give the figure of the full sort and
    np.trapezoid to the last bit, on scores that tie, collide in their top bits, carry
    signed zeros, NaN, subnormals or values outside [0, 1]."""
    rng = np.random.default_rng(seed)
    for n in (3, 2000, 4096, 10_000):
        for name, p in _awkward_unit_scores(rng, n).items():
            got, want = ps.expected_roc_auc(p), _expected_roc_auc_by_full_sort(p)
            assert (math.isnan(got) and math.isnan(want)) or got == want, (name, n)


def _classification_metrics_before(y, yhat, proba, n_classes, positive):
    """classification_metrics as it was before its one-pass confusion counts and its
    copy-free path for fully scored windows (the old path, kept to compare bits)."""
    y, yhat = np.asarray(y, np.int64), np.asarray(yhat, np.int64)
    out = {"accuracy": ps._f((y == yhat).mean()) if y.size else None}
    if positive is not None:
        tp, fp, fn, tn = ps.binary_counts(y == positive, yhat == positive)
        p, r, f = ps.prf(tp, fp, fn)
        out.update(precision=ps._f(p), recall=ps._f(r), f1=ps._f(f), true_positive_rate=ps._f(r),
                   false_positive_rate=ps._f(ps._ratio(fp, fp + tn)),
                   label_positive_rate=ps._f((y == positive).mean()),
                   predicted_positive_rate=ps._f((yhat == positive).mean()))
    else:
        pr_, rs, fs = [], [], []
        for c in np.union1d(np.unique(y), np.unique(yhat)):
            p, r, f = ps.prf(*ps.binary_counts(y == c, yhat == c)[:3])
            pr_.append(0.0 if p != p else p)
            rs.append(0.0 if r != r else r)
            fs.append(0.0 if f != f else f)
        out.update(precision=ps._f(np.mean(pr_)) if pr_ else None,
                   recall=ps._f(np.mean(rs)) if rs else None, f1=ps._f(np.mean(fs)) if fs else None)
    if proba is not None and proba.size:
        have = ~np.isnan(proba).any(axis=1)
        if have.any():
            pr, yt, yh = proba[have], y[have], yhat[have]
            rows = np.arange(pr.shape[0])
            out["log_loss"] = ps._f(ps.log_loss(pr[rows, yt]))
            out["ece"] = ps._f(ps.expected_calibration_error(pr[rows, yh], yt == yh))
            if positive is not None:
                out["roc_auc"] = ps._f(ps.roc_auc(yt == positive, pr[:, positive]))
            out["scored"] = int(have.sum())
    return out


def _cbpe_before(proba, yhat, positive):
    """perfstats.cbpe as it was before its copy-free path for fully scored windows."""
    if proba is None or not proba.size:
        return {}
    have = ~np.isnan(proba).any(axis=1)
    if not have.any():
        return {}
    pr, yh = proba[have], np.asarray(yhat, np.int64)[have]
    out = {"accuracy": ps._f(pr[np.arange(pr.shape[0]), yh].mean()), "scored": int(have.sum())}
    if positive is not None:
        out["roc_auc"] = ps._f(ps.expected_roc_auc(pr[:, positive]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_keep_every_bit_of_the_old_path(seed):
    """Binary and multiclass windows, every row scored, some rows without scores, none
    scored, one class only, tied scores: every figure equal to the last bit (and CBPE's
    estimate of the window too)."""
    rng = np.random.default_rng(seed)
    for n in (1, 5, 2000):
        for k, positive in ((2, 1), (2, 0), (4, None), (3, 1)):
            y = rng.integers(0, k, n)
            yhat = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
            proba = rng.dirichlet(np.ones(k), n)
            proba[:, 0] = np.round(proba[:, 0], 1)  # ties
            some = proba.copy()
            some[rng.random(n) < 0.2] = np.nan
            for pr in (proba, some, np.full((n, k), np.nan), None):
                for yy in (y, np.zeros(n, np.int64)):
                    got = ps.classification_metrics(yy, yhat, pr, k, positive)
                    want = _classification_metrics_before(yy, yhat, pr, k, positive)
                    assert got.keys() == want.keys()
                    for key, v in want.items():
                        assert got[key] == v or (v is None and got[key] is None), key
                    assert ps.cbpe(pr, yhat, positive) == _cbpe_before(pr, yhat, positive)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sorted_unit_is_np_sort_when_the_top_32_bits_collide(seed):
    """The radix passes order the top 32 bits only: scores equal there and different
    below (full-precision scores a few ulps apart, values whose bits differ only in the
    low word, subnormals, signed zeros among them) are put in order by the fallback,
    value for value that of np.sort, and so is the expected ROC AUC."""
    rng = np.random.default_rng(seed)
    n = 10_000
    base = rng.random(n)
    low = base.view(np.uint64) ^ rng.integers(0, 2**32, n, dtype=np.uint64)
    near = base[rng.integers(0, 50, n)] + rng.integers(-40, 40, n) * np.spacing(0.5)
    cases = {
        "low word differs": np.clip(low.view(float), 0.0, 1.0),
        "few distinct tops": np.clip(near, 0.0, 1.0),
        "full precision": rng.random(n),
        "subnormals and zeros": np.where(rng.random(n) < 0.5, 5e-324 * rng.integers(0, 1 << 30, n),
                                         np.where(rng.random(n) < 0.5, -0.0, base)),
        "sorted descending": np.sort(low.view(float).clip(0, 1))[::-1].copy(),
    }
    for name, q in cases.items():
        got, want = ps.sorted_unit(q), np.sort(q)
        assert np.array_equal(got, want), name
        if not (q == 0).any():
            assert got.tobytes() == want.tobytes(), name
        want_auc = _expected_roc_auc_by_full_sort(q)
        got_auc = ps.expected_roc_auc(q)
        assert got_auc == want_auc or (np.isnan(got_auc) and np.isnan(want_auc)), name
