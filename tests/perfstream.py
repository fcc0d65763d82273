"""Labelled streams for the performance tests (unlike the repo's synthetic generator).

A calibrated binary classifier: p = sigmoid(a + b*x), prediction "yes"/"no" with scores,
label ~ Bernoulli(p_true). Features: a normal `x`, a Cauchy-tailed `noise`, a
300-category `sku` (null in 10% of events), a boolean `flag` and nulls; a
`region` segment. Scenario switches change one thing at `change_at` (an event index,
deliberately off any window grid): the label function (concept drift), the base rate
(label shift), one segment's labels (segment degradation) or the inputs (covariate shift).
Labels arrive hours late and out of order, in a separate file sorted by label time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from stream_monitor.config import ProfileConfig
from stream_monitor.core.reference import ReferenceBuilder

REGIONS = ("eu", "us", "apac", "latam")
T0 = 1_790_000_000.0


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def draw(n: int, seed: int, *, change_at: int | None = None, concept: bool = False,
         base_rate: float | None = None, segment_flip: float = 0.0, shift_x: float = 0.0,
         a: float = -1.8, b: float = 2.0):
    """Arrays of one stream: features, scores, predictions, labels."""
    rng = np.random.default_rng(seed)
    after = np.zeros(n, bool) if change_at is None else np.arange(n) >= change_at
    x = rng.normal(0.0, 1.0, n) + np.where(after, shift_x, 0.0)
    p = _sigmoid(a + b * x)
    p_true = p.copy()
    if concept:
        p_true = np.where(after, _sigmoid(a + 0.3 * b * x + 0.6), p_true)
    if base_rate is not None:
        p_true = np.where(after, p * base_rate, p_true)
    y = rng.random(n) < p_true
    region = rng.choice(len(REGIONS), n, p=[0.4, 0.3, 0.15, 0.15])  # apac: 15% of traffic
    if segment_flip:
        flip = after & (region == 2) & (rng.random(n) < segment_flip)
        y = np.where(flip, ~y, y)
    return {"x": x, "p": p, "y": y, "region": region,
            "noise": rng.standard_cauchy(n), "sku": rng.integers(0, 300, n),
            "flag": rng.random(n) < 0.3, "sparse": rng.random(n) < 0.1,
            "lag": rng.uniform(60.0, 3 * 3600.0, n), "ts": T0 + np.arange(n) * 0.5}


def events(d, *, model: str = "churn", version: str = "v1", inline_every: int = 0,
           ids: bool = True, prefix: str = "e", probability: bool = False) -> list[bytes]:
    out = []
    for i in range(d["x"].size):
        feats = {"x": float(d["x"][i]), "noise": float(d["noise"][i]), "flag": bool(d["flag"][i])}
        feats["sku"] = None if d["sparse"][i] else f"sku{int(d['sku'][i])}"
        p = float(d["p"][i])
        ev = {"model": model, "model_version": version, "ts": float(d["ts"][i]),
              "features": feats,
              "prediction": p if probability else ("yes" if p >= 0.5 else "no"),
              "scores": {"yes": p, "no": 1.0 - p},
              "segment": {"region": REGIONS[int(d["region"][i])]}}
        if ids:
            ev["event_id"] = f"{prefix}{i}"
        if inline_every and i % inline_every == 0:
            ev["label"] = "yes" if d["y"][i] else "no"
        out.append(orjson.dumps(ev))
    return out


def labels(d, *, model: str = "churn", fraction: float = 1.0, seed: int = 0,
           skip_every: int = 0, prefix: str = "e") -> list[bytes]:
    """Label events sorted by label time (hours after the prediction, so out of order)."""
    rng = np.random.default_rng(seed + 7)
    n = d["x"].size
    keep = rng.random(n) < fraction
    if skip_every:
        keep &= np.arange(n) % skip_every != 0
    idx = np.flatnonzero(keep)
    lts = d["ts"][idx] + d["lag"][idx]
    order = idx[np.argsort(lts, kind="stable")]
    return [orjson.dumps({"model": model, "event_id": f"{prefix}{i}",
                          "label": "yes" if d["y"][i] else "no",
                          "ts": float(d["ts"][i] + d["lag"][i])}) for i in order]


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def reference(path: Path, n: int = 20_000, seed: int = 99, model: str = "churn") -> Path:
    """A reference built from stationary training data with predictions and labels."""
    d = draw(n, seed)
    builder = ReferenceBuilder(model, ProfileConfig())
    for raw in events(d, model=model, inline_every=1):
        ev = orjson.loads(raw)
        builder.add(ev["features"], ev["prediction"], ev["label"])
    builder.build().save(path)
    return path
