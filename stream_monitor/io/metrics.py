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

from stream_monitor.alerting.policy import CHECK_KIND, AlertPolicy
from stream_monitor.config import MetricsConfig

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
    # exactly-once state (kafka/runtime.py): checkpoints, restores, aborted transactions
    "stream_monitor_checkpoint_age_seconds",
    "stream_monitor_checkpoint_size_bytes",            # {model}
    "stream_monitor_checkpoints_total",
    "stream_monitor_restore_duration_seconds",
    "stream_monitor_transaction_aborts_total",
    "stream_monitor_late_partial_events_total",        # {model} scale-out merger
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
        self.checkpoint_age = Gauge(p + "checkpoint_age_seconds",
                                    "Seconds since the last committed checkpoint (exactly-once)",
                                    registry=r)
        self.checkpoint_size = Gauge(p + "checkpoint_size_bytes",
                                     "Size of the model's last committed state snapshot",
                                     ["model"], registry=r)
        self.checkpoints = Counter(_name(p + "checkpoints_total"),
                                   "Checkpoints committed (state, offsets and outputs in one "
                                   "Kafka transaction)", registry=r)
        self.restore_seconds = Gauge(p + "restore_duration_seconds",
                                     "Time the last restore from the changelog took", registry=r)
        self.txn_aborts = Counter(_name(p + "transaction_aborts_total"),
                                  "Kafka transactions aborted (state and input rewound to the "
                                  "last checkpoint)", registry=r)
        self.late_partials = Counter(_name(p + "late_partial_events_total"),
                                     "Scale-out: events in partial windows that reached the "
                                     "merger after their window was merged (dropped)",
                                     ["model"], registry=r)
        self._models = LabelCap(cfg.max_models, "model", self.dropped)
        self._features: dict[str, LabelCap] = {}
        self._reasons = LabelCap(cfg.max_reasons, "reason", self.dropped)
        self._max_features = cfg.max_features_per_model
        # (metric, label values) -> the metric's child: `labels()` validates and locks on
        # every call (about 2 us); a window's report sets a few hundred (`_kid`)
        self._kids: dict[tuple, Any] = {}

    def _kid(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, remembered. Only for metrics whose children are
        never removed, with label values already admitted by the caps (so bounded)."""
        key = (metric, values)
        kid = self._kids.get(key)
        if kid is None:
            kid = self._kids[key] = metric.labels(*values)
        return kid

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
                        self._kid(self.block_stat, model, name, stat).set(v)
        for d in getattr(result, "detections", ()):
            if self._models.admit(d.model) and self._feature_ok(d.model, d.feature):
                self.detector_alarms.labels(d.model, d.feature, d.method).inc()

    def record_window(self, report: dict[str, Any], policy: AlertPolicy) -> None:
        model = report["model"]
        if not self._models.admit(model):
            return
        kid = self._kid
        kid(self.windows, model).inc()
        state = policy.severity
        for name, f in report["features"].items():
            if not self._feature_ok(model, name):
                continue
            scores = f["scores"]
            for method in _SCORES:
                v = scores.get(method)
                if v is not None:
                    kid(self.drift_score, model, name, method).set(v)
            kid(self.drift_severity, model, name).set(state(model, name, "feature_drift"))
            for check, q in f["data_quality"].items():
                if q["value"] is not None:
                    kid(self.dq_ratio, model, name, check).set(q["value"])
                kid(self.dq_severity, model, name, check).set(
                    state(model, name, CHECK_KIND[check]))
        kid(self.drifted_ratio, model).set(report["dataset"]["drifted_share"])
        kid(self.dataset_severity, model).set(state(model, None, "dataset_drift"))
        if "prediction" in report:
            for method, v in report["prediction"]["scores"].items():
                if v is not None and method in _SCORES:
                    kid(self.pred_score, model, method).set(v)
            kid(self.pred_severity, model).set(state(model, None, "prediction_drift"))


# -- performance monitoring (label join, performance.py) --------------------------------

PERFORMANCE_METRIC_NAMES: frozenset[str] = frozenset({
    "stream_monitor_labels_total",                     # {model} label events counted
    "stream_monitor_labels_joined_total",              # {model}
    "stream_monitor_labels_unjoined_total",            # {model, reason}
    "stream_monitor_join_waiting",                     # {model, side} predictions|labels
    "stream_monitor_join_oldest_prediction_age_seconds",  # {model}
    "stream_monitor_label_lag_seconds",                # histogram {model}
    "stream_monitor_performance",                      # {model, version, metric} realized
    "stream_monitor_performance_estimated",            # {model, version, metric} CBPE
    "stream_monitor_performance_estimation_gap",       # {model, version, metric}
    "stream_monitor_performance_severity",             # {model, version}
    "stream_monitor_segment_performance",              # {model, version, segment, metric}
    "stream_monitor_segment_gap",                      # {model, version, field, metric}
    "stream_monitor_retrain_records_total",            # {model, decision}
})
METRIC_NAMES = METRIC_NAMES | PERFORMANCE_METRIC_NAMES

_MAX_VERSIONS = 20            # model versions exported per model (the rest counted as cut)
_MAX_SEGMENT_VALUES = 50      # segment values exported per model


class PerformanceMetrics:
    """The label join's and performance windows' metrics, on a monitor's registry."""

    def __init__(self, base: MonitorMetrics):
        r, p = base.registry, "stream_monitor_"
        self.base = base
        self.labels = Counter(_name(p + "labels_total"), "Label events counted", ["model"],
                              registry=r)
        self.joined = Counter(_name(p + "labels_joined_total"),
                              "Predictions joined to their label", ["model"], registry=r)
        self.unjoined = Counter(_name(p + "labels_unjoined_total"),
                                "Predictions and labels that could not be joined, by reason",
                                ["model", "reason"], registry=r)
        self.waiting = Gauge(p + "join_waiting", "Entries waiting in the join buffer",
                             ["model", "side"], registry=r)
        self.oldest = Gauge(p + "join_oldest_prediction_age_seconds",
                            "Event-time age of the oldest prediction waiting for its label",
                            ["model"], registry=r)
        self.lag = Histogram(p + "label_lag_seconds",
                             "Label time minus prediction time of joined pairs", ["model"],
                             buckets=(1, 10, 60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400,
                                      3 * 86400, 7 * 86400, 30 * 86400), registry=r)
        self.perf = Gauge(p + "performance", "Realized performance of the last closed window",
                          ["model", "version", "metric"], registry=r)
        self.estimated = Gauge(p + "performance_estimated",
                               "Performance estimated from scores (CBPE), last window",
                               ["model", "version", "metric"], registry=r)
        self.gap = Gauge(p + "performance_estimation_gap",
                         "Estimated minus realized performance, last window",
                         ["model", "version", "metric"], registry=r)
        self.severity = Gauge(p + "performance_severity",
                              "Performance alert state (0 ok, 1 warning, 2 critical)",
                              ["model", "version"], registry=r)
        self.segment = Gauge(p + "segment_performance",
                             "Per-segment performance of the last window",
                             ["model", "version", "segment", "metric"], registry=r)
        self.segment_gap = Gauge(p + "segment_gap",
                                 "Largest gap between segments of one field, last window",
                                 ["model", "version", "field", "metric"], registry=r)
        self.retrain = Counter(_name(p + "retrain_records_total"),
                               "Retraining requests and refusals published",
                               ["model", "decision"], registry=r)
        self._versions: dict[str, LabelCap] = {}
        self._segments: dict[str, LabelCap] = {}
        self._seen_joined: dict[str, int] = {}
        self._seen_unjoined: dict[tuple[str, str], int] = {}

    def _version_ok(self, model: str, version: str) -> bool:
        cap = self._versions.setdefault(model, LabelCap(_MAX_VERSIONS, "version",
                                                        self.base.dropped))
        return cap.admit(version)

    def record(self, result, monitor) -> None:
        admit = self.base._models.admit
        for model, n in result.labels.items():
            if admit(model):
                self.labels.labels(model).inc(n)
        for reason, n in result.unjoined.items():
            self.unjoined.labels("", reason).inc(n)
        stage = monitor.performance
        for model, mp in stage.models.items():
            if not admit(model):
                continue
            buf = mp.buffer
            d = buf.joined - self._seen_joined.get(model, 0)
            if d:
                self.joined.labels(model).inc(d)
                self._seen_joined[model] = buf.joined
            for reason, n in buf.unjoined.items():
                d = n - self._seen_unjoined.get((model, reason), 0)
                if d:
                    self.unjoined.labels(model, reason).inc(d)
                    self._seen_unjoined[(model, reason)] = n
            self.waiting.labels(model, "predictions").set(len(buf.predictions))
            self.waiting.labels(model, "labels").set(len(buf.labels))
            self.oldest.labels(model).set(buf.oldest_prediction_age())
            lags = mp.drain_lags()
            if lags:
                hist = self.lag.labels(model)
                for v in lags:
                    hist.observe(v)
        for report in result.performance:
            self._window(report, monitor)
        for rec in result.retrain:
            if admit(rec["model"]):
                self.retrain.labels(rec["model"], rec["decision"]).inc()

    def _window(self, report: dict[str, Any], monitor) -> None:
        model, version = report["model"], str(report.get("model_version") or "")
        if not self.base._models.admit(model) or not self._version_ok(model, version):
            return
        if report.get("type") == "estimate":  # CBPE over all predictions, no labels
            for metric, v in report["estimated"].items():
                if v is not None:
                    self.estimated.labels(model, version, metric).set(v)
            return
        for metric, v in report["metrics"].items():
            if isinstance(v, float | int) and metric != "scored":
                self.perf.labels(model, version, metric).set(v)
        for metric, v in (report.get("estimated") or {}).items():
            if metric != "scored" and v is not None:
                self.estimated.labels(model, version, metric).set(v)
        for metric, v in (report.get("estimation_gap") or {}).items():
            self.gap.labels(model, version, metric).set(v)
        key = (model, f"{report.get('model_version')}\x1fperformance", "performance")
        st = monitor.policy.states.get(key)
        self.severity.labels(model, version).set(st.severity if st else 0)
        seg = report.get("segments")
        if seg:
            cap = self._segments.setdefault(model, LabelCap(_MAX_SEGMENT_VALUES, "segment",
                                                            self.base.dropped))
            for fname, values in seg["fields"].items():
                for value, fig in values.items():
                    name = f"{fname}={value}"
                    if not cap.admit(name):
                        continue
                    for metric, v in fig.items():
                        if v is not None:
                            self.segment.labels(model, version, name, metric).set(v)
                for metric, v in seg["gaps"].get(fname, {}).items():
                    self.segment_gap.labels(model, version, fname, metric).set(v)


def record_performance(metrics: MonitorMetrics, result, monitor) -> None:
    """Update the performance metrics after a batch (no-op without performance monitoring)."""
    if monitor.performance is None:
        return
    perf = getattr(metrics, "_performance", None)
    if perf is None:
        perf = metrics._performance = PerformanceMetrics(metrics)
    perf.record(result, monitor)
