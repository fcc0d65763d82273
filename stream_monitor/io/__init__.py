"""stream_monitor.io: decoding, sources and sinks outside Kafka: files, Prometheus, Alertmanager."""
