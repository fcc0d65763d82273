"""Policy: window findings -> alert events (hysteresis, grouping, diagnosis).

A finding fires after `fire_after` consecutive windows at warning or above and
resolves after `resolve_after` consecutive windows back at ok; it escalates to
critical at once and steps back down only after `resolve_after` windows below
critical, so a score hovering at a threshold cannot flap. Each state change is one
alert event with a stable fingerprint (model, feature, kind). When
`group_min_features` or more features of a model drift, one model-level alert lists
them ranked by score instead of paging once per feature; when a feature joins or leaves
that set while it fires, the grouped alert is re-emitted (same fingerprint, the new
`features` list), at most once per window. `diagnose` names the most
likely cause: data drift, a pipeline fault that looks like drift, or label shift.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from stream_monitor.config import AlertingConfig
from stream_monitor.core.evaluate import SEVERITY_NAMES

# kind -> (alertname, data-quality check or None)
KINDS: dict[str, tuple[str, str | None]] = {
    "feature_drift": ("FeatureDrift", None),
    "dataset_drift": ("DatasetDrift", None),
    "prediction_drift": ("PredictionDrift", None),
    "label_shift": ("LabelShift", None),
    "missing_values": ("DataQuality", "missing"),
    "out_of_range": ("DataQuality", "out_of_range"),
    "stuck_feature": ("DataQuality", "stuck"),
    "unseen_categories": ("DataQuality", "unseen_categories"),
    "type_violations": ("DataQuality", "type_violations"),
    "schema_change": ("DataQuality", "schema"),
    # performance monitoring (performance.py): realized performance, error-stream detectors
    "performance": ("ModelPerformance", None),
    "concept_drift": ("ConceptDrift", None),
}
CHECK_KIND = {check: kind for kind, (_, check) in KINDS.items() if check}

_SUMMARY = {
    "feature_drift": "Feature {feature} of model {model} drifted ({method} {value:.3g})",
    "dataset_drift": "{value:.0%} of the features of model {model} drifted",
    "prediction_drift": "Predictions of model {model} drifted ({method} {value:.3g})",
    "label_shift": "Label distribution of model {model} shifted ({method} {value:.3g})",
    "missing_values": "Feature {feature} of model {model} is missing more often (+{value:.1%})",
    "out_of_range": "{value:.1%} of feature {feature} of model {model} outside the reference range",
    "stuck_feature": "Feature {feature} of model {model} is stuck at one value",
    "unseen_categories": "Feature {feature} of model {model} has unseen categories (+{value:.1%})",
    "type_violations": "{value:.1%} of values of feature {feature} of model {model} "
                       "have a wrong type",
    "schema_change": "Schema of model {model} changed at {feature} ({value:.1%} of events)",
    "performance": "Performance of model {model} fell ({method} {value:.3g})",
    "concept_drift": "Concept drift in model {model}: error {value:.3g} ({method} detector)",
}
_ACTION = {
    "feature_drift": "Compare the feature's current distribution with the reference "
                     "(stream_monitor_feature_drift_score); if inputs really changed, "
                     "check performance before retraining.",
    "dataset_drift": "Many inputs changed at once: look for an upstream change or a new "
                     "population before retraining.",
    "prediction_drift": "The model's outputs changed; check the feature alerts of the same "
                        "model to see which inputs drive it.",
    "label_shift": "The base rate changed; recalibrate thresholds or retrain with the new prior.",
    "missing_values": "Check the upstream producer of this feature (outage, join failure).",
    "out_of_range": "Check for a unit or scale change in the feature pipeline.",
    "stuck_feature": "The feature is frozen: check for a stale cache or a default value "
                     "filling in for a failed lookup.",
    "unseen_categories": "New categories reach the model: check for a new upstream "
                         "vocabulary or a spelling change.",
    "type_violations": "The producer sends values of the wrong type: check the serving "
                       "schema against the model's reference.",
    "schema_change": "Fields appeared or disappeared: check the serving schema.",
    "performance": "Realized performance on labelled outcomes fell below the reference: read "
                   "the diagnosis before retraining (a pipeline fault is fixed upstream).",
    "concept_drift": "The error stream changed while serving: the input-outcome relation moved; "
                     "retrain on recent labelled data.",
}


def fingerprint(model: str, feature: str | None, kind: str) -> str:
    """Stable across restarts and instances: the same finding always maps to one key."""
    return hashlib.sha256(f"{model}\x1f{feature or ''}\x1f{kind}".encode()).hexdigest()[:16]


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Finding:
    kind: str
    model: str
    feature: str | None
    severity: int
    method: str
    value: float
    threshold: float


def findings(report: dict[str, Any], dq_min_events: int = 1) -> list[Finding]:
    """Everything a window report says, as findings (ok ones included, for resolving)."""
    model = report["model"]
    out = []
    sev = SEVERITY_NAMES.index
    for name, f in report["features"].items():
        out.append(Finding("feature_drift", model, name, sev(f["severity"]), f["method"],
                           f["value"] or 0.0, f["threshold"]))
        for check, q in f["data_quality"].items():
            out.append(Finding(CHECK_KIND[check], model, name, sev(q["severity"]), check,
                               q["value"] or 0.0, 0.0))
    ds = report["dataset"]
    out.append(Finding("dataset_drift", model, None, sev(ds["severity"]), "drifted_share",
                       ds["drifted_share"], 0.0))
    for key, kind in (("prediction", "prediction_drift"), ("label", "label_shift")):
        if key in report:
            p = report[key]
            out.append(Finding(kind, model, None, sev(p["severity"]), p["method"],
                               p["value"] or 0.0, p["threshold"]))
    return out


def diagnose(report: dict[str, Any], first_window: bool = False) -> dict[str, Any] | None:
    """The most likely cause of what a window shows, with the features behind it."""
    feats = report["features"]

    def with_check(check: str) -> list[str]:
        return [n for n, f in feats.items() if f["data_quality"][check]["severity"] != "ok"]

    drifted = report["dataset"]["drifted_features"]
    pred = report.get("prediction", {}).get("severity", "ok") != "ok"
    label = report.get("label", {}).get("severity", "ok") != "ok"
    if report["schema"]["unexpected_events"] or with_check("schema"):
        cause, top = "schema_change", with_check("schema") or list(report["schema"][
            "unexpected_fields"])
        why = "fields appeared in or disappeared from the events; fix the producer, do not retrain"
    elif with_check("missing"):
        cause, top = "feature_unavailable", with_check("missing")
        why = "values are missing far more often than in the reference: an upstream outage"
    elif with_check("stuck"):
        cause, top = "stale_feature", with_check("stuck")
        why = "a feature that varies in the reference is frozen at one value"
    elif with_check("type_violations"):
        cause, top = "schema_change", with_check("type_violations")
        why = "values arrive with a different type than in the reference"
    elif recal := [n for n in drifted if _looks_rescaled(feats[n])]:
        cause, top = "feature_recalibration", recal
        why = ("the feature's scale changed (variance ratio or range far from the reference): "
               "a unit or normalisation change upstream, not a new population")
    elif drifted and first_window:
        cause, top = "training_serving_skew", drifted
        why = ("drift is present from the first window the monitor saw: compare how serving "
               "computes these features with how training did")
    elif drifted:
        cause, top = "data_drift", drifted
        why = ("input distributions changed" + (" and the predictions followed"
               if pred else "; predictions are stable so far"))
    elif label:
        cause, top = "label_shift", []
        why = "the base rate of the target changed while inputs did not"
    elif pred:
        cause, top = "prediction_drift", []
        why = "predictions changed without a monitored input drifting: concept change or an " \
              "input the monitor does not see"
    else:
        return None
    return {"root_cause": cause, "explanation": why, "top_features": top[:10]}


def _looks_rescaled(f: dict[str, Any]) -> bool:
    if f["kind"] != "numeric":
        return False
    vr = f["scores"].get("variance_ratio")
    oor = f["data_quality"]["out_of_range"]["severity"] != "ok"
    return oor or (vr is not None and (vr > 9.0 or vr < 1 / 9.0))


@dataclass
class _State:
    severity: int = 0           # current alert severity, 0 = not firing
    over: int = 0               # consecutive windows at warning or above
    under: int = 0              # consecutive windows back at ok
    below_critical: int = 0     # consecutive windows below critical while critical
    started: str = ""
    members: frozenset = frozenset()  # grouped alert: the features it was last sent with


@dataclass
class AlertPolicy:
    """Hysteresis and grouping over the findings of successive windows of each model."""

    config: dict[str, AlertingConfig]          # per model
    states: dict[tuple, _State] = field(default_factory=dict)
    windows_seen: dict[str, int] = field(default_factory=dict)
    _resolved_severity: int = 0
    # sequential detectors: alarms since the model's last window, and its last report's
    # features (what a mid-window grouped alert lists for the features already firing)
    detected: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    last_features: dict[str, dict[str, Any]] = field(default_factory=dict)

    def severity(self, model: str, feature: str | None, kind: str) -> int:
        """Current alert severity of a finding (0 when not firing)."""
        st = self.states.get((model, feature, kind))
        return st.severity if st else 0

    def _step(self, key: tuple, severity: int, cfg: AlertingConfig, now: str
              ) -> tuple[str | None, str]:
        """Advance one finding by one window.

        Returns the state change ('firing', 'resolved' or None) and when the alert started.
        """
        st = self.states.get(key)
        if st is None:
            if severity == 0:
                return None, ""  # nothing to remember for findings that never fired
            st = self.states[key] = _State()
        if st.severity == 0:
            st.over = st.over + 1 if severity else 0
            if severity and st.over >= cfg.fire_after:
                st.severity, st.under, st.below_critical, st.started = severity, 0, 0, now
                return "firing", st.started
            if not severity:
                del self.states[key]
            return None, ""
        if severity == 0:
            st.under += 1
            if st.under >= cfg.resolve_after:
                del self.states[key]
                self._resolved_severity = st.severity
                return "resolved", st.started
            return None, st.started
        st.under = 0
        if severity > st.severity:
            st.severity, st.below_critical = severity, 0
            return "firing", st.started
        if severity < st.severity:
            st.below_critical += 1
            if st.below_critical >= cfg.resolve_after:
                st.severity, st.below_critical = severity, 0
                return "firing", st.started
        else:
            st.below_critical = 0
        return None, st.started

    def evaluate(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        """Alert events (firing / resolved state changes) for one window report."""
        model = report["model"]
        cfg = self.config[model]
        seen = self.windows_seen.get(model, 0)
        self.windows_seen[model] = seen + 1
        diagnosis = diagnose(report, first_window=seen == 0)
        events = []
        drift_changes = []
        now = _window_end(report)
        alarmed = self.detected.pop(model, {})
        self.last_features[model] = report["features"]
        for f in findings(report):
            if f.kind == "feature_drift" and f.severity == 0 and f.feature in alarmed:
                # a detector alarmed during this window: the feature stays firing
                a = alarmed[f.feature]
                f = replace(f, severity=1, method=a["method"], value=a["value"],
                            threshold=a["threshold"])
            key = (f.model, f.feature, f.kind)
            change, started = self._step(key, f.severity, cfg, now)
            if change is None:
                continue
            if change == "resolved":  # a resolved alert keeps the labels it fired with
                f = replace(f, severity=self._resolved_severity)
            if f.kind == "feature_drift":
                drift_changes.append((f, change, started))
            else:
                events.append(self._event(f, change, report, diagnosis, started=started))
        events = self._grouped(report, cfg, drift_changes, diagnosis) + events
        return events

    def detections(self, model: str, alarms: list[tuple[str, str, float, float]],
                   window: dict[str, Any]) -> list[dict[str, Any]]:
        """Sequential detectors' alarms of one block, mid-window: (feature, method, value,
        threshold) each. The features fire at once (warning), grouped as window findings
        are; a feature already firing is not paged again. The model's next window report
        then confirms it (window drift) or keeps it while its detector keeps alarming;
        without either it resolves after `resolve_after` windows, as window findings do.
        """
        detected = self.detected.setdefault(model, {})
        changes = []
        now = window.get("end") or iso_now()
        for feature, method, value, threshold in alarms:
            detected[feature] = {"method": method, "value": value, "threshold": threshold}
            key = (model, feature, "feature_drift")
            st = self.states.get(key)
            if st is not None and st.severity:
                continue
            self.states[key] = _State(severity=1, started=now)
            changes.append((Finding("feature_drift", model, feature, 1, method, value,
                                    threshold), "firing", now))
        if not changes:
            return []
        report = {"model": model, "window": window,
                  "features": {**self.last_features.get(model, {}), **detected}}
        return self._grouped(report, self.config[model], changes, None)

    def _grouped(self, report: dict[str, Any], cfg: AlertingConfig,
                 changes: list[tuple[Finding, str, str]], diagnosis) -> list[dict[str, Any]]:
        model = report["model"]
        firing = [k[1] for k, st in self.states.items()
                  if k[0] == model and k[2] == "feature_drift" and k[1] is not None
                  and st.severity]
        gkey = (model, None, "feature_drift")
        group = self.states.get(gkey)
        if group is None and len(firing) < cfg.group_min_features:
            return [self._event(f, change, report, diagnosis, started=started)
                    for f, change, started in changes]
        feats = report["features"]
        ranked = sorted(firing, key=lambda n: -(feats[n]["value"] or 0.0))
        listed = [{"feature": n, "method": feats[n]["method"], "value": feats[n]["value"],
                   "threshold": feats[n]["threshold"],
                   "severity": SEVERITY_NAMES[self.states[(model, n, "feature_drift")].severity]}
                  for n in ranked]
        severity = max((self.states[(model, n, "feature_drift")].severity for n in firing),
                       default=0)
        top = listed[0] if listed else {"method": "", "value": 0.0, "threshold": 0.0}
        gf = Finding("feature_drift", model, None, severity, top["method"], top["value"] or 0.0,
                     top["threshold"])
        if group is None:
            self.states[gkey] = _State(severity=severity, started=_window_end(report),
                                       members=frozenset(firing))
            return [self._event(gf, "firing", report, diagnosis, listed)]
        if not firing:
            del self.states[gkey]
            gf = replace(gf, severity=group.severity)
            # the resolved event names the features it was last sent with, now back at ok
            listed = [{"feature": n, "method": feats[n]["method"], "value": feats[n]["value"],
                       "threshold": feats[n]["threshold"], "severity": "ok"}
                      for n in sorted(group.members & feats.keys(),
                                      key=lambda n: -(feats[n]["value"] or 0.0))]
            return [self._event(gf, "resolved", report, diagnosis, listed, group.started)]
        if severity != group.severity or frozenset(firing) != group.members:
            # a feature joined or left (or the severity moved): one update per window,
            # same fingerprint, so the alert topic and Alertmanager list every feature
            group.severity, group.members = severity, frozenset(firing)
            return [self._event(gf, "firing", report, diagnosis, listed, group.started)]
        return []

    def _event(self, f: Finding, status: str, report: dict[str, Any], diagnosis,
               features: list[dict[str, Any]] | None = None,
               started: str | None = None) -> dict[str, Any]:
        alertname, check = KINDS[f.kind]
        now = _window_end(report)
        starts = started or now
        severity = SEVERITY_NAMES[max(f.severity, 1)]
        labels = {"alertname": alertname, "model": f.model, "severity": severity}
        if f.feature is not None:
            labels["feature"] = f.feature
        if check:
            labels["check"] = check
        annotations = {}
        if f.kind == "feature_drift" and f.feature is None:
            names = ", ".join(x["feature"] for x in (features or [])[:5])
            summary = f"{len(features or [])} features of model {f.model} drifted ({names})"
            # the whole ranked list, so Alertmanager (which only keeps labels and
            # annotations) shows every feature the grouped alert is about
            annotations["features"] = ", ".join(x["feature"] for x in features or [])
        else:
            summary = _SUMMARY[f.kind].format(model=f.model, feature=f.feature,
                                              method=f.method, value=f.value)
        if status == "resolved":
            summary = "Resolved: " + summary
        desc = _ACTION[f.kind]
        if diagnosis and status == "firing":
            desc = f"Likely cause: {diagnosis['root_cause']} ({diagnosis['explanation']}). {desc}"
        win = report["window"]
        event = {
            "labels": labels,
            "annotations": {"summary": summary, "description": desc, **annotations},
            "startsAt": starts,
            "endsAt": now if status == "resolved" else None,
            "status": status,
            "fingerprint": fingerprint(f.model, f.feature, f.kind),
            "kind": f.kind,
            "method": f.method,
            "value": f.value,
            "threshold": f.threshold,
            "window": {k: win[k] for k in ("start", "end", "events", "first_line", "last_line")
                       if k in win},
        }
        if features is not None:
            event["features"] = features
        if diagnosis and status == "firing":
            event["diagnosis"] = diagnosis
        return event


def _window_end(report: dict[str, Any]) -> str:
    return report["window"].get("end") or iso_now()
