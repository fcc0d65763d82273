"""Prometheus metrics: the names dashboards and alert rules rely on."""

# Every metric family the monitor exports (counters without the `_total` suffix
# are never used). Dashboards and rules are tested against this list.
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
})
