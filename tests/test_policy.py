"""Alert policy: hysteresis, escalation, grouping, distinct data-quality kinds, diagnosis."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from stream_monitor.alerting.policy import AlertPolicy, diagnose, fingerprint
from stream_monitor.config import AlertingConfig, load_config
from stream_monitor.io import synthetic
from stream_monitor.io.replay import replay

SEV = ("ok", "warning", "critical")
DQ_CHECKS = ("missing", "out_of_range", "stuck", "type_violations", "schema")


def report(index: int, drift: dict[str, int], n_features: int = 25,
           dq: dict[tuple[str, str], int] | None = None) -> dict:
    """A window report as `WindowEvaluator.evaluate` writes it."""
    feats = {}
    for i in range(n_features):
        name = f"f{i:02d}"
        sev = drift.get(name, 0)
        feats[name] = {
            "kind": "numeric", "severity": SEV[sev], "method": "psi",
            "value": [0.01, 0.15, 0.4][sev] + i * 1e-4, "threshold": 0.1,
            "scores": {"variance_ratio": 1.0},
            "data_quality": {c: {"value": 0.0, "severity": SEV[(dq or {}).get((name, c), 0)]}
                             for c in DQ_CHECKS},
        }
    drifted = [n for n, f in feats.items() if f["severity"] != "ok"]
    return {"model": "churn", "features": feats,
            "window": {"index": index, "start": f"2026-11-22T10:{index:02d}:00Z",
                       "end": f"2026-11-22T10:{index:02d}:59Z", "events": 10_000},
            "dataset": {"drifted_features": drifted, "drifted_share": len(drifted) / n_features,
                        "severity": "ok"},
            "schema": {"unexpected_events": 0, "unexpected_fields": {}}}


def run(policy: AlertPolicy, windows: list[dict]) -> list[dict]:
    events = []
    for w in windows:
        events += policy.evaluate(w)
    return events


def test_flapping_feature_fires_and_resolves_once_per_hysteresis_period():
    cfg = AlertingConfig(fire_after=2, resolve_after=3)
    policy = AlertPolicy({"churn": cfg})
    # hovering at the threshold: over, under, over, under, ... for 40 windows
    pattern = [{"f03": 1} if i % 2 == 0 else {} for i in range(40)]
    events = run(policy, [report(i, d) for i, d in enumerate(pattern)])
    assert events == []  # never 2 windows in a row over: never fires
    pattern = [{"f03": 1} if i % 3 else {} for i in range(40)]  # over, over, under, ...
    events = run(AlertPolicy({"churn": cfg}), [report(i, d) for i, d in enumerate(pattern)])
    assert [e["status"] for e in events] == ["firing"]  # never 3 windows under: stays firing
    # a real episode: fires once, resolves once
    pattern = [{}] * 3 + [{"f03": 1}] * 5 + [{}] * 6
    events = run(AlertPolicy({"churn": cfg}), [report(i, d) for i, d in enumerate(pattern)])
    assert [(e["status"], e["window"]["start"][-6:]) for e in events] == [
        ("firing", "04:00Z"), ("resolved", "10:00Z")]
    assert events[0]["fingerprint"] == events[1]["fingerprint"] == fingerprint(
        "churn", "f03", "feature_drift")
    assert events[1]["endsAt"] == "2026-11-22T10:10:59Z"
    assert events[1]["startsAt"] == events[0]["startsAt"]


def test_escalation_and_step_down_without_duplicates():
    policy = AlertPolicy({"churn": AlertingConfig(fire_after=1, resolve_after=2)})
    pattern = [1, 1, 2, 2, 1, 2, 1, 1, 1, 0, 0]
    events = run(policy, [report(i, {"f07": s} if s else {}) for i, s in enumerate(pattern)])
    assert [(e["status"], e["labels"]["severity"]) for e in events] == [
        ("firing", "warning"), ("firing", "critical"), ("firing", "warning"),
        ("resolved", "warning")]
    assert len({e["fingerprint"] for e in events}) == 1


def test_twenty_features_drifting_at_once_give_one_grouped_alert():
    policy = AlertPolicy({"churn": AlertingConfig()})
    drifting = {f"f{i:02d}": 2 if i % 2 else 1 for i in range(20)}
    windows = [report(0, {}), report(1, drifting), report(2, drifting), report(3, {}),
               report(4, {}), report(5, {})]
    events = run(policy, windows)
    assert [e["status"] for e in events] == ["firing", "resolved"]
    grouped = events[0]
    assert "feature" not in grouped["labels"]
    assert grouped["labels"]["severity"] == "critical"
    assert len(grouped["features"]) == 20
    values = [f["value"] for f in grouped["features"]]
    assert values == sorted(values, reverse=True)
    assert grouped["fingerprint"] == fingerprint("churn", None, "feature_drift")


def test_data_quality_alerts_are_their_own_kinds():
    policy = AlertPolicy({"churn": AlertingConfig()})
    events = run(policy, [report(0, {}, dq={("f02", "missing"): 2, ("f05", "stuck"): 2})])
    kinds = {(e["kind"], e["labels"].get("feature"), e["labels"]["alertname"],
              e["labels"].get("check")) for e in events}
    assert kinds == {("missing_values", "f02", "DataQuality", "missing"),
                     ("stuck_feature", "f05", "DataQuality", "stuck")}
    assert all(e["diagnosis"]["root_cause"] == "feature_unavailable" for e in events)


def test_diagnosis_tells_faults_from_drift():
    r = report(0, {"f01": 2})
    r["features"]["f01"]["scores"]["variance_ratio"] = 100.0
    assert diagnose(r)["root_cause"] == "feature_recalibration"
    assert diagnose(report(0, {"f01": 2}))["root_cause"] == "data_drift"
    assert diagnose(report(0, {"f01": 2}), first_window=True)["root_cause"] == \
        "training_serving_skew"
    assert diagnose(report(0, {})) is None
    r = report(0, {})
    r["schema"]["unexpected_events"] = 10
    r["schema"]["unexpected_fields"] = {"new_field": 10}
    assert diagnose(r) == {"root_cause": "schema_change", "explanation": diagnose(r)[
        "explanation"], "top_features": ["new_field"]}


def test_grouped_alert_from_a_real_stream(minimal_config: Path, tmp_path: Path):
    drift = synthetic.Drift(at=20_000, mean_shift={f: 1.0 for f in synthetic.NUMERIC})
    events = synthetic.write_jsonl(tmp_path / "e.jsonl", 40_000, seed=8, drift=drift)
    summary = replay(load_config(minimal_config), events, tmp_path / "out", progress=False)
    alerts = [orjson.loads(x) for x in (tmp_path / "out" / "alerts.jsonl").read_bytes()
              .splitlines()]
    drift_alerts = [a for a in alerts if a["kind"] == "feature_drift"]
    # one grouped alert (the detectors fire it as a warning mid-window, the window test
    # escalates the same alert to critical): never a page per feature
    assert len({a["fingerprint"] for a in drift_alerts}) == 1, summary.as_text()
    assert all("feature" not in a["labels"] for a in drift_alerts)
    assert len(drift_alerts[-1]["features"]) >= 18  # lognormal features shift less in PSI
    assert any(a["kind"] == "dataset_drift" for a in alerts)


def test_rescaled_feature_is_diagnosed_as_recalibration(minimal_config: Path, tmp_path: Path):
    drift = synthetic.Drift(at=10_000, rescale={"f10": 100.0})
    events = synthetic.write_jsonl(tmp_path / "e.jsonl", 20_000, seed=9, drift=drift)
    replay(load_config(minimal_config), events, tmp_path / "out", progress=False)
    alerts = [orjson.loads(x) for x in (tmp_path / "out" / "alerts.jsonl").read_bytes()
              .splitlines()]
    assert {a["kind"] for a in alerts} >= {"feature_drift", "out_of_range"}
    # window alerts carry the diagnosis (a detector's mid-window alert has no window yet)
    window_alerts = [a for a in alerts if a["status"] == "firing"
                     and not a["method"].startswith(("cusum_", "page_hinkley_"))]
    assert window_alerts
    assert all(a["diagnosis"]["root_cause"] == "feature_recalibration" for a in window_alerts)


def test_grouped_alert_is_updated_when_features_join_or_leave():
    policy = AlertPolicy({"churn": AlertingConfig(resolve_after=2)})
    first = {"f01": 1, "f02": 1, "f03": 2}
    later = {**first, "f04": 1, "f05": 1}
    minus = {k: v for k, v in later.items() if k != "f01"}
    windows = [report(0, first), report(1, later), report(2, later), report(3, minus),
               report(4, minus), report(5, minus)] + [report(6 + i, {}) for i in range(2)]
    per_window = [policy.evaluate(w) for w in windows]
    grouped = [[e for e in evs if e["kind"] == "feature_drift"] for evs in per_window]
    assert [len(g) for g in grouped] == [1, 1, 0, 0, 1, 0, 0, 1]   # at most one per window
    fired, joined, left, resolved = (g[0] for g in grouped if g)
    assert [e["status"] for e in (fired, joined, left, resolved)] == [
        "firing", "firing", "firing", "resolved"]
    assert len({e["fingerprint"] for e in (fired, joined, left, resolved)}) == 1
    assert {f["feature"] for f in fired["features"]} == {"f01", "f02", "f03"}
    assert {f["feature"] for f in joined["features"]} == {"f01", "f02", "f03", "f04", "f05"}
    # f01 went back to ok in window 3 and resolves after resolve_after=2 windows
    assert {f["feature"] for f in left["features"]} == {"f02", "f03", "f04", "f05"}
    assert joined["startsAt"] == fired["startsAt"]
    assert {f["feature"] for f in resolved["features"]} == {"f02", "f03", "f04", "f05"}
    assert all(f["severity"] == "ok" for f in resolved["features"])
    # Alertmanager keeps only labels and annotations: the full list is an annotation
    assert joined["annotations"]["features"].split(", ") == [
        f["feature"] for f in joined["features"]]
    assert "feature" not in joined["labels"]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_direct_push_resends_the_updated_grouped_alert(tmp_path: Path):
    """A real Alertmanager shows the features that joined a firing grouped alert."""
    import shutil
    import subprocess
    import time
    import urllib.request

    from helpers import wait_until

    from stream_monitor.io.sinks import AlertmanagerPush
    binary = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
    if binary is None:
        pytest.fail("alertmanager not on PATH: run `bash .ci/install-system-deps.sh`")
    port = _free_port()
    cfg = tmp_path / "am.yml"
    cfg.write_text("route: {receiver: none}\nreceivers: [{name: none}]\n")
    log = (tmp_path / "am.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={cfg}",
                             f"--storage.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}",
                             "--cluster.listen-address="], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"

    def get(path: str):
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                status, body = r.status, r.read()
        except OSError:
            return 0, None
        try:
            return status, orjson.loads(body)
        except orjson.JSONDecodeError:
            return status, body

    try:
        wait_until(lambda: get("/-/ready")[0] == 200, 60, "alertmanager ready",
                   lambda: (tmp_path / "am.log").read_text()[-2000:])
        # event times near now: Alertmanager takes startsAt as wall-clock time
        now = time.time()

        def window(i: int, drift: dict) -> dict:
            r = report(i, drift)
            for key, ts in (("start", now - 120 + 60 * i), ("end", now - 61 + 60 * i)):
                r["window"][key] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
            return r

        policy = AlertPolicy({"churn": AlertingConfig()})
        push = AlertmanagerPush(base, timeout=5.0)
        assert push.send(policy.evaluate(window(0, {"f01": 1, "f02": 1, "f03": 1})))
        assert push.send(policy.evaluate(window(1, {"f01": 1, "f02": 1, "f03": 1,
                                                     "f04": 1, "f05": 1})))

        def grouped() -> list[dict]:
            alerts = get("/api/v2/alerts?active=true")[1] or []
            return [a for a in alerts if a["labels"].get("alertname") == "FeatureDrift"]

        wait_until(lambda: grouped() and "f05" in grouped()[0]["annotations"].get(
            "features", ""), 30, "the updated grouped alert at Alertmanager",
            lambda: str(get("/api/v2/alerts")[1])[:2000])
        alerts = grouped()
        assert len(alerts) == 1   # one alert, updated in place (same labels)
        assert sorted(alerts[0]["annotations"]["features"].split(", ")) == [
            "f01", "f02", "f03", "f04", "f05"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
