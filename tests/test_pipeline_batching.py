"""`Monitor.process` gives the same outputs whatever the batch cuts (issue 15).

The same events, cut into batches of 10,000, 3,333, 777 and 1, with the sequential
detectors on: window reports, alerts, detector alarms and rejects must be identical.
The data is unlike the repo's generator: three models interleaved at random (count
windows; event-time windows with disorder, allowed lateness, late events, missing and
far-future timestamps; event-time windows without lateness), sparse JSON (absent keys,
nulls), wrong types, booleans, integer ties, Cauchy tails, a 500-category feature, and
change points off the window and block grids so that detector blocks end on both sides
of window closes inside one batch.
"""

from __future__ import annotations

import copy

import numpy as np
import orjson
import pytest

from stream_monitor.config import ProfileConfig, parse_config
from stream_monitor.core.reference import ReferenceBuilder
from stream_monitor.io import replay as replay_module
from stream_monitor.pipeline import Monitor

T0 = 1_700_000_000.0        # historical: far behind the wall clock
MODELS = {
    # model: window, block, events per second
    "cnt": ({"events": 1_500}, 200, 40.0),
    "late": ({"seconds": 30, "allowed_lateness": 4, "max_future": 600}, 150, 25.0),
    "tight": ({"seconds": 20}, 120, 20.0),
}


def _features(rng: np.random.Generator, n: int, drift: np.ndarray) -> list[dict]:
    """Mixed-type sparse features; `drift` (bool per event) shifts location and shape."""
    x = rng.normal(0, 1, n) + 1.6 * drift
    tail = rng.standard_cauchy(n) * 2 + 5
    ties = rng.poisson(3, n) + 2 * drift
    cats = rng.zipf(1.3, n) % 500
    cats = np.where(drift & (rng.random(n) < 0.5), 7, cats)
    flag = rng.random(n) < np.where(drift, 0.7, 0.3)
    spread = rng.normal(0, np.where(drift, 3.0, 1.0), n)
    out = []
    for i in range(n):
        f = {"x": float(x[i]), "tail": float(tail[i]), "ties": int(ties[i]),
             "cat": f"c{cats[i]}", "flag": bool(flag[i]), "spread": float(spread[i])}
        u = rng.random()
        if u < 0.05:
            del f["x"]                  # absent key
        elif u < 0.1:
            f["tail"] = None            # null
        out.append(f)
    return out


def _reference(model: str, seed: int):
    rng = np.random.default_rng(seed)
    b = ReferenceBuilder(model, ProfileConfig())
    for f in _features(rng, 6_000, np.zeros(6_000, bool)):
        b.add(f)
    return b.build(source="test")


def _stream(seed: int, per_model: int = 4_000) -> list[bytes]:
    """Three models interleaved at random; each drifts at a point off every grid."""
    rng = np.random.default_rng(seed)
    streams = {}
    for k, (model, (window, _, rate)) in enumerate(MODELS.items()):
        n = per_model
        change = 1_337 + 411 * k                      # off the window and block grids
        back = 2_900 + 97 * k                         # and back to the reference
        idx = np.arange(n)
        drift = (idx >= change) & (idx < back)
        feats = _features(rng, n, drift)
        ts = T0 + idx / rate
        if "allowed_lateness" in window:
            ts = ts + rng.uniform(-3, 3, n)           # disorder within the lateness
            ts[rng.random(n) < 0.01] -= 60            # and beyond it: late events
        docs = []
        for i in range(n):
            doc = {"model": model, "ts": float(ts[i]), "features": feats[i]}
            if "seconds" in window and i % 997 == 500:
                del doc["ts"]                         # no timestamp: bad_timestamp
            if "seconds" in window and i % 1_201 == 700:
                doc["ts"] = float(ts[i]) + 86_400     # a day ahead: future_event
            if i % 89 == 13:                          # wrong types: a wrong_type reject,
                feats[i]["x"] = "n/a"                 # its violations counted in the
                feats[i]["ties"] = True               # window of the next kept event
            docs.append(orjson.dumps(doc))
        streams[model] = docs
    order = np.concatenate([np.full(len(v), k) for k, v in enumerate(streams.values())])
    rng.shuffle(order)
    its = [iter(v) for v in streams.values()]
    msgs = [next(its[k]) for k in order.tolist()]
    for i in range(5):
        msgs.insert(900 + 2_111 * i, b'{"model": "cnt", "features": [not json')
    return msgs


@pytest.fixture(scope="module")
def setup():
    refs = {m: _reference(m, 100 + k) for k, m in enumerate(MODELS)}
    cfg = parse_config({
        "defaults": {"alerting": {"group_min_features": 2}},
        "models": {m: {"baseline": {"events": 1}, "window": w, "block": b}
                   for m, (w, b, _) in MODELS.items()}})
    return cfg, refs, _stream(seed=7)


def _feed(cfg, refs, msgs: list[bytes], size: int) -> dict:
    mon = Monitor(cfg, copy.deepcopy(refs))
    out = {"reports": [], "alerts": [], "detections": [], "rejects": [], "events": 0}
    for start in range(0, len(msgs), size):
        batch = msgs[start:start + size]
        res = mon.process(batch, range(start, start + len(batch)))
        out["reports"] += res.reports
        out["alerts"] += res.alerts
        out["detections"] += res.detections
        out["rejects"] += [(r.position, r.reason, r.model) for r in res.rejects]
        out["events"] += sum(res.events.values())
    out["open"] = sum(p.windows.open_events for p in mon.models.values())
    return out


def _kinds(out: dict) -> list[tuple]:
    return [(a["labels"]["model"], a["labels"].get("feature"), a["kind"], a["method"],
             a["status"]) for a in out["alerts"]]


def test_outputs_do_not_depend_on_batch_cuts(setup):
    cfg, refs, msgs = setup
    whole = _feed(cfg, refs, msgs, 10_000)
    # the data exercises what the claim is about
    assert {r["model"] for r in whole["reports"]} == set(MODELS)
    assert {d.model for d in whole["detections"]} == set(MODELS), "every model alarms"
    assert any(a["method"].startswith("cusum_") for a in whole["alerts"])
    assert any(a["method"] not in ("", None) and not a["method"].startswith("cusum_")
               for a in whole["alerts"]), "window findings alert too"
    reasons = {r[1] for r in whole["rejects"]}
    assert {"late_event", "bad_timestamp", "future_event", "not_json",
            "wrong_type"} <= reasons, reasons
    assert all(r["features"]["x"]["data_quality"]["type_violations"]["value"] > 0
               for r in whole["reports"] if r["window"]["events"] > 300)
    for size in (3_333, 777, 1):
        cut = _feed(cfg, refs, msgs, size)
        assert _kinds(cut) == _kinds(whole), size
        assert cut["alerts"] == whole["alerts"], size
        assert cut["reports"] == whole["reports"], size
        assert cut["detections"] == whole["detections"], size
        assert cut["rejects"] == whole["rejects"], size
        assert cut["events"] == whole["events"], size


def test_replay_batch_size_does_not_change_its_files(setup, tmp_path, monkeypatch):
    cfg, refs, msgs = setup
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(msgs) + b"\n")
    files = {}
    for size in (10_000, 613):
        monkeypatch.setattr(replay_module, "BATCH_LINES", size)
        out = tmp_path / f"out{size}"
        replay_module.replay(cfg, tmp_path / "in.jsonl", out, progress=False,
                             monitor=Monitor(cfg, copy.deepcopy(refs)))
        files[size] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert files[613].keys() == files[10_000].keys()
    for name, data in files[10_000].items():
        assert files[613][name] == data, name
    assert files[10_000]["alerts.jsonl"].count(b"\n") > 5


def test_partition_interleaving_changes_no_event_time_window(setup):
    """Several input partitions are consumed in arrival order, which differs between runs
    and after a restart. What stays equal (README, "What the outputs equal"): event-time
    window reports when the lateness covers the skew between partitions, and their
    alerts with the detectors off; every event counted once either way."""
    _, refs, _ = setup
    rng = np.random.default_rng(5)
    n = 6_000
    drift = np.arange(n) >= 2_345
    feats = _features(rng, n, drift)
    ts = T0 + np.arange(n) / 25.0
    parts = rng.integers(0, 3, n)       # three partitions, each in time order
    msgs = [orjson.dumps({"model": "late", "ts": float(t), "features": f})
            for t, f in zip(ts.tolist(), feats, strict=True)]
    def interleave(seed: int) -> list[bytes]:
        """Partitions merged in arrival order: each lags by its own 0-20 s, fetched in
        blocks of about 4 s (each partition stays in its own order)."""
        r = np.random.default_rng(seed)
        lag = r.uniform(0, 20, 3)[parts] + r.uniform(0, 4, 3)[parts]
        arrival = np.floor((ts + lag) / 4.0) * 4.0 + parts * 0.1
        return [msgs[i] for i in np.argsort(arrival, kind="stable").tolist()]

    orders = [interleave(s) for s in (1, 2)]
    assert orders[0] != orders[1]
    for detector in ("none", None):
        model = {"baseline": {"events": 1}, "block": 150,
                 "window": {"seconds": 30, "allowed_lateness": 60}}
        if detector:
            model["detector"] = detector
        cfg = parse_config({"defaults": {"alerting": {"group_min_features": 2}},
                            "models": {"late": model}})
        runs = [_feed(cfg, {"late": refs["late"]}, order, 1_000) for order in orders]
        for run in runs:
            assert run["events"] == n and not run["rejects"]
            assert sum(r["window"]["events"] for r in run["reports"]) + run["open"] == n
        # positions (input lines or offsets) follow the interleaving; the rest must not
        reports, alerts = ([[_no_lines(d) for d in run[k]] for run in runs]
                           for k in ("reports", "alerts"))
        assert reports[0] == reports[1] and len(reports[0]) >= 6
        if detector == "none":
            assert alerts[0] and alerts[0] == alerts[1]


def _no_lines(doc: dict) -> dict:
    return {**doc, "window": {k: v for k, v in doc["window"].items()
                              if k not in ("first_line", "last_line")}}


def test_restoring_a_snapshot_at_every_cut_changes_nothing(setup):
    """The in-memory analogue of a restart: after every batch the monitor is replaced by
    a new one restored from its snapshots (windows, detectors, alert policy, the event
    times the future check needs); the outputs equal an uninterrupted run's."""
    cfg, refs, msgs = setup
    whole = _feed(cfg, refs, msgs, 10_000)
    mon = Monitor(cfg, copy.deepcopy(refs))
    got = {"reports": [], "alerts": [], "detections": [], "rejects": []}
    # cut every 1,234 messages and right before each far-future event: its verdict
    # needs the event times before the cut (a fresh monitor would believe it)
    ahead = [i for i, m in enumerate(msgs)
             if not m.endswith(b"[not json") and orjson.loads(m).get("ts", 0) > T0 + 80_000]
    assert len(ahead) >= 4
    cuts = sorted({*range(0, len(msgs), 1_234), *ahead, len(msgs)})
    restores = 0
    for start, stop in zip(cuts, cuts[1:], strict=False):
        batch = msgs[start:stop]
        res = mon.process(batch, range(start, start + len(batch)))
        for k in ("reports", "alerts", "detections"):
            got[k] += getattr(res, k)
        got["rejects"] += [(r.position, r.reason, r.model) for r in res.rejects]
        snaps = {m: mon.snapshot(m) for m in MODELS}
        mon = Monitor(cfg, copy.deepcopy(refs))
        for m, data in snaps.items():
            mon.restore(m, data)
        restores += 1
    assert restores > 10
    for k in got:
        assert got[k] == whole[k], k
