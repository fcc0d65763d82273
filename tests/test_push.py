"""Direct push to Alertmanager when it does not answer: back off, count once, keep."""

from __future__ import annotations

import socket
import time

from stream_monitor.sinks import AlertmanagerPush


def _alert(fp: str, status: str = "firing") -> dict:
    return {"labels": {"alertname": "FeatureDrift", "model": "m", "feature": fp,
                       "severity": "warning"},
            "annotations": {"summary": "s", "description": "d"},
            "startsAt": "2026-11-22T10:00:00Z", "endsAt": None, "status": status,
            "fingerprint": fp}


def test_unreachable_alertmanager_backs_off_and_counts_each_alert_once():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = []
    push = AlertmanagerPush(f"http://127.0.0.1:{port}", timeout=1.0,
                            on_failure=failures.append)
    assert push.send([_alert("a"), _alert("b")]) is False
    assert failures == [2] and len(push.pending) == 2
    assert not push.due()  # backing off: the loop does not hammer a dead Alertmanager
    push.queue([_alert("c")])
    time.sleep(1.1)
    assert push.due()
    assert push.send([]) is False
    assert failures == [2, 1]  # only the new alert is counted
    assert [p["labels"]["feature"] for p in push.pending] == ["a", "b", "c"]
    assert push.retry_at - time.monotonic() > 1.0  # the back-off doubled


def test_payload_caps_a_fractional_start_ahead_of_the_clock():
    """Event time within the same second as now but later: capped (string order is not
    time order: '12:00:41.7Z' < '12:00:41Z' as text)."""
    from stream_monitor.sinks import alertmanager_payload
    alert = {"labels": {}, "annotations": {}, "status": "resolved",
             "startsAt": "2026-11-23T12:00:41.727682Z"}
    p = alertmanager_payload(alert, now="2026-11-23T12:00:41Z")
    assert p["startsAt"] == "2026-11-23T12:00:41Z" and p["endsAt"] == "2026-11-23T12:00:41Z"
    alert["startsAt"] = "2026-11-23T12:00:40.5Z"
    assert alertmanager_payload(alert, now="2026-11-23T12:00:41Z")["startsAt"] == \
        "2026-11-23T12:00:40.5Z"
