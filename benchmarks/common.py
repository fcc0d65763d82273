"""Shared setup for the benchmarks: a synthetic workload and a monitor for it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from stream_monitor.config import ProfileConfig, parse_config
from stream_monitor.core.reference import build_reference
from stream_monitor.io import synthetic
from stream_monitor.pipeline import Monitor


def workload(n: int, seed: int = 2) -> list[bytes]:
    """n JSON inference events: 20 numeric + 5 categorical features, ~650-700 bytes."""
    return [m for chunk in synthetic.generate(n, seed=seed) for m in chunk]


def monitor(window_events: int = 10_000) -> Monitor:
    """A monitor with the default settings and a reference built from 50k training events."""
    tmp = Path(tempfile.mkdtemp(prefix="sm-bench-"))
    train = synthetic.write_jsonl(tmp / "train.jsonl", 50_000, seed=1)
    ref = build_reference(train, "churn", ProfileConfig())
    ref_path = tmp / "churn.json"
    ref.save(ref_path)
    cfg = parse_config({"defaults": {"window": {"events": window_events}},
                        "models": {"churn": {"reference": str(ref_path)}}})
    return Monitor(cfg)


# -- a realistic workload, unlike the repo's own generator ---------------------------------
# Booleans (categorical), integer features with ties, heavy tails (Cauchy, Student-t),
# a zero-inflated feature, a 5,000-category Zipf feature, 2% absent keys and 2% nulls.

NAMES = {  # feature names as producers spell them (events ~650 bytes, like the clean ones)
    "n00": "session_len", "n01": "basket_eur", "n02": "tenure_days", "n03": "aov_30d",
    "n04": "pages_per_visit", "n05": "time_on_site", "n06": "discount", "n07": "dist_km",
    "n08": "latency_ms", "n09": "utilisation", "a00": "balance_chg", "a01": "return_ratio",
    "a02": "income", "a03": "refund_eur", "count": "tickets_90d", "age": "age",
    "items": "items", "score": "credit_score", "rating": "rating", "n_logins": "logins_30d",
    "is_new": "is_new", "vip": "is_vip", "plan": "plan", "country": "country",
    "merchant": "merchant_id"}
REAL_ABSENT = ("a00", "a03", "n02", "n07", "merchant")      # key absent in 2% of events
REAL_NULL = ("a01", "n04", "n09", "count", "plan")           # null in 2% of events


def realistic_workload(n: int, seed: int = 3, model: str = "rt") -> list[bytes]:
    """n JSON events of 20 numeric + 5 categorical features, about 650 bytes each."""
    import numpy as np
    import orjson

    rng = np.random.default_rng(seed)
    merchants = np.array([f"shop-{i:05d}" for i in range(5_000)], dtype=object)
    w = 1.0 / np.arange(1, 5_001) ** 1.05
    cols: dict[str, list] = {}
    for i in range(10):                                  # plain floats
        cols[f"n{i:02d}"] = np.round(rng.normal(i, 1 + i, n), 6).tolist()
    cols["a00"] = np.round(rng.standard_cauchy(n), 6).tolist()          # very heavy tails
    cols["a01"] = np.round(rng.standard_t(1.5, n) * 3, 6).tolist()
    cols["a02"] = np.round(rng.lognormal(2, 1.2, n), 4).tolist()
    cols["a03"] = np.round(np.where(rng.random(n) < 0.7, 0.0, rng.exponential(50, n)),
                           2).tolist()                                   # zero-inflated
    cols["count"] = rng.poisson(3, n).tolist()                           # ints with ties
    cols["age"] = rng.integers(18, 90, n).tolist()
    cols["items"] = rng.geometric(0.3, n).tolist()
    cols["score"] = rng.integers(300, 850, n).tolist()
    cols["rating"] = rng.choice([1, 2, 3, 4, 5], n, p=[.05, .1, .2, .35, .3]).tolist()
    cols["n_logins"] = rng.negative_binomial(2, 0.1, n).tolist()
    cols["is_new"] = (rng.random(n) < 0.2).tolist()                      # booleans
    cols["vip"] = (rng.random(n) < 0.05).tolist()
    cols["plan"] = rng.choice(["basic", "standard", "premium", "student"], n,
                              p=[.4, .3, .2, .1]).tolist()
    cols["country"] = rng.choice([f"c{i:02d}" for i in range(40)], n).tolist()
    cols["merchant"] = merchants[rng.choice(5_000, n, p=w / w.sum())].tolist()
    absent = {NAMES[k]: rng.random(n) < 0.02 for k in REAL_ABSENT}
    null = {NAMES[k]: rng.random(n) < 0.02 for k in REAL_NULL}
    pred = np.round(rng.random(n), 5).tolist()
    ids = [f"{a:032x}" for a in rng.integers(0, 2**63, (n,)).tolist()]
    names = [NAMES[k] for k in cols]
    rows = list(zip(*cols.values(), strict=True))
    out = []
    dumps = orjson.dumps
    for i, row in enumerate(rows):
        feats = dict(zip(names, row, strict=True))
        for k, m in absent.items():
            if m[i]:
                del feats[k]
        for k, m in null.items():
            if m[i]:
                feats[k] = None
        out.append(dumps({"model": model, "model_version": "2.1", "event_id": ids[i],
                          "ts": 1_790_000_000 + i * 0.01, "features": feats,
                          "prediction": pred[i], "scores": {"yes": pred[i]}}))
    return out


def realistic_monitor(window_events: int = 10_000) -> Monitor:
    """A monitor for `realistic_workload`, its reference built from 50k other events."""
    tmp = Path(tempfile.mkdtemp(prefix="sm-bench-rt-"))
    train = tmp / "train.jsonl"
    train.write_bytes(b"\n".join(realistic_workload(50_000, seed=99)) + b"\n")
    ref = build_reference(train, "rt", ProfileConfig())
    ref_path = tmp / "rt.json"
    ref.save(ref_path)
    cfg = parse_config({"defaults": {"window": {"events": window_events}},
                        "models": {"rt": {"reference": str(ref_path)}}})
    return Monitor(cfg)
