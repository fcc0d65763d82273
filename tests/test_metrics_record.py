"""Per-window metrics: `MonitorMetrics` keeps each series' child once looked up (`_kid`);
what it exports is the same as looking every series up on each update."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import generate_latest

from stream_monitor.config import parse_config
from stream_monitor.core.reference import Reference
from stream_monitor.io import synthetic
from stream_monitor.io.metrics import MonitorMetrics
from stream_monitor.pipeline import Monitor

# series that depend on the windows and blocks, not on the wall clock
_PREFIXES = ("stream_monitor_feature_drift", "stream_monitor_data_quality",
             "stream_monitor_prediction_drift", "stream_monitor_dataset_drift",
             "stream_monitor_drifted_features", "stream_monitor_windows_closed",
             "stream_monitor_detector_block", "stream_monitor_events_total",
             "stream_monitor_rejects_total", "stream_monitor_label_values_dropped")


def _series(metrics: MonitorMetrics) -> dict[str, str]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(_PREFIXES) and "_created{" not in line:  # creation times
            name, value = line.rsplit(" ", 1)
            out[name] = value
    return out


def _events(seed: int) -> list[bytes]:
    """Two models interleaved (the second one not configured with a reserved name when
    `reserve` is off), drift in the second half, a few malformed lines and nulls."""
    out = []
    a = [m for c in synthetic.generate(8_000, seed=seed, drift=synthetic.default_drift(4_000))
         for m in c]
    b = [m for c in synthetic.generate(8_000, seed=seed + 1, model="other") for m in c]
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if i % 97 == 0:
            ev = orjson.loads(y)
            ev["features"][next(iter(ev["features"]))] = None
            y = orjson.dumps(ev)
        out += [x, y] if i % 3 else [y, x]
        if i % 501 == 0:
            out.append(b"{not json")
    return out


@pytest.mark.parametrize(("seed", "reserve", "max_features"), [(1, True, 100), (2, False, 7)])
def test_remembered_children_export_what_labels_gives(churn_reference_file, monkeypatch,
                                                      tmp_path, seed, reserve, max_features):
    other = Reference.load(churn_reference_file)
    other.model = "other"
    other.save(tmp_path / "other.json")
    cfg = parse_config({"defaults": {"window": {"events": 1_500}},
                        "models": {"churn": {"reference": str(churn_reference_file)},
                                   "other": {"reference": str(tmp_path / "other.json")}},
                        "metrics": {"max_features_per_model": max_features}})
    mon = Monitor(cfg)
    cached, plain = MonitorMetrics(cfg.metrics), MonitorMetrics(cfg.metrics)
    if reserve:
        cached.reserve_models(["churn", "other"])
        plain.reserve_models(["churn", "other"])
    monkeypatch.setattr(plain, "_kid", lambda metric, *values: metric.labels(*values))
    msgs = _events(seed)
    windows = 0
    for lo in range(0, len(msgs), 1_000):   # windows close inside and across batches
        batch = msgs[lo:lo + 1_000]
        result = mon.process(batch, range(lo, lo + len(batch)))
        windows += len(result.reports)
        for metrics in (cached, plain):
            metrics.record_batch(result, {"events": 1_000}, 0.01, mon.policy, {}, {})
        assert _series(cached) == _series(plain)
    got = _series(cached)
    assert windows >= 10 and len(cached._kids) > 100
    # the drifting model's scores moved between windows: the children are updated
    assert len({v for k, v in got.items() if k.startswith("stream_monitor_feature_drift_score")
                and 'model="churn"' in k}) > 20
    if not reserve:     # features past the cap are neither exported nor remembered
        assert any(k.startswith("stream_monitor_label_values_dropped") for k in got)
