"""Replay with delayed labels: inference lines and label lines merged by event time.

`replay --labels labels.jsonl` reads the labels file beside the input and applies each
label once the input has reached its event time: after each batch of input lines, the
labels whose `ts` is at or before the newest event time seen so far are joined (ties go
to the input first, so the merge is stable). Label lines may also be interleaved in the
input itself (a line without a features object that has an event id and a label); they
are applied right after the predictions of their batch. Because the join ages entries
by event time against the other stream, the result does not depend on how finely the
two files are interleaved. Labels files are expected in event-time order; a label
out of order is applied later, where it still joins (the buffer waits for it).

Writes what `replay` writes plus `performance.jsonl` (one line per closed performance
window per model and version) and `retrain.jsonl` (retraining requests and refusals).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from stream_monitor.config import Config
from stream_monitor.core.join import looks_like_label
from stream_monitor.io.decode import parse_timestamp
from stream_monitor.io.sinks import JsonlSink, ReplayFiles, reject_record
from stream_monitor.pipeline import BatchResult, Monitor

BATCH_LINES = 10_000


@dataclass
class LabelledReplaySummary:
    lines: int = 0                  # non-blank input lines read
    label_lines: int = 0            # label lines read (labels file and interleaved)
    events: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    unjoined: Counter = field(default_factory=Counter)
    windows: int = 0
    alerts: int = 0
    performance: int = 0
    retrain: int = 0

    @property
    def counted(self) -> int:
        return sum(self.events.values())

    def as_text(self) -> str:
        reasons = ", ".join(f"{r} {c}" for r, c in self.rejects.most_common()) or "none"
        return (f"lines read {self.lines} + label lines {self.label_lines}: events counted "
                f"{self.counted}, labels counted {sum(self.labels.values())} + rejects "
                f"{sum(self.rejects.values())} ({reasons}); windows {self.windows}, "
                f"performance windows {self.performance}, alerts {self.alerts}, "
                f"retraining records {self.retrain}")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield lineno, line


def _label_time(raw: bytes, ts_key: str) -> float:
    """A label line's event time; -inf when unreadable (applied at once, then rejected)."""
    try:
        ev = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return -math.inf
    t = parse_timestamp(ev.get(ts_key)) if type(ev) is dict else math.nan
    return t if t == t else -math.inf


def replay_labelled(config: Config, input_path: Path, labels_path: Path | None, out_dir: Path,
                    *, monitor: Monitor | None = None) -> LabelledReplaySummary:
    """The pipeline over an input file and a labels file merged by event time."""
    monitor = monitor or Monitor(config, labels=True)
    fields = config.decode.fields
    files = ReplayFiles(out_dir)
    perf = JsonlSink(out_dir / "performance.jsonl")
    retrain = JsonlSink(out_dir / "retrain.jsonl")
    summary = LabelledReplaySummary()
    label_file = labels_path.name if labels_path is not None else None

    def take(result: BatchResult, from_labels_file: bool = False) -> None:
        summary.events.update(result.events)
        summary.labels.update(result.labels)
        summary.rejects.update(r.reason for r in result.rejects)
        summary.unjoined.update(result.unjoined)
        summary.windows += len(result.reports)
        summary.alerts += len(result.alerts)
        summary.performance += len(result.performance)
        summary.retrain += len(result.retrain)
        if from_labels_file:  # rejects of the labels file name their file
            for r in result.rejects:
                files.rejects.write({**reject_record(r), "file": label_file})
            result.rejects = []
        files.write(result)
        for report in result.performance:
            perf.write(report)
        for record in result.retrain:
            retrain.write(record)

    pending: list[tuple[int, bytes]] = []   # label lines read ahead of the input

    def labels_upto(limit: float, source: Iterator) -> None:
        nonlocal pending
        due: list[tuple[int, bytes]] = []
        while True:
            if not pending:
                nxt = next(source, None)
                if nxt is None:
                    break
                summary.label_lines += 1
                pending = [nxt]
            lineno, raw = pending[0]
            if _label_time(raw, fields.ts) > limit:
                break
            due.append(pending.pop())
            if len(due) >= BATCH_LINES:
                take(monitor.process_labels([r for _, r in due], [n for n, _ in due]), True)
                due = []
        if due:
            take(monitor.process_labels([r for _, r in due], [n for n, _ in due]), True)

    source = iter(_lines(labels_path)) if labels_path is not None else iter(())
    try:
        batch: list[tuple[int, bytes]] = []
        for item in _lines(input_path):
            batch.append(item)
            if len(batch) >= BATCH_LINES:
                _input_batch(monitor, batch, fields, take, summary)
                batch = []
                labels_upto(max(monitor.newest_event.values(), default=-math.inf), source)
        if batch:
            _input_batch(monitor, batch, fields, take, summary)
        labels_upto(math.inf, source)
        take(monitor.flush())
    finally:
        files.close()
        perf.close()
        retrain.close()
    return summary


def _input_batch(monitor: Monitor, batch: list[tuple[int, bytes]], fields, take,
                 summary: LabelledReplaySummary) -> None:
    summary.lines += len(batch)
    events = [(n, r) for n, r in batch if not looks_like_label(r, fields)]
    if len(events) < len(batch):
        labels = [(n, r) for n, r in batch if looks_like_label(r, fields)]
        summary.label_lines += len(labels)
        summary.lines -= len(labels)
        take(monitor.process([r for _, r in events], [n for n, _ in events]))
        take(monitor.process_labels([r for _, r in labels], [n for n, _ in labels]))
    else:
        take(monitor.process([r for _, r in batch], [n for n, _ in batch]))
