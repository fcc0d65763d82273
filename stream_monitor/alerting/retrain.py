"""Retraining requests: triggers over performance windows and input alerts -> requests.

Trigger-based, not scheduled. A request is made when a performance alert of a model
version has lasted `after_windows` windows (once per alert episode), when
`every_labels` new joined labels have accumulated since the last request, or when the
input schema changed. Before requesting, the cause is checked: a pipeline fault
(feature missing or frozen, schema change, unit change) is not fixed by retraining, so
the record is a refusal that names the fix instead. Each record has a stable id (a
hash of model, version, trigger and window range), so a replay or a restarted
instance produces the same ids and consumers can deduplicate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from stream_monitor.config import RetrainConfig

REQUESTED = "requested"
REFUSED = "refused"


def request_id(model: str, version: str | None, trigger: str, first: Any, last: Any) -> str:
    key = f"{model}\x1f{version or ''}\x1f{trigger}\x1f{first}\x1f{last}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class _State:
    streak: int = 0                 # consecutive windows with a performance alert severity
    streak_first: dict | None = None
    episode_requested: bool = False
    labels_since: int = 0
    since_first: dict | None = None


class RetrainPolicy:
    """Per model version: when to ask for retraining, and when to refuse and why."""

    def __init__(self, settings: dict[str, RetrainConfig]):
        self.settings = settings
        self.states: dict[tuple[str, str | None], _State] = {}
        self.schema_alerts: set[str] = set()   # firing schema-change alerts already answered

    def on_window(self, report: dict[str, Any], findings: list,
                  faults: list[tuple[str, str, list[str]]]) -> list[dict[str, Any]]:
        """Requests (or refusals) triggered by one closed performance window."""
        model, version = report["model"], report.get("model_version")
        cfg = self.settings[model]
        st = self.states.setdefault((model, version), _State())
        win = report["window"]
        here = {"index": win["index"], "start": win["start"], "end": win["end"]}
        st.labels_since += win["labels"]
        st.since_first = st.since_first or here
        severity = max((f.severity for scope, f, _ in findings
                        if f.kind == "performance" and scope == "performance"), default=0)
        out = []
        if severity:
            st.streak += 1
            st.streak_first = st.streak_first or here
        else:
            st.streak, st.streak_first, st.episode_requested = 0, None, False
        if cfg.after_windows and st.streak >= cfg.after_windows and not st.episode_requested:
            st.episode_requested = True
            out.append(self._record(report, "performance_alert", st.streak_first, here, faults,
                                    st, f"performance alert for {st.streak} windows"))
        if cfg.every_labels and st.labels_since >= cfg.every_labels:
            out.append(self._record(report, "new_labels", st.since_first, here, faults, st,
                                    f"{st.labels_since} new labelled examples"))
        return out

    def on_alerts(self, alerts: list[dict[str, Any]], faults_of) -> list[dict[str, Any]]:
        """Schema changes seen by the drift side: a trigger whose answer is the fix."""
        out = []
        for a in alerts:
            if a.get("kind") != "schema_change":
                continue
            if a.get("status") != "firing":
                self.schema_alerts.discard(a.get("fingerprint"))
                continue
            if a.get("fingerprint") in self.schema_alerts:
                continue  # the same alert escalating: one record per alert
            self.schema_alerts.add(a.get("fingerprint"))
            model = a["labels"]["model"]
            cfg = self.settings.get(model)
            if cfg is None or not cfg.on_schema_change:
                continue
            win = a.get("window", {})
            here = {"start": win.get("start"), "end": win.get("end")}
            report = {"model": model, "model_version": None, "window": here,
                      "metrics": None, "reference": None}
            faults = faults_of(model)
            # the schema change leads the fix; other faults of the model follow
            faults = sorted(faults, key=lambda f: f[0] != "schema_change") or [
                ("schema_change", "fields appeared or disappeared: fix the producer or rebuild "
                 "the reference for the new schema", [a["labels"].get("feature")])]
            out.append(self._record(report, "schema_change", here, here, faults, None,
                                    f"schema change at {a['labels'].get('feature')}",
                                    fingerprint=a.get("fingerprint")))
        return out

    def _record(self, report: dict[str, Any], trigger: str, first: dict | None, last: dict,
                faults: list, st: _State | None, why: str,
                fingerprint: str | None = None) -> dict[str, Any]:
        model, version = report["model"], report.get("model_version")
        first = first or last
        rid = request_id(model, version, trigger, first.get("index", first.get("start")),
                         last.get("index", last.get("end")) if fingerprint is None
                         else fingerprint)
        diagnosis = report.get("diagnosis") or {}
        record: dict[str, Any] = {
            "id": rid, "model": model, "model_version": version, "trigger": trigger,
            "created_at": last.get("end"),
            "evidence": {
                "kind": diagnosis.get("root_cause", trigger),
                "features": diagnosis.get("top_features", []),
                "performance": report.get("metrics"), "reference": report.get("reference"),
                "alert_metric": report.get("alert_metric"),
                "windows": {"first": first, "last": last},
                "labels_since_last_request": st.labels_since if st else None,
            },
        }
        if faults:
            cause, fix, feats = faults[0]
            record.update(decision=REFUSED, reason=f"{why}, but the cause is a pipeline fault "
                          f"({cause}) that retraining cannot fix",
                          fix={"cause": cause, "features": [f for f in feats if f][:20],
                               "action": fix,
                               "all": [{"cause": c, "action": a, "features": fs[:20]}
                                       for c, a, fs in faults]})
        else:
            record.update(decision=REQUESTED, reason=why)
        if st is not None and trigger == "new_labels":  # the trigger is answered either way
            st.labels_since, st.since_first = 0, None
        return record
