"""The evaluator scores all features of a kind at once (`stats.*_rows`); its reports must
equal the one-column path (`WindowEvaluator._numeric_column` / `_categorical_column`,
built on the one-column statistics that test_stats checks against scipy) on every
value: severities, flags and counts exactly, floats within 1e-12 relative (sums added
in another order). Windows come from the real decoder and accumulators, on events
unlike the repo's generator: booleans, nulls, absent keys, integer ties, Cauchy tails,
a 5,000-category feature, per-feature drift rules and a feature without values.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from stream_monitor.config import DecodeConfig, ProfileConfig, parse_config
from stream_monitor.core.engine import ClosedWindow, WindowAccumulator
from stream_monitor.core.reference import ReferenceBuilder
from stream_monitor.io.decode import Decoder
from stream_monitor.pipeline import ModelPipeline

REL = 1e-12


def _rows(rng: np.random.Generator, n: int, drift: float) -> list[dict]:
    merchants = [f"m{i:04d}" for i in range(5_000)]
    w = 1.0 / np.arange(1, 5_001) ** 1.1
    shop = rng.choice(5_000, n, p=w / w.sum())
    if drift:
        shop = np.where(rng.random(n) < drift, rng.integers(0, 5_000, n), shop)
    out = []
    for i in range(n):
        r = {
            "gauss": float(rng.normal(drift * 2, 1.0)),
            "cauchy": float(rng.standard_cauchy()),
            "count": int(rng.poisson(3 + 3 * drift)),
            "zeros": 0.0 if rng.random() < 0.7 else float(rng.exponential(50)),
            "flag": bool(rng.random() < 0.2 + drift),
            "plan": str(rng.choice(["a", "b", "c", "d"], p=[.4, .3, .2, .1])),
            "shop": merchants[shop[i]],
            "empty": None,
        }
        if rng.random() < 0.03:
            del r["gauss"]              # absent key
        if rng.random() < 0.03 + 0.04 * drift:
            r["count"] = None           # null
        if drift and rng.random() < 0.3:
            r["plan"] = "new-plan"      # never seen in the reference
        out.append(r)
    return out


def _close(a, b, path=()) -> None:
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _close(a[k], b[k], (*path, k))
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=REL, abs=1e-300) or (math.isnan(a) and math.isnan(b)), path
    else:
        assert a == b and type(a) is type(b), (path, a, b)


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_evaluate_equals_the_one_column_path(seed: int) -> None:
    rng = np.random.default_rng(seed)
    train = _rows(rng, 6_000, 0.0)
    train[0]["empty"] = 1.0             # a numeric feature that is null in every window
    builder = ReferenceBuilder("m", ProfileConfig())
    for r in train:
        builder.add(r, None)
    cfg = parse_config({"models": {"m": {
        "reference": "unused.json",
        # low thresholds: small windows cross them without being significant (the gate)
        "data_quality": {"missing": {"warning": 0.01, "critical": 0.5},
                         "schema": {"warning": 0.005, "critical": 0.5}},
        "features": {"cauchy": {"drift": {"method": "ks", "warning": 0.05, "critical": 0.1}},
                     "gauss": {"drift": {"method": "mean_shift", "warning": 0.2,
                                         "critical": 0.5}},
                     "shop": {"drift": {"method": "jensen_shannon", "warning": 0.05,
                                        "critical": 0.1}}}}}})
    pipe = ModelPipeline("m", cfg, builder.build())
    ev = pipe.evaluator
    decoder = Decoder({"m": pipe.schema}, DecodeConfig())
    severities, gated = set(), 0
    # windows below and above min_events (200); drift 0.5 on 250 events: missing rates
    # over their threshold but not significant
    for drift, size in ((0.0, 3_000), (0.3, 3_000), (1.0, 3_000), (0.5, 250), (0.5, 150)):
        lines = [orjson.dumps({"model": "m", "features": r}) for r in _rows(rng, size, drift)]
        decoded = decoder.decode(lines, range(len(lines)))
        acc = WindowAccumulator.empty(ev.layout)
        acc.update(ev.layout, decoded.models["m"])
        report = ev.evaluate(ClosedWindow("m", 0, acc))
        k = len(ev.numeric)
        for j, name in enumerate(ev.numeric):
            want = ev._numeric_column(name, ev.reference.features[name], ev.layout.numeric,
                                      acc.numeric, j, ev.features[name], int(acc.absent[j]),
                                      int(acc.type_violations[j]), acc.events)
            _close(report["features"][name], want, (drift, name))
        for j, name in enumerate(ev.categorical):
            want = ev._categorical_column(
                name, ev.reference.features[name], ev.layout.categorical, acc.categorical, j,
                ev.features[name], int(acc.absent[k + j]), int(acc.type_violations[k + j]),
                acc.events)
            _close(report["features"][name], want, (drift, name))
        severities |= {f["severity"] for f in report["features"].values()}
        severities |= {q["severity"] for f in report["features"].values()
                       for q in f["data_quality"].values()}
        gated += sum(q["severity"] == "ok" and (q["value"] or 0) >= 0.01 and "pvalue" in q
                     for f in report["features"].values() for q in f["data_quality"].values())
    # the comparison covered flagged features and findings, not only quiet ones
    assert {"ok", "warning", "critical"} <= severities
    assert gated
    assert report["features"]["empty"]["stats"]["count"] == 0
