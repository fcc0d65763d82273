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
