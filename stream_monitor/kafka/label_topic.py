"""Kafka edge of the label join: one consumed batch split by topic.

The labels topic is read by the same consumer as the inference topics; within a batch,
messages of the labels topic go to `Monitor.process_labels` and the others to
`Monitor.process`, each with its own sequence positions so rejects still map back to
their message (dead letter with source topic/partition/offset). Predictions of a batch
are applied before its labels; the join does not depend on that order (join.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from stream_monitor.pipeline import BatchResult, Monitor


def process_batch(monitor: Monitor, values: list[bytes], positions: Sequence[int],
                  is_label: list[bool] | None) -> BatchResult:
    """Apply one consumed batch (inference and label messages mixed; `is_label` says
    which messages came from the labels topic, None when none is configured)."""
    if not is_label or monitor.performance is None or not any(is_label):
        return monitor.process(values, positions)
    events = [(p, v) for p, v, lab in zip(positions, values, is_label, strict=True) if not lab]
    labels = [(p, v) for p, v, lab in zip(positions, values, is_label, strict=True) if lab]
    result = monitor.process([v for _, v in events], [p for p, _ in events]) if events else \
        BatchResult()
    result.extend(monitor.process_labels([v for _, v in labels], [p for p, _ in labels]))
    result.messages = len(values)
    for doc in result.performance:  # Kafka positions are sequence numbers, not lines
        doc["window"].pop("first_line", None)
        doc["window"].pop("last_line", None)
    return result
