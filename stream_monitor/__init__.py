"""stream-monitor: a Kafka-native drift and performance monitor for ML models."""

__version__ = "0.1.0"
