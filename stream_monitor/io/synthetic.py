"""Synthetic inference traffic for the demo, the tests and the benchmarks.

A churn-like model with 20 numeric features (four heavy-tailed, one with missing
values) and 5 categorical ones (one with 2,000 Zipf-distributed categories), a score
prediction and an optional label, about 700 bytes per JSON event. Drift can be
injected from a given event on: a mean shift (in reference standard deviations) in
chosen numeric features, a frequency change in a categorical feature, a feature that
goes missing, or a feature sent on another scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

NUMERIC = [f"f{i:02d}" for i in range(20)]
HEAVY_TAILED = {"f16": 2.0, "f17": 3.0}           # Student-t degrees of freedom
LOGNORMAL = {"f18", "f19"}
WITH_MISSING = {"f05": 0.02}
CATEGORICAL = {
    "plan": (["basic", "standard", "premium", "student"], [0.4, 0.3, 0.2, 0.1]),
    "region": ([f"r{i:02d}" for i in range(30)], None),
    "device": (["ios", "android", "web"], [0.45, 0.4, 0.15]),
    "merchant": ([f"m{i:04d}" for i in range(2000)], "zipf"),
    "channel": (["organic", "paid", "referral", "email", "social", "partner"],
                [0.3, 0.25, 0.15, 0.1, 0.1, 0.1]),
}
SHIFTED_PLAN = [0.1, 0.2, 0.3, 0.4]               # reversed popularity of plans
_MEANS = np.linspace(-3, 40, 20)
_SDS = np.linspace(0.5, 12, 20)
_COEF = np.random.default_rng(7).normal(0, 0.3, 20)


def _probabilities(spec) -> np.ndarray:
    cats, p = spec
    if p is None:
        return np.full(len(cats), 1 / len(cats))
    if isinstance(p, str):
        w = 1.0 / np.arange(1, len(cats) + 1) ** 1.1
        return w / w.sum()
    return np.asarray(p, dtype=float)


@dataclass
class Drift:
    """What changes from event `at` on (events are numbered from 0)."""

    at: int
    mean_shift: dict[str, float] = field(default_factory=dict)   # feature -> shift in sds
    categorical: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, float] = field(default_factory=dict)      # feature -> missing share
    rescale: dict[str, float] = field(default_factory=dict)      # feature -> factor


def default_drift(at: int) -> Drift:
    """The drift the tests expect to find: 4 numeric features and 1 categorical."""
    return Drift(at=at, mean_shift={f: 0.5 for f in ("f01", "f04", "f09", "f12")},
                 categorical={"plan": SHIFTED_PLAN})


def _numeric_block(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, 20)) * _SDS + _MEANS
    for name, df in HEAVY_TAILED.items():
        j = NUMERIC.index(name)
        x[:, j] = rng.standard_t(df, n) * _SDS[j] + _MEANS[j]
    for name in sorted(LOGNORMAL):      # a set: its order changes with the hash seed
        j = NUMERIC.index(name)
        x[:, j] = rng.lognormal(1.0, 0.8, n)
    return x


def _reference_sd(name: str) -> float:
    """Population sd of each feature, to express shifts in sds."""
    j = NUMERIC.index(name)
    if name in HEAVY_TAILED:
        df = HEAVY_TAILED[name]
        return float(_SDS[j] * (np.sqrt(df / (df - 2)) if df > 2 else 1.0))
    if name in LOGNORMAL:
        return float(np.sqrt((np.exp(0.64) - 1) * np.exp(2 + 0.64)))
    return float(_SDS[j])


def generate(n: int, *, seed: int = 0, model: str = "churn", drift: Drift | None = None,
             start_index: int = 0, start_ts: float = 1_790_000_000.0, rate: float = 100.0,
             labels: bool = False, chunk: int = 10_000) -> Iterator[list[bytes]]:
    """Yield chunks of JSON-encoded inference events (bytes, one per event)."""
    rng = np.random.default_rng(seed)
    probs = {k: _probabilities(v) for k, v in CATEGORICAL.items()}
    dumps = orjson.dumps
    done = 0
    while done < n:
        m = min(chunk, n - done)
        idx = np.arange(start_index + done, start_index + done + m)
        x = _numeric_block(rng, m)
        after = (idx >= drift.at) if drift else np.zeros(m, bool)
        cats = {}
        for name, (values, _) in CATEGORICAL.items():
            codes = rng.choice(len(values), m, p=probs[name])
            if drift and name in drift.categorical and after.any():
                p2 = np.asarray(drift.categorical[name], float)
                codes[after] = rng.choice(len(values), int(after.sum()), p=p2 / p2.sum())
            cats[name] = np.asarray(values, dtype=object)[codes]
        if drift:
            for name, s in drift.mean_shift.items():
                x[after, NUMERIC.index(name)] += s * _reference_sd(name)
            for name, factor in drift.rescale.items():
                x[after, NUMERIC.index(name)] *= factor
        score = 1 / (1 + np.exp(-np.clip(((x - _MEANS) / _SDS) @ _COEF, -30, 30)))
        missing = rng.random((m, 20))
        xs = np.round(x, 9).tolist()
        scores = np.round(score, 6).tolist()
        label = (rng.random(m) < score).astype(int).tolist()
        out = []
        for i in range(m):
            row = xs[i]
            feats = dict(zip(NUMERIC, row, strict=True))
            for name, share in WITH_MISSING.items():
                if missing[i, 0] < share:
                    feats[name] = None
            if drift and after[i]:
                for name, share in drift.missing.items():
                    if missing[i, 1] < share:
                        feats[name] = None
            for name in CATEGORICAL:
                feats[name] = cats[name][i]
            k = int(idx[i])
            ev = {"model": model, "model_version": "v3", "event_id": f"{model}-{k}",
                  "ts": start_ts + k / rate, "features": feats, "prediction": scores[i],
                  "scores": {"churn": scores[i], "stay": round(1 - scores[i], 6)},
                  "segment": {"region": feats["region"]}}
            if labels:
                ev["label"] = label[i]
            out.append(dumps(ev))
        done += m
        yield out


def write_jsonl(path: str | Path, n: int, **kwargs) -> Path:
    path = Path(path)
    with path.open("wb") as fh:
        for chunk in generate(n, **kwargs):
            fh.write(b"\n".join(chunk))
            fh.write(b"\n")
    return path
