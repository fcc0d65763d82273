"""Sinks: where results go — files for `replay`; Kafka topics and Prometheus for `run`."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from stream_monitor.io.decode import Reject

log = logging.getLogger("stream_monitor")


def reject_record(reject: Reject) -> dict[str, Any]:
    """A reject as kept in rejects.jsonl: where, why, and the raw text unchanged."""
    rec: dict[str, Any] = {"line": reject.position, "reason": reject.reason}
    if reject.detail:
        rec["detail"] = reject.detail
    if reject.model is not None:
        rec["model"] = reject.model
    if reject.feature is not None:
        rec["feature"] = reject.feature
    rec["raw"] = reject.raw.decode("utf-8", errors="replace")
    return rec


class JsonlSink:
    """Appends one JSON document per line; flushed on close."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: BinaryIO = path.open("wb")
        self.count = 0

    def write(self, doc: dict[str, Any]) -> None:
        self._fh.write(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))
        self._fh.write(b"\n")
        self.count += 1

    def close(self) -> None:
        self._fh.close()


class ReplayFiles:
    """windows.jsonl, alerts.jsonl and rejects.jsonl in one output directory."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.windows = JsonlSink(directory / "windows.jsonl")
        self.alerts = JsonlSink(directory / "alerts.jsonl")
        self.rejects = JsonlSink(directory / "rejects.jsonl")

    def write(self, result) -> None:
        for report in result.reports:
            self.windows.write(report)
        for alert in result.alerts:
            self.alerts.write(alert)
        for reject in result.rejects:
            self.rejects.write(reject_record(reject))

    def close(self) -> None:
        for sink in (self.windows, self.alerts, self.rejects):
            sink.close()


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def alertmanager_payload(alert: dict[str, Any], now: str | None = None) -> dict[str, Any]:
    """An alert event as Alertmanager's v2 API takes it.

    Alertmanager works in wall-clock time while alert events carry event time, which
    may run ahead of the clock: startsAt is capped at now, and a resolved alert ends now.
    """
    from stream_monitor.alerting.policy import iso_now
    now = now or iso_now()
    # compared as instants, not strings: event times carry fractions of a second and the
    # clock does not, and a startsAt after endsAt makes Alertmanager refuse the alert
    starts = min(alert["startsAt"], now, key=_instant)
    payload = {"labels": alert["labels"], "annotations": alert["annotations"],
               "startsAt": starts}
    if alert["status"] == "resolved":
        payload["endsAt"] = max(now, starts, key=_instant)
    if alert.get("generatorURL"):
        payload["generatorURL"] = alert["generatorURL"]
    return payload


class AlertmanagerPush:
    """Posts alert events straight to Alertmanager (`/api/v2/alerts`), off by default.

    For setups where an alert should not wait for a scrape and a rule evaluation. A
    failed post is retried with the next batch and counted; it never blocks the loop
    for longer than the configured timeout. Firing alerts are re-sent every
    `resend_interval` seconds, as Prometheus does, because Alertmanager resolves an
    alert it has not heard of for `resolve_timeout`.
    """

    def __init__(self, url: str, timeout: float, on_failure=None,
                 resend_interval: float = 60.0):
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.timeout = timeout
        self.on_failure = on_failure
        self.resend_interval = resend_interval
        self.pending: list[dict[str, Any]] = []
        self.active: dict[str, dict[str, Any]] = {}   # fingerprint -> firing payload
        self.last_sent = 0.0
        self.retry_at = 0.0          # back off while Alertmanager does not answer
        self._backoff = 1.0
        self._counted: set[int] = set()  # failed payloads already counted once

    def due(self) -> bool:
        import time
        now = time.monotonic()
        if now < self.retry_at:
            return False
        return bool(self.pending) or (
            bool(self.active) and now - self.last_sent >= self.resend_interval)

    def queue(self, alerts: list[dict[str, Any]]) -> None:
        """Add alert events to what the next post carries."""
        for a in alerts:
            payload = alertmanager_payload(a)
            previous = self.active.pop(a["fingerprint"], None)
            if previous is not None and previous["labels"] != payload["labels"]:
                # an escalation changes the severity label, which makes it another alert
                # for Alertmanager: end the old one
                from stream_monitor.alerting.policy import iso_now
                self.pending.append({**previous, "endsAt": iso_now()})
            if a["status"] == "firing":
                self.active[a["fingerprint"]] = payload
            self.pending.append(payload)

    def send(self, alerts: list[dict[str, Any]]) -> bool:
        """Post these alert events (plus anything that failed before, and a refresh of
        the firing ones when due)."""
        import time
        import urllib.error
        import urllib.request
        self.queue(alerts)
        if not self.pending and not self.due():
            return True
        if time.monotonic() - self.last_sent >= self.resend_interval:
            sent = {id(p) for p in self.pending}
            self.pending += [p for p in self.active.values() if id(p) not in sent]
        if not self.pending:
            return True
        req = urllib.request.Request(self.endpoint, data=orjson.dumps(self.pending),
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                ok = 200 <= resp.status < 300
        except urllib.error.HTTPError as exc:
            ok = False
            if 400 <= exc.code < 500 and exc.code != 429:
                # refused for its content: Alertmanager keeps the valid alerts of a post
                # and names the others; sending them again would block every later alert
                detail = exc.read()[:300].decode(errors="replace")
                log.error("Alertmanager refused %d alert(s) (HTTP %d): %s",
                          len(self.pending), exc.code, detail)
                if self.on_failure is not None:
                    self.on_failure(len([p for p in self.pending
                                         if id(p) not in self._counted]))
                self.pending, self._counted = [], set()
                self.last_sent = time.monotonic()
                return False
        except (urllib.error.URLError, OSError):
            ok = False
        if ok:
            self.pending = []
            self.last_sent = time.monotonic()
            self.retry_at, self._backoff, self._counted = 0.0, 1.0, set()
            return True
        # a failed alert is counted once, however often it is retried
        new = [p for p in self.pending if id(p) not in self._counted]
        self._counted.update(id(p) for p in new)
        if new and self.on_failure is not None:
            self.on_failure(len(new))
        self.retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.resend_interval)
        return False
