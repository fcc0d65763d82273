"""stream_monitor.alerting: policy: hysteresis, grouping, diagnosis, retraining requests."""
