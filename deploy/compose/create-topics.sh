#!/usr/bin/env bash
# One-shot topic creation for the compose stack (service `kafka-init`, apache/kafka image).
# Every topic deploy/compose/stream-monitor.yaml names is created here, before the
# monitor starts (the broker's auto-creation is off); tests/test_deploy.py checks that the
# two lists agree. Idempotent: existing topics are left as they are.
set -euo pipefail
BOOTSTRAP=${BOOTSTRAP_SERVERS:-kafka:9092}
KAFKA_TOPICS=${KAFKA_TOPICS:-/opt/kafka/bin/kafka-topics.sh}

# name partitions [extra --config options]
TOPICS=(
  "inferences 3"                        # inference events: partitions bound the monitor instances
  "labels 3"                            # delayed ground truth
  "model-alerts 1"                      # alert events, key = fingerprint
  "model-events-dlq 1"                  # rejected messages with their reason in headers
  "model-retrain 1"                     # retraining requests (performance monitoring)
)

for spec in "${TOPICS[@]}"; do
  read -r name partitions extra <<<"$spec"
  # shellcheck disable=SC2086
  "$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
    --topic "$name" --partitions "$partitions" --replication-factor 1 ${extra:-}
done
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --list
