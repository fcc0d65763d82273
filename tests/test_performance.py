"""Performance monitoring through `replay --labels`: join, windows, alerts, retraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import perfstream as ps
import pytest
import yaml

from stream_monitor.cli import main
from stream_monitor.config import load_config
from stream_monitor.pipeline import Monitor


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


@pytest.fixture(scope="module")
def ref_path(tmp_path_factory) -> Path:
    return ps.reference(tmp_path_factory.mktemp("ref") / "churn.json")


def _config(tmp_path: Path, ref: Path, **performance) -> Path:
    cfg = {"topics": {"labels": "labels"},
           "defaults": {"window": {"events": 10_000},
                        "performance": {"window": 2000, **performance}},
           "models": {"churn": {"reference": str(ref)}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _replay(tmp_path: Path, config: Path, d, **kw) -> tuple[Path, dict]:
    ev = ps.write(tmp_path / "events.jsonl", ps.events(d, **kw.get("events", {})))
    lab = ps.write(tmp_path / "labels.jsonl", ps.labels(d, **kw.get("labels", {})))
    out = tmp_path / "out"
    assert main(["replay", "--config", str(config), "--input", str(ev), "--labels", str(lab),
                 "--out", str(out), "--quiet"]) == 0
    return out, {"perf": _read(out / "performance.jsonl"), "alerts": _read(out / "alerts.jsonl"),
                 "retrain": _read(out / "retrain.jsonl"),
                 "rejects": _read(out / "rejects.jsonl")}


def _firing(alerts, kind):
    return [a for a in alerts if a["kind"] == kind and a["status"] == "firing"]


def test_late_out_of_order_labels_join_and_windows_hold_every_metric(tmp_path, ref_path):
    d = ps.draw(30_000, seed=1)
    out, r = _replay(tmp_path, _config(tmp_path, ref_path), d)
    perf = r["perf"]
    assert len(perf) == 15 and all(p["window"]["labels"] == 2000 for p in perf)
    last = perf[-1]
    assert last["join"]["joined"] == 30_000 and last["join"]["unjoined"] == {}
    for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "ece"):
        assert last["metrics"][k] is not None, k
    # the reference file was built from training data with labels and predictions: its
    # realized accuracy is the reference from the first window on
    train = ps.draw(20_000, seed=99)
    train_acc = float(((train["p"] >= 0.5) == train["y"]).mean())
    assert all(p["reference_source"] == "reference_file" for p in perf)
    assert perf[0]["reference"]["accuracy"] == pytest.approx(train_acc, abs=1e-12)
    assert last["label_lag"]["max"] <= 3 * 3600.0 and last["label_lag"]["p50"] > 600
    base = ps.draw(20_000, seed=99)["y"].mean()  # the reference's training labels
    assert last["label_shift"]["reference_label_rate"] == pytest.approx(base, abs=1e-9)
    # stationary: nothing fires
    assert not [a for a in r["alerts"] if a["kind"] in (
        "performance", "concept_drift", "label_shift")]
    assert r["retrain"] == [] and r["rejects"] == []


def test_concept_drift_raises_concept_drift_and_no_feature_drift(tmp_path, ref_path):
    d = ps.draw(60_000, seed=2, change_at=23_457, concept=True)
    out, r = _replay(tmp_path, _config(tmp_path, ref_path), d)
    alerts = r["alerts"]
    cd = _firing(alerts, "concept_drift")
    perf = _firing(alerts, "performance")
    assert cd and perf
    assert perf[0]["diagnosis"]["root_cause"] == "concept_drift"
    assert not _firing(alerts, "feature_drift") and not _firing(alerts, "dataset_drift")
    # first concept-drift alert comes after the change (window by label position)
    assert cd[0]["window"]["last_line"] > 23_457
    # the performance alert lasted 3 windows: a retraining request with evidence
    req = [x for x in r["retrain"] if x["trigger"] == "performance_alert"]
    assert req and req[0]["decision"] == "requested"
    assert req[0]["evidence"]["kind"] == "concept_drift"
    assert req[0]["evidence"]["performance"]["accuracy"] < req[0]["evidence"]["reference"][
        "accuracy"]


def test_halved_base_rate_raises_label_shift_with_both_rates(tmp_path, ref_path):
    d = ps.draw(40_000, seed=3, change_at=15_111, base_rate=0.5)
    out, r = _replay(tmp_path, _config(tmp_path, ref_path), d)
    ls = [a for a in _firing(r["alerts"], "label_shift") if "label_rate" in a]
    assert ls
    a = ls[0]
    base = ps.draw(20_000, seed=99)["y"].mean()
    assert a["reference_label_rate"] == pytest.approx(base, abs=1e-9)
    assert a["label_rate"] <= base - 0.05
    assert a["window"]["last_line"] > 15_111  # not before the change
    assert r["perf"][-1]["label_shift"]["label_rate"] == pytest.approx(base / 2, abs=0.03)
    assert a["predicted_positive_rate"] is not None
    assert a["reference_predicted_positive_rate"] is not None
    assert f"{base:.1%}" in a["annotations"]["summary"]


def test_one_segment_degrading_alerts_while_total_stays_under_threshold(tmp_path, ref_path):
    d = ps.draw(60_000, seed=4, change_at=21_003, segment_flip=0.22)
    cfg = _config(tmp_path, ref_path, segments={"fields": ["region"]})
    out, r = _replay(tmp_path, cfg, d)
    seg = [a for a in _firing(r["alerts"], "performance") if "segment" in a["labels"]]
    assert seg and {a["labels"]["segment"] for a in seg} == {"region=apac"}
    assert not [a for a in _firing(r["alerts"], "performance") if "segment" not in a["labels"]]
    late = [p for p in r["perf"] if p["window"]["first_line"] > 30_000]
    assert late and all(p["severity"] == "ok" for p in late)
    gaps = [p["segments"]["gaps"]["region"]["accuracy"] for p in late]
    assert min(gaps) > 0.08
    assert set(late[-1]["segments"]["fields"]["region"]) == set(ps.REGIONS)


@pytest.mark.parametrize("seed", [5, 6])
def test_cbpe_tracks_realized_accuracy_under_covariate_shift(tmp_path, ref_path, seed):
    d = ps.draw(60_000, seed=seed, change_at=20_000, shift_x=0.8)
    out, r = _replay(tmp_path, _config(tmp_path, ref_path, window=5000), d)
    perf = r["perf"]
    assert len(perf) == 12
    for p in perf:
        assert abs(p["estimated"]["accuracy"] - p["metrics"]["accuracy"]) <= 0.02
        assert abs(p["estimation_gap"]["accuracy"]) <= 0.02
        assert abs(p["estimation_gap"]["roc_auc"]) <= 0.02
    # the shift did move accuracy, and no concept drift is claimed
    assert abs(perf[-1]["metrics"]["accuracy"] - perf[0]["metrics"]["accuracy"]) > 0.03
    assert not _firing(r["alerts"], "concept_drift")


def test_new_labels_trigger_requests_and_pipeline_faults_are_refused(tmp_path, ref_path):
    d = ps.draw(30_000, seed=8)
    cfg = _config(tmp_path, ref_path, retrain={"every_labels": 10_000})
    out, r = _replay(tmp_path, cfg, d)
    req = [x for x in r["retrain"] if x["trigger"] == "new_labels"]
    assert [x["decision"] for x in req] == ["requested"] * 3
    assert len({x["id"] for x in req}) == 3
    # the same replay again gives the same ids (stable)
    out2, r2 = _replay(tmp_path / "again" if (tmp_path / "again").mkdir() is None else None,
                       cfg, d)
    assert [x["id"] for x in r2["retrain"]] == [x["id"] for x in r["retrain"]]


def test_schema_change_and_missing_feature_publish_the_fix(tmp_path, ref_path):
    d = ps.draw(50_000, seed=9)
    lines = ps.events(d)
    # from line 30,001 on the producer renames feature x and stops sending sku
    broken = []
    for i, raw in enumerate(lines):
        if i >= 30_000:
            ev = orjson.loads(raw)
            ev["features"]["x_renamed"] = ev["features"].pop("x")
            ev["features"].pop("sku", None)
            raw = orjson.dumps(ev)
        broken.append(raw)
    ev_path = ps.write(tmp_path / "events.jsonl", broken)
    lab = ps.write(tmp_path / "labels.jsonl", ps.labels(d))
    cfg = _config(tmp_path, ref_path, retrain={"every_labels": 10_000})
    out = tmp_path / "out"
    assert main(["replay", "--config", str(cfg), "--input", str(ev_path), "--labels", str(lab),
                 "--out", str(out), "--quiet"]) == 0
    records = _read(out / "retrain.jsonl")
    schema = [x for x in records if x["trigger"] == "schema_change"]
    assert schema and all(x["decision"] == "refused" for x in schema)
    assert schema[0]["fix"]["cause"] == "schema_change" and schema[0]["fix"]["action"]
    # the label trigger fires every 10,000 labels: requested before the fault, refused
    # (with the fix) while the missing feature and the schema change are firing
    labelled = [x for x in records if x["trigger"] == "new_labels"]
    assert len(labelled) == 5
    assert labelled[0]["decision"] == "requested"
    assert labelled[-1]["decision"] == "refused"
    assert labelled[-1]["fix"]["cause"] == "feature_unavailable"
    assert {f["cause"] for f in labelled[-1]["fix"]["all"]} == {"feature_unavailable",
                                                                "schema_change"}
    assert set(labelled[-1]["fix"]["features"]) == {"x", "sku"}


def test_label_lines_interleaved_in_the_input_and_malformed_labels(tmp_path, ref_path):
    d = ps.draw(8000, seed=10)
    evs = ps.events(d)
    labs = ps.labels(d)
    mixed = evs[:4000] + labs[:3000] + evs[4000:] + labs[3000:] + [
        b'{"model": "churn", "event_id": "zz", "label": [1], "ts": 1}',
        b'{"model": "ghost", "event_id": "e1", "label": "yes", "ts": 1790000000}',
        b'{"model": "churn", "event_id": "e5", "label": "no", "ts": 1790009999}']
    path = ps.write(tmp_path / "mixed.jsonl", mixed)
    cfg = load_config(_config(tmp_path, ref_path))
    from stream_monitor.io.replay import replay
    summary = replay(cfg, path, tmp_path / "out")
    assert summary.label_lines == 8003 and summary.lines == 8000
    assert summary.rejects == {"label_malformed": 1}
    assert summary.unjoined == {"label_unknown_model": 1}
    perf = _read(tmp_path / "out" / "performance.jsonl")
    assert perf[-1]["join"]["unjoined"] == {"label_duplicate": 1}
    assert perf[-1]["join"]["joined"] == 8000
    rej = _read(tmp_path / "out" / "rejects.jsonl")
    assert rej[0]["reason"] == "label_malformed" and rej[0]["line"] == 16001


def test_monitor_accounts_every_label(tmp_path, ref_path):
    """labels consumed = counted (joined, waiting, unjoined) + rejected."""
    cfg = load_config(_config(tmp_path, ref_path))
    mon = Monitor(cfg)
    d = ps.draw(3000, seed=11)
    mon.process(ps.events(d), list(range(3000)))
    labs = ps.labels(d, fraction=0.5) + [b"{oops", b'{"model": "nope", "event_id": "1", '
                                                   b'"label": 1, "ts": 1}']
    res = mon.process_labels(labs, list(range(len(labs))))
    buf = mon.performance.models["churn"].buffer
    counted = sum(res.labels.values()) + sum(res.unjoined.values())
    assert counted + len(res.rejects) == len(labs)
    assert buf.joined + len(buf.labels) + buf.unjoined["label_duplicate"] == sum(
        res.labels.values())


def _regression_config(tmp_path: Path) -> Path:
    cfg = {"topics": {"labels": "labels"},
           "defaults": {"performance": {"window": 1000, "task": "regression"}},
           "models": {"price": {"baseline": {"events": 2000}}}}
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _regression_events(n: int, seed: int, change_at: int | None = None) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 2.0, n)
    noise = rng.standard_t(3, n)  # heavy-tailed errors
    y = 3.0 * x + 5.0 + noise
    if change_at is not None:
        y[change_at:] = 4.0 * x[change_at:] + 5.0 + noise[change_at:]   # the relation moved
    pred = 3.0 * x + 5.0
    evs = [orjson.dumps({"model": "price", "event_id": i, "ts": 1e9 + i,
                         "features": {"x": float(x[i]), "k": int(i % 7)},
                         "prediction": float(pred[i])}) for i in range(n)]
    labs = [orjson.dumps({"model": "price", "event_id": i, "label": float(y[i]),
                          "ts": 1e9 + i + 30}) for i in range(n)]
    return evs, labs


def _run(mon: Monitor, evs: list, labs: list, chunk: int = 5000) -> dict[str, list]:
    out: dict[str, list] = {"perf": [], "alerts": [], "retrain": []}
    for s in range(0, len(evs), chunk):
        for res in (mon.process(evs[s:s + chunk], list(range(s, s + chunk))),
                    mon.process_labels(labs[s:s + chunk], list(range(s, s + chunk)))):
            out["perf"] += res.performance
            out["alerts"] += res.alerts
            out["retrain"] += res.retrain
    res = mon.flush()
    out["perf"] += res.performance
    out["alerts"] += res.alerts
    return out


def test_regression_metrics_alert_and_concept_drift(tmp_path):
    cfg = load_config(_regression_config(tmp_path))
    evs, labs = _regression_events(40_000, seed=12, change_at=20_500)
    out = _run(Monitor(cfg), evs, labs)
    perf = out["perf"]
    assert perf[0]["task"] == "regression" and perf[0]["alert_metric"] == "mae"
    # a baseline without labels has no performance: the first windows are the reference
    assert perf[0]["reference_source"] == "pending"
    assert perf[-1]["reference_source"] == "first_windows"
    assert {"mae", "rmse", "mape"} <= set(perf[0]["metrics"])
    before = [p for p in perf if p["window"]["last_line"] < 20_500 and p["reference"]]
    assert before and all(p["severity"] == "ok" for p in before)
    fired = {a["kind"] for a in out["alerts"] if a["status"] == "firing"}
    assert {"performance", "concept_drift"} <= fired
    assert perf[-1]["label_shift"]["label_mean"] > perf[0]["label_shift"]["label_mean"]


@pytest.mark.slow
def test_stationary_million_labelled_events_raise_nothing(tmp_path, ref_path):
    """1,000,000 labelled events (half inline, half hours late on the label stream)."""
    cfg = load_config(_config(tmp_path, ref_path, segments={"fields": ["region"]}))
    mon = Monitor(cfg)
    kinds = ("performance", "concept_drift", "label_shift")
    fired, windows = [], 0
    pending: list[bytes] = []
    for chunk in range(50):
        d = ps.draw(20_000, seed=1000 + chunk)
        d["ts"] = d["ts"] + chunk * 10_000.0
        prefix = f"c{chunk}-"
        evs = ps.events(d, inline_every=2, prefix=prefix)
        res = mon.process(evs, list(range(chunk * 20_000, (chunk + 1) * 20_000)))
        labs = ps.labels(d, skip_every=2, prefix=prefix)
        res2 = mon.process_labels(pending, list(range(len(pending))))  # the previous chunk's
        pending = labs
        for r in (res, res2):
            windows += len(r.performance)
            fired += [a for a in r.alerts if a["kind"] in kinds]
    res = mon.process_labels(pending, list(range(len(pending))))
    fired += [a for a in res.alerts if a["kind"] in kinds]
    windows += len(res.performance)
    assert windows == 500
    assert fired == []
    buf = mon.performance.models["churn"].buffer
    assert buf.joined == 1_000_000 and not buf.predictions and not buf.labels


def _pairs(preds, labels, scores=None):
    scores = scores or [None] * len(preds)
    return [(i, 1e9 + i, 1e9 + i + 5, "v", p, s, None, lab)
            for i, (p, lab, s) in enumerate(zip(preds, labels, scores, strict=True))]


def test_value_forms_of_classification_predictions():
    from stream_monitor.config import PerformanceConfig
    from stream_monitor.core.performance import ModelPerformance
    # probability predictions with 0/1 labels and scores keyed otherwise (ignored)
    mp = ModelPerformance("m", PerformanceConfig(window=10, task="classification"), None)
    pairs = _pairs([0.9, 0.2, 0.7, 0.4], [1, 0, 0, 1.0], [{"churn": 0.9}] * 4)
    report, _ = mp.evaluate("v", pairs, 0)
    assert mp.classes == {"0": 0, "1": 1} and mp.positive == 1
    assert report["metrics"]["accuracy"] == 0.5
    assert report["metrics"]["log_loss"] == pytest.approx(-np.mean(np.log([.9, .8, .3, .4])))
    # multiclass (3 label classes): macro metrics, no ROC AUC; a missing prediction takes
    # the highest score
    mp = ModelPerformance("m", PerformanceConfig(window=10, task="classification"), None)
    preds = ["a", "b", None, "c", "a", None]
    labels = ["a", "b", "c", "c", "b", "a"]
    scores = [{"a": 0.6, "b": 0.3, "c": 0.1}, None, {"a": 0.1, "b": 0.2, "c": 0.7},
              {"c": 1.0}, {"a": 0.5, "b": 0.5}, {"a": 0.8, "b": 0.1, "c": 0.1}]
    report, _ = mp.evaluate("v", _pairs(preds, labels, scores), 0)
    m = report["metrics"]
    assert mp.positive is None and "roc_auc" not in m
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["scored"] == 5
    expected_ll = -np.mean(np.log([0.6, 0.7, 1.0, 0.5, 0.8]))
    assert m["log_loss"] == pytest.approx(expected_ll)
    # binary with string classes and scores for the positive class only
    mp = ModelPerformance("m", PerformanceConfig(window=10, task="classification"), None)
    report, _ = mp.evaluate("v", _pairs(["yes", "no", "yes", "no"], ["yes", "no", "no", "no"],
                                        [{"yes": 0.8}, {"yes": 0.3}, {"yes": 0.6},
                                         {"yes": 0.1}]), 0)
    m = report["metrics"]
    assert m["accuracy"] == 0.75 and m["precision"] == 0.5 and m["recall"] == 1.0
    assert m["roc_auc"] == 1.0
    assert report["estimated"]["accuracy"] == pytest.approx((0.8 + 0.7 + 0.6 + 0.9) / 4)


def test_certain_probability_is_a_score_not_a_class():
    from stream_monitor.config import PerformanceConfig
    from stream_monitor.core.performance import ModelPerformance
    mp = ModelPerformance("m", PerformanceConfig(window=10, task="classification"), None)
    report, _ = mp.evaluate("v", _pairs([1.0, 0.0, 0.8, 0.1], ["yes", "no", "yes", "yes"]), 0)
    assert set(mp.classes) == {"yes", "no"}
    assert report["metrics"]["accuracy"] == 0.75


@pytest.mark.parametrize("seed", [13, 14])
def test_cbpe_estimates_before_any_label(tmp_path, ref_path, seed):
    """Probability predictions, no labels at all: estimate windows still track accuracy."""
    cfg = load_config(_config(tmp_path, ref_path, estimate_window=5000))
    mon = Monitor(cfg)
    d = ps.draw(40_000, seed=seed, change_at=17_000, shift_x=0.8)
    evs = ps.events(d, probability=True)
    est = []
    for s in range(0, len(evs), 10_000):
        est += mon.process(evs[s:s + 10_000], list(range(s, s + 10_000))).performance
    assert [e["type"] for e in est] == ["estimate"] * 8
    realized = [float(((d["p"][k:k + 5000] >= 0.5) == d["y"][k:k + 5000]).mean())
                for k in range(0, 40_000, 5000)]
    for e, real in zip(est, realized, strict=True):
        assert e["window"]["predictions"] == 5000
        assert abs(e["estimated"]["accuracy"] - real) <= 0.02
    assert abs(realized[-1] - realized[0]) > 0.03  # the shift moved accuracy
    assert mon.performance.models["churn"].buffer.joined == 0


def test_monitor_rollback_restores_the_join_exactly_without_copying_it(tmp_path, ref_path):
    """`checkpoint` shares the join buffer (its undo journal, not a copy of up to
    max_predictions entries); `rollback` after a batch of predictions and one of labels
    restores the join state exactly, and the batches re-applied give the same outputs."""
    cfg = load_config(_config(tmp_path, ref_path))
    d = ps.draw(12_000, seed=21)
    evs, labs = ps.events(d), ps.labels(d, fraction=0.5)
    mon, twin = Monitor(cfg), Monitor(cfg)
    for m in (mon, twin):
        m.process(evs[:8000], list(range(8000)))
        m.process_labels(labs[:2000], list(range(2000)))
    buf = mon.performance.models["churn"].buffer
    before = buf.state()
    cp = mon.checkpoint()
    assert cp[0][3].models["churn"].buffer is buf  # shared, not deep-copied
    mon.process(evs[8000:], list(range(8000, 12_000)))
    mon.process_labels(labs[2000:], list(range(2000, len(labs))))
    assert buf.state() != before
    mon.rollback(cp)
    assert mon.performance.models["churn"].buffer.state() == before
    a = [mon.process(evs[8000:], list(range(8000, 12_000))),
         mon.process_labels(labs[2000:], list(range(2000, len(labs))))]
    b = [twin.process(evs[8000:], list(range(8000, 12_000))),
         twin.process_labels(labs[2000:], list(range(2000, len(labs))))]
    for x, y in zip(a, b, strict=True):
        assert orjson.dumps(x.performance) == orjson.dumps(y.performance)
        assert x.alerts == y.alerts
    assert buf.state() == twin.performance.models["churn"].buffer.state()


def test_checkpoint_copies_the_open_window_list_not_its_pairs(tmp_path, ref_path):
    """The checkpoint copies an open performance window's list of pairs (shared, never
    changed tuples) and its label lags as arrays; a batch of labels that closes the
    window, rolled back, leaves the window as it was, and re-applied gives the report a
    monitor that never rolled back gives."""
    cfg = load_config(_config(tmp_path, ref_path))
    d = ps.draw(12_000, seed=4)
    evs, labs = ps.events(d), ps.labels(d, fraction=0.5)
    mon, twin = Monitor(cfg), Monitor(cfg)
    for m in (mon, twin):
        m.process(evs, list(range(12_000)))
        m.process_labels(labs[:2500], list(range(2500)))
        m.process_labels(labs[2500:3000], list(range(2500, 3000)))  # closes no window
    mp = mon.performance.models["churn"]
    (window,) = mp.windows.values()
    pairs, lags = list(window.pairs), np.hstack(mp.lags)
    assert 0 < len(pairs) < 2000 and lags.size
    cp = mon.checkpoint()
    kept = cp[0][3].models["churn"]
    (copied,) = kept.windows.values()
    assert copied.pairs == pairs and copied.pairs is not window.pairs
    # the window keeps its pairs as blocks of columns: the list of blocks is copied, the
    # blocks (never changed once made) are shared
    assert copied.blocks is not window.blocks
    assert all(a is b for a, b in zip(copied.blocks, window.blocks, strict=True))
    assert all(type(x) is np.ndarray for x in kept.lags)
    closed = mon.process_labels(labs[3000:], list(range(3000, len(labs))))
    assert closed.performance and len(window.pairs) != len(pairs)
    mon.rollback(cp)
    mp = mon.performance.models["churn"]
    (window,) = mp.windows.values()
    assert window.pairs == pairs and np.array_equal(np.hstack(mp.lags), lags)
    a = mon.process_labels(labs[3000:], list(range(3000, len(labs))))
    b = twin.process_labels(labs[3000:], list(range(3000, len(labs))))
    assert orjson.dumps(a.performance) == orjson.dumps(b.performance)
    assert a.alerts == b.alerts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_adwin_feed_is_the_per_value_update(seed):
    """`feed_detector` drives river's ADWIN through its Rust window; detections, widths and
    estimates after every window equal those of `update` called per value (0/1 errors
    with change points, bounded regression errors, a stream that ends on a detection)."""
    from river import drift

    from stream_monitor.core.performance import feed_detector

    rng = np.random.default_rng(seed)
    rates = rng.choice([0.05, 0.1, 0.4, 0.8], 12)
    streams = [(rng.random(int(n)) < r).astype(float).tolist()
               for r, n in zip(rates, rng.integers(1, 3000, 12), strict=True)]
    streams += [np.minimum(rng.exponential(0.1 + i % 3, 700), 1.0).tolist() for i in range(4)]
    for delta in (0.002, 1e-5):
        fast, slow = drift.ADWIN(delta=delta), drift.ADWIN(delta=delta)
        seen = 0
        for values in streams + [[0.0] * 500 + [1.0] * 400]:
            expect = False
            for v in values:
                slow.update(v)
                expect = expect or slow.drift_detected
            seen += expect
            assert feed_detector(fast, values) == expect
            assert (fast.drift_detected, fast.width, fast.n_detections, fast.estimation,
                    fast.variance) == (slow.drift_detected, slow.width, slow.n_detections,
                                       slow.estimation, slow.variance)
        assert seen  # the streams do drift
    other = drift.PageHinkley()
    assert feed_detector(other, [0.0] * 100 + [5.0] * 100) in (True, False)


@pytest.mark.parametrize("labels", [
    [0, 1, 1, 0], [True, False, 1, 0, 1.0, "1"], ["no", "yes", "yes"], ["b", "a", "c", "a"],
    [1.0, 0.0, float("nan"), 2], [[1], 0, 1], ["pos", "neg", {"x": 1}]])
def test_first_window_classes_from_float_predictions_match_the_per_pair_loop(labels):
    """The class space settled from the columns (float predictions: the distinct labels)
    is the one the per-pair loop settles: the same classes, order and positive class;
    unhashable labels fall back to the loop."""
    from stream_monitor.config import PerformanceConfig
    from stream_monitor.core.performance import ModelPerformance, _columns

    rng = np.random.default_rng(len(labels))
    pairs = [(i, 0.0, 1.0, "v1", float(rng.random()), None, None, labels[i % len(labels)])
             for i in range(60)]
    fast = ModelPerformance("m", PerformanceConfig(), None)
    loop = ModelPerformance("m", PerformanceConfig(), None)
    fast._settle_classes(pairs, _columns(pairs))
    loop._settle_classes(pairs)
    assert list(fast.classes.items()) == list(loop.classes.items())
    assert fast.positive == loop.positive


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("whole", [False, True])
def test_window_of_float_predictions_against_an_independent_computation(seed, whole):
    """A window of float predictions: every one a score (the column path), or some of
    them 0.0 / 1.0 that name a class (the per-row path); tied scores, NaN times. The
    window's times and lines, and accuracy, precision, recall, log loss and ROC AUC,
    against plain numpy and scipy (1e-12)."""
    import math

    from scipy.stats import mannwhitneyu

    from stream_monitor.config import PerformanceConfig
    from stream_monitor.core.evaluate import _iso
    from stream_monitor.core.performance import ModelPerformance

    rng = np.random.default_rng(seed)
    n = 2000
    p = np.round(rng.beta(2, 3, n), 2)                      # ties
    p = np.where((p == 0.0) | (p == 1.0), 0.5, p)           # scores strictly inside
    if whole:                                               # some predictions name a class
        named = rng.random(n) < 0.05
        p[named] = rng.integers(0, 2, int(named.sum())).astype(float)
    y = (rng.random(n) < p).astype(int)
    pts = 1.79e9 + rng.random(n) * 1e5
    pts[rng.random(n) < 0.01] = np.nan
    lts = pts + 3600.0
    lines = rng.permutation(10 * n)[:n]
    pairs = [(int(lines[i]), float(pts[i]), float(lts[i]), "v", float(p[i]), None, None,
              int(y[i])) for i in range(n)]
    mp = ModelPerformance("m", PerformanceConfig(window=n, task="classification"), None)
    report, _ = mp.evaluate("v", pairs, 0)
    assert mp.classes == {"0": 0, "1": 1} and mp.positive == 1
    win = report["window"]
    assert win["start"] == _iso(float(np.nanmin(pts))) and win["end"] == _iso(
        float(np.nanmax(pts)))
    assert win["label_start"] == _iso(float(np.nanmin(lts)))
    assert win["label_end"] == _iso(float(np.nanmax(lts)))
    assert (win["first_line"], win["last_line"]) == (int(lines.min()), int(lines.max()))
    named = np.array([v.is_integer() for v in p.tolist()])   # 0.0 / 1.0: the class itself
    assert named.any() == whole
    yhat = np.where(named, p.astype(int), (p >= 0.5).astype(int))
    m = report["metrics"]
    tp = int(((yhat == 1) & (y == 1)).sum())
    assert m["accuracy"] == pytest.approx(float((yhat == y).mean()), abs=1e-12)
    assert m["precision"] == pytest.approx(tp / int((yhat == 1).sum()), abs=1e-12)
    assert m["recall"] == pytest.approx(tp / int((y == 1).sum()), abs=1e-12)
    s, ys = p[~named], y[~named]
    assert m["scored"] == int((~named).sum())
    want_ll = -np.mean(np.log(np.clip(np.where(ys == 1, s, 1 - s), 1e-15, 1.0)))
    assert m["log_loss"] == pytest.approx(want_ll, abs=1e-12)
    u = mannwhitneyu(s[ys == 1], s[ys == 0]).statistic
    assert m["roc_auc"] == pytest.approx(u / ((ys == 1).sum() * (ys == 0).sum()), abs=1e-12)
    assert not math.isnan(report["estimated"]["accuracy"])
