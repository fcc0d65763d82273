"""Kafka edge of the label join: one consumed batch split by topic.

The labels topic is read by the same consumer as the inference topics; within a batch,
messages of the labels topic go to `Monitor.process_labels` and the others to
`Monitor.process`, each with its own sequence positions so rejects still map back to
their message (dead letter with source topic/partition/offset). Predictions of a batch
are applied before its labels; the join does not depend on that order (join.py).
"""

from __future__ import annotations

from .pipeline import BatchResult, Monitor


def process_batch(monitor: Monitor, messages: list, values: list[bytes], base: int,
                  labels_topic: str | None) -> BatchResult:
    """Apply one consumed batch (inference and label messages mixed)."""
    if labels_topic is None or monitor.performance is None:
        return monitor.process(values, range(base, base + len(values)))
    is_label = [m.topic() == labels_topic for m in messages]
    if not any(is_label):
        return monitor.process(values, range(base, base + len(values)))
    events = [(base + i, v) for i, (v, lab) in enumerate(zip(values, is_label, strict=True))
              if not lab]
    labels = [(base + i, v) for i, (v, lab) in enumerate(zip(values, is_label, strict=True))
              if lab]
    result = monitor.process([v for _, v in events], [p for p, _ in events]) if events else \
        BatchResult()
    result.extend(monitor.process_labels([v for _, v in labels], [p for p, _ in labels]))
    result.messages = len(values)
    for doc in result.performance:  # Kafka positions are sequence numbers, not lines
        doc["window"].pop("first_line", None)
        doc["window"].pop("last_line", None)
    return result
