"""Sinks: where results go — files for `replay`; Kafka topics and Prometheus for `run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import orjson

from .decode import Reject


def reject_record(reject: Reject) -> dict[str, Any]:
    """A reject as kept in rejects.jsonl: where, why, and the raw text unchanged."""
    rec: dict[str, Any] = {"line": reject.position, "reason": reject.reason}
    if reject.detail:
        rec["detail"] = reject.detail
    if reject.model is not None:
        rec["model"] = reject.model
    if reject.feature is not None:
        rec["feature"] = reject.feature
    rec["raw"] = reject.raw.decode("utf-8", errors="replace")
    return rec


class JsonlSink:
    """Appends one JSON document per line; flushed on close."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: BinaryIO = path.open("wb")
        self.count = 0

    def write(self, doc: dict[str, Any]) -> None:
        self._fh.write(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))
        self._fh.write(b"\n")
        self.count += 1

    def close(self) -> None:
        self._fh.close()


class ReplayFiles:
    """windows.jsonl, alerts.jsonl and rejects.jsonl in one output directory."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.windows = JsonlSink(directory / "windows.jsonl")
        self.alerts = JsonlSink(directory / "alerts.jsonl")
        self.rejects = JsonlSink(directory / "rejects.jsonl")

    def write(self, result) -> None:
        for report in result.reports:
            self.windows.write(report)
        for alert in result.alerts:
            self.alerts.write(alert)
        for reject in result.rejects:
            self.rejects.write(reject_record(reject))

    def close(self) -> None:
        for sink in (self.windows, self.alerts, self.rejects):
            sink.close()
