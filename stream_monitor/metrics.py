"""Prometheus metrics: the names dashboards and alert rules rely on, and their updates.

Each `MonitorMetrics` owns its registry (so tests and several monitors in one process
do not collide). Label values are capped (models, features per model, reject reasons):
what is cut is counted in `stream_monitor_label_values_dropped_total`, so a flood of
model names cannot blow up Prometheus. Severity gauges carry the alert policy's state
(after hysteresis), so Prometheus rules and the alert topic agree.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .config import MetricsConfig
from .policy import CHECK_KIND, AlertPolicy

# Every metric family the monitor exports. Dashboards and rules are tested against it.
METRIC_NAMES: frozenset[str] = frozenset({
    "stream_monitor_messages_consumed_total",          # {topic}
    "stream_monitor_events_total",                     # {model}
    "stream_monitor_rejects_total",                    # {model, reason}
    "stream_monitor_dead_letters_total",
    "stream_monitor_late_events_total",                # {model}
    "stream_monitor_feature_drift_score",              # {model, feature, method}
    "stream_monitor_feature_drift_severity",           # {model, feature} 0 ok 1 warning 2 critical
    "stream_monitor_prediction_drift_score",           # {model, method}
    "stream_monitor_prediction_drift_severity",        # {model}
    "stream_monitor_drifted_features_ratio",           # {model}
    "stream_monitor_dataset_drift_severity",           # {model}
    "stream_monitor_data_quality_ratio",               # {model, feature, check}
    "stream_monitor_data_quality_severity",            # {model, feature, check}
    "stream_monitor_windows_closed_total",             # {model}
    "stream_monitor_window_fill_events",               # {model}
    "stream_monitor_alerts_published_total",           # {severity}
    "stream_monitor_alert_delivery_failures_total",
    "stream_monitor_consumer_lag_messages",            # {topic, partition}
    "stream_monitor_batch_duration_seconds",           # histogram
    "stream_monitor_event_lag_seconds",                # {model}
    "stream_monitor_last_batch_timestamp_seconds",
    "stream_monitor_ready",
    "stream_monitor_label_values_dropped_total",       # {label}
    "stream_monitor_pending_deliveries",
    "stream_monitor_oldest_pending_delivery_seconds",
    "stream_monitor_uncommitted_batches",
    "stream_monitor_dead_letters_truncated_total",
    "stream_monitor_reread_messages_skipped_total",
    "stream_monitor_loop_heartbeat_timestamp_seconds",
    "stream_monitor_detector_block_statistic",         # {model, feature, statistic}
    "stream_monitor_detector_alarms_total",            # {model, feature, method}
})

UNKNOWN_MODEL = "unknown"  # the one model label value of every unconfigured model name

_SCORES = ("psi", "jensen_shannon", "ks", "wasserstein", "mean_shift", "chi2_pvalue",
           "ks_pvalue", "unseen_share")


def _name(full: str) -> str:
    """prometheus-client adds `_total` to counters itself."""
    return full.removesuffix("_total")


class LabelCap:
    """Admits at most `limit` distinct values of a label; the rest are dropped, counted."""

    def __init__(self, limit: int, label: str, dropped: Counter):
        self.limit, self.label, self.dropped = limit, label, dropped
        self.seen: set[str] = set()
        self.reserved: set[str] = set()  # always admitted, outside the limit

    def admit(self, value: str) -> bool:
        if value in self.seen or value in self.reserved:
            return True
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return True
        self.dropped.labels(self.label).inc()
        return False


class MonitorMetrics:
    """All metrics of one monitor process."""

    def __init__(self, config: MetricsConfig | None = None,
                 registry: CollectorRegistry | None = None):
        cfg = config or MetricsConfig()
        self.registry = r = registry or CollectorRegistry()
        p = "stream_monitor_"
        self.consumed = Counter(_name(p + "messages_consumed_total"),
                                "Messages consumed from the input topics", ["topic"], registry=r)
        self.events = Counter(_name(p + "events_total"),
                              "Events counted in the statistics", ["model"], registry=r)
        self.rejects = Counter(_name(p + "rejects_total"),
                               "Messages rejected by the decoder, by reason", ["model", "reason"],
                               registry=r)
        self.dead_letters = Counter(_name(p + "dead_letters_total"),
                                    "Rejected messages delivered to the dead-letter topic",
                                    registry=r)
        self.late = Counter(_name(p + "late_events_total"),
                            "Events behind the watermark by more than the allowed lateness",
                            ["model"], registry=r)
        self.drift_score = Gauge(p + "feature_drift_score",
                                 "Drift score of the last closed window", ["model", "feature",
                                                                           "method"], registry=r)
        self.drift_severity = Gauge(p + "feature_drift_severity",
                                    "Feature drift alert state after hysteresis "
                                    "(0 ok, 1 warning, 2 critical)", ["model", "feature"],
                                    registry=r)
        self.pred_score = Gauge(p + "prediction_drift_score",
                                "Prediction drift score of the last closed window",
                                ["model", "method"], registry=r)
        self.pred_severity = Gauge(p + "prediction_drift_severity",
                                   "Prediction drift alert state (0 ok, 1 warning, 2 critical)",
                                   ["model"], registry=r)
        self.drifted_ratio = Gauge(p + "drifted_features_ratio",
                                   "Share of features drifting in the last closed window",
                                   ["model"], registry=r)
        self.dataset_severity = Gauge(p + "dataset_drift_severity",
                                      "Dataset drift alert state (0 ok, 1 warning, 2 critical)",
                                      ["model"], registry=r)
        self.dq_ratio = Gauge(p + "data_quality_ratio",
                              "Data-quality ratio of the last closed window (missing: increase "
                              "over the reference; stuck: 1 when frozen)",
                              ["model", "feature", "check"], registry=r)
        self.dq_severity = Gauge(p + "data_quality_severity",
                                 "Data-quality alert state (0 ok, 1 warning, 2 critical)",
                                 ["model", "feature", "check"], registry=r)
        self.windows = Counter(_name(p + "windows_closed_total"), "Windows closed and evaluated",
                               ["model"], registry=r)
        self.window_fill = Gauge(p + "window_fill_events", "Events in the open window",
                                 ["model"], registry=r)
        self.alerts = Counter(_name(p + "alerts_published_total"),
                              "Alert events delivered to the alert topic", ["severity"],
                              registry=r)
        self.alert_failures = Counter(_name(p + "alert_delivery_failures_total"),
                                      "Alert or dead-letter deliveries that failed", registry=r)
        self.lag = Gauge(p + "consumer_lag_messages", "High watermark minus consumer position",
                         ["topic", "partition"], registry=r)
        self.batch_seconds = Histogram(
            p + "batch_duration_seconds", "Time to decode, update and evaluate one batch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r)
        self.event_lag = Gauge(p + "event_lag_seconds",
                               "Now minus the newest event time seen", ["model"], registry=r)
        self.last_batch = Gauge(p + "last_batch_timestamp_seconds",
                                "Unix time of the last applied batch", registry=r)
        self.ready = Gauge(p + "ready", "1 when partitions are assigned and the broker answers",
                           registry=r)
        self.dropped = Counter(_name(p + "label_values_dropped_total"),
                               "Label values not exported because of the cardinality cap",
                               ["label"], registry=r)
        self.pending = Gauge(p + "pending_deliveries",
                             "Dead letters and alert events produced but not yet delivered",
                             registry=r)
        self.oldest_pending = Gauge(p + "oldest_pending_delivery_seconds",
                                    "Age of the oldest undelivered output (0 when none)",
                                    registry=r)
        self.uncommitted = Gauge(p + "uncommitted_batches",
                                 "Applied batches whose offsets wait for their outputs' delivery",
                                 registry=r)
        self.truncated = Counter(_name(p + "dead_letters_truncated_total"),
                                 "Rejects too large for the dead-letter topic, sent truncated "
                                 "(flagged, with original size and digest)", registry=r)
        self.reread_skipped = Counter(_name(p + "reread_messages_skipped_total"),
                                      "Messages consumed again after a failed commit and not "
                                      "applied twice", registry=r)
        self.heartbeat = Gauge(p + "loop_heartbeat_timestamp_seconds",
                               "Unix time of the consume loop's last turn", registry=r)
        self.block_stat = Gauge(p + "detector_block_statistic",
                                "Last complete block's statistic, about N(0,1) without drift "
                                "(pit_mean: location, chi2: shape)",
                                ["model", "feature", "statistic"], registry=r)
        self.detector_alarms = Counter(_name(p + "detector_alarms_total"),
                                       "Sequential detector alarms", ["model", "feature",
                                                                      "method"], registry=r)
        self._models = LabelCap(cfg.max_models, "model", self.dropped)
        self._features: dict[str, LabelCap] = {}
        self._reasons = LabelCap(cfg.max_reasons, "reason", self.dropped)
        self._max_features = cfg.max_features_per_model

    def reserve_models(self, models: list[str]) -> None:
        """Configured models (and so their features) always get their labels; any other
        model name shares the label value `unknown`, so made-up names in rejected events
        cannot use up the cap before a configured model shows up."""
        self._models.reserved.update(models)

    def _model(self, name: str | None) -> str:
        """The model label of a name ('' when there is none)."""
        if not name:
            return ""
        if self._models.reserved and name not in self._models.reserved:
            name = UNKNOWN_MODEL
        return name if self._models.admit(name) else ""

    def _feature_ok(self, model: str, feature: str) -> bool:
        if model in self._models.reserved:
            return True  # a configured model's features come from its reference
        cap = self._features.get(model)
        if cap is None:
            cap = self._features[model] = LabelCap(self._max_features, "feature", self.dropped)
        return cap.admit(feature)

    def record_batch(self, result, topics: dict[str, int], seconds: float,
                     policy: AlertPolicy, window_fill: dict[str, int],
                     newest_event: dict[str, float]) -> None:
        """Update everything one applied batch changed."""
        for topic, n in topics.items():
            self.consumed.labels(topic).inc(n)
        for model, n in result.events.items():
            if self._models.admit(model):
                self.events.labels(model).inc(n)
        for rej in result.rejects:
            model = self._model(rej.model)
            if self._reasons.admit(rej.reason):
                self.rejects.labels(model, rej.reason).inc()
            if rej.reason == "late_event" and model:
                self.late.labels(model).inc()
        for report in result.reports:
            self.record_window(report, policy)
        self.record_detectors(result)
        now = time.time()
        for model, fill in window_fill.items():
            if self._models.admit(model):
                self.window_fill.labels(model).set(fill)
        for model, ts in newest_event.items():
            if self._models.admit(model):
                self.event_lag.labels(model).set(max(0.0, now - ts))
        self.batch_seconds.observe(seconds)
        self.last_batch.set(now)

    def record_detectors(self, result) -> None:
        """Block statistics and alarms of the sequential detectors (detectors.py)."""
        for model, feats in getattr(result, "block_stats", {}).items():
            if not self._models.admit(model):
                continue
            for name, values in feats.items():
                if self._feature_ok(model, name):
                    for stat, v in values.items():
                        self.block_stat.labels(model, name, stat).set(v)
        for d in getattr(result, "detections", ()):
            if self._models.admit(d.model) and self._feature_ok(d.model, d.feature):
                self.detector_alarms.labels(d.model, d.feature, d.method).inc()

    def record_window(self, report: dict[str, Any], policy: AlertPolicy) -> None:
        model = report["model"]
        if not self._models.admit(model):
            return
        self.windows.labels(model).inc()
        state = policy.severity
        for name, f in report["features"].items():
            if not self._feature_ok(model, name):
                continue
            for method in _SCORES:
                v = f["scores"].get(method)
                if v is not None:
                    self.drift_score.labels(model, name, method).set(v)
            self.drift_severity.labels(model, name).set(state(model, name, "feature_drift"))
            for check, q in f["data_quality"].items():
                if q["value"] is not None:
                    self.dq_ratio.labels(model, name, check).set(q["value"])
                self.dq_severity.labels(model, name, check).set(
                    state(model, name, CHECK_KIND[check]))
        self.drifted_ratio.labels(model).set(report["dataset"]["drifted_share"])
        self.dataset_severity.labels(model).set(state(model, None, "dataset_drift"))
        if "prediction" in report:
            for method, v in report["prediction"]["scores"].items():
                if v is not None and method in _SCORES:
                    self.pred_score.labels(model, method).set(v)
            self.pred_severity.labels(model).set(state(model, None, "prediction_drift"))
