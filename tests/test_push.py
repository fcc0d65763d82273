"""Direct push to Alertmanager when it does not answer: back off, count once, keep."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from helpers import wait_until

from stream_monitor.io.sinks import AlertmanagerPush, alertmanager_payload


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


# -- against a real Alertmanager -------------------------------------------------------


@pytest.fixture
def alertmanager_url(tmp_path):
    binary = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
    if binary is None:
        pytest.fail("alertmanager not on PATH: run `bash .ci/install-system-deps.sh`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "am.yml"
    cfg.write_text("route: {receiver: none}\nreceivers: [{name: none}]\n")
    log = (tmp_path / "am.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.path={tmp_path / 'd'}",
                             f"--web.listen-address=127.0.0.1:{port}",
                             "--cluster.listen-address="], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(ready, 60, "alertmanager ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _active(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/api/v2/alerts?active=true", timeout=5) as r:
        return orjson.loads(r.read())


def test_event_time_with_fractions_never_starts_after_the_resolve(alertmanager_url):
    """Event times carry microseconds, the clock seconds: compared as strings,
    "...:49.5Z" sorts before "...:49Z", startsAt landed after endsAt and Alertmanager
    refused the resolve, which then blocked every later push."""
    ahead = datetime.now(UTC).replace(microsecond=500_000) + timedelta(seconds=1)
    starts = ahead.isoformat().replace("+00:00", "Z")      # event time, a bit ahead
    push = AlertmanagerPush(alertmanager_url, timeout=5.0)
    assert push.send([{**_alert("f01"), "startsAt": starts}])
    wait_until(lambda: _active(alertmanager_url), 10, "the firing alert")
    # the same second on the clock, half a second later in event time
    payload = alertmanager_payload({**_alert("f01", "resolved"),
                                    "startsAt": "2026-11-22T10:00:00.500000Z"},
                                   now="2026-11-22T10:00:00Z")
    assert payload["startsAt"] == payload["endsAt"] == "2026-11-22T10:00:00Z"
    assert push.send([{**_alert("f01", "resolved"), "startsAt": starts}])
    assert not push.pending
    wait_until(lambda: not _active(alertmanager_url), 10, "the alert resolved")


def test_a_refused_alert_does_not_block_later_ones(alertmanager_url):
    failures: list[int] = []
    push = AlertmanagerPush(alertmanager_url, timeout=5.0, on_failure=failures.append)
    bad = _alert("x")
    bad["labels"] = {**bad["labels"], "not a label name": "v"}   # Alertmanager says 400
    assert push.send([bad]) is False
    assert failures == [1] and not push.pending                 # counted, not retried
    assert push.send([_alert("f02")])
    wait_until(lambda: any(a["labels"].get("feature") == "f02"
                           for a in _active(alertmanager_url)), 10, "the later alert")
