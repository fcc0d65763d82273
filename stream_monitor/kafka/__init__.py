"""stream_monitor.kafka: the Kafka edge: the run loop, checkpointed state, the embedded broker."""
