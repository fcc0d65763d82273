"""Replay: the pipeline over a JSONL file of events, results to files.

Lines are numbered from 1 and carried through the engine, so every window knows its
first and last input line and every reject its line. Blank lines are skipped.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .performance import performance_enabled
from .pipeline import Monitor
from .sinks import ReplayFiles

BATCH_LINES = 10_000


@dataclass
class ReplaySummary:
    lines: int = 0                  # non-blank lines read
    events: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    windows: int = 0
    alerts: int = 0

    @property
    def counted(self) -> int:
        return sum(self.events.values())

    def as_text(self) -> str:
        reasons = ", ".join(f"{r} {c}" for r, c in self.rejects.most_common()) or "none"
        return (f"lines read {self.lines}: events counted {self.counted} + rejects "
                f"{sum(self.rejects.values())} ({reasons}); windows {self.windows}, "
                f"alerts {self.alerts}")


def _batches(path: Path, size: int):
    with path.open("rb") as fh:
        lines, numbers = [], []
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            lines.append(line)
            numbers.append(lineno)
            if len(lines) >= size:
                yield lines, numbers, fh.tell()
                lines, numbers = [], []
        if lines:
            yield lines, numbers, fh.tell()


def replay(config: Config, input_path: Path, out_dir: Path, *, progress: bool | None = None,
           monitor: Monitor | None = None, labels: Path | None = None) -> ReplaySummary:
    """Run the engine over `input_path`, writing windows, alerts and rejects to `out_dir`."""
    if labels is not None or (monitor.performance if monitor else performance_enabled(config)):
        from .replay_labels import replay_labelled  # delayed labels: merged by event time
        return replay_labelled(config, input_path, labels, out_dir, monitor=monitor)
    monitor = monitor or Monitor(config)
    files = ReplayFiles(out_dir)
    summary = ReplaySummary()
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )
        bar = Progress(TextColumn("replay"), BarColumn(), DownloadColumn(),
                       TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                       transient=True)
        task = bar.add_task("replay", total=input_path.stat().st_size, status="")
        bar.start()

    def take(result) -> None:
        summary.events.update(result.events)
        summary.rejects.update(r.reason for r in result.rejects)
        summary.windows += len(result.reports)
        summary.alerts += len(result.alerts)
        files.write(result)

    try:
        for lines, numbers, offset in _batches(input_path, BATCH_LINES):
            summary.lines += len(lines)
            take(monitor.process(lines, numbers))
            if bar is not None:
                bar.update(task, completed=offset,
                           status=f"{summary.counted} events, {summary.alerts} alerts")
        take(monitor.flush())
    finally:
        if bar is not None:
            bar.stop()
        files.close()
    return summary
