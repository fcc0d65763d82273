"""Partials: scale-out records between instances, and the merger that closes windows.

In scale-out mode (`scale_out.enabled`) every instance of a consumer group keeps partial
event-time windows for the input partitions it consumes and does not judge them. At
every checkpoint it publishes, per model, one record to `topics.partials` (keyed by
model, so all of a model's records land on one partition, in order): the delta of each
open window since its previous record, then a watermark mark for each input partition
it owns (its event-time watermark for the model, and whether it has been idle for that
model). The instance that owns the model's partition of that topic feeds the records to
a `PartialMerger`, which sums the deltas per window (`WindowAccumulator.merge` is exact)
and closes a window once every contributing partition's watermark has passed its end
plus the allowed lateness. Because a record's deltas precede its marks, and records of
one model are read in the order they were produced, a mark past a window's end proves
that every partial of that window from that partition has already been read.

This module does no I/O: `PartialPublisher` builds the records from a `Monitor` and
`PartialMerger` consumes them; the Kafka edge (kafka/runtime.py) moves the bytes.

Record format: `SMPW`, a 2-byte format version, then one msgpack document (the tagged
values of `kafka/state.py`: numpy arrays as raw bytes, the fixed-point sums as integers):
`{"model", "instance", "windows": [[index, start, end, accumulator], ...],
"marks": [[source, watermark, idle], ...]}`. A source is `topic:partition`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stream_monitor.core.engine import ClosedWindow, WindowAccumulator
from stream_monitor.kafka.state import StateError, frame, unframe

if TYPE_CHECKING:
    from stream_monitor.pipeline import Monitor

MAGIC = b"SMPW"
VERSION = 1
_NEG_INF = float("-inf")


@dataclass
class PartialRecord:
    """One instance's contribution to one model since its previous record."""

    model: str
    windows: list[ClosedWindow]                   # deltas of open windows (start/end set)
    marks: list[tuple[str, float, bool]]          # (source, watermark, idle) per partition
    instance: str = ""
    # sequential detectors' alarms since the previous record: ([(feature, method,
    # value, threshold)], block window) per block (`BatchResult.alarms`)
    alarms: list[tuple[list[tuple], dict[str, Any]]] = field(default_factory=list)

    def encode(self) -> bytes:
        body = {"model": self.model, "instance": self.instance,
                "windows": [[w.index, w.start, w.end, w.accumulator] for w in self.windows],
                "marks": [[s, float(wm), bool(idle)] for s, wm, idle in self.marks],
                "alarms": [[[list(a) for a in found], window] for found, window in self.alarms]}
        return frame(MAGIC, VERSION, body)

    @classmethod
    def decode(cls, data: bytes) -> PartialRecord:
        """The record in `data`; StateError (one line) if it is not one or is corrupt."""
        body = unframe(data, MAGIC, VERSION, "partial-window record")
        try:
            windows = [ClosedWindow(body["model"], int(i), acc, start=start, end=end)
                       for i, start, end, acc in body["windows"]]
            marks = [(str(s), float(wm), bool(idle)) for s, wm, idle in body["marks"]]
            if not all(isinstance(w.accumulator, WindowAccumulator) for w in windows):
                raise TypeError("a window without an accumulator")
            alarms = [([tuple(a) for a in found], dict(window))
                      for found, window in body.get("alarms", [])]
            return cls(str(body["model"]), windows, marks, str(body.get("instance", "")),
                       alarms)
        except StateError:
            raise
        except Exception as exc:  # truncated or corrupted bytes
            raise StateError(f"corrupt partial-window record ({type(exc).__name__}: "
                             f"{exc})") from None


class PartialPublisher:
    """The instance side: what to publish at a checkpoint, and which models are idle.

    A model is idle on this instance when it accepted no event of it for `idle_timeout`
    seconds of `clock` (counted from the start, or from the last assignment, before the
    first event), so a partition that carries no traffic of a model, or has stopped,
    does not hold that model's windows open forever.
    """

    def __init__(self, idle_timeout: float, instance: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.idle_timeout = idle_timeout
        self.instance = instance
        self.clock = clock
        self.started = clock()
        self.active: dict[str, float] = {}    # model -> clock of its last accepted event
        self.alarms: dict[str, list] = {}     # model -> detector alarms not published yet

    def assigned(self) -> None:
        """New partitions: give every model a fresh grace period before it counts idle."""
        self.started = self.clock()
        self.active = {m: max(t, self.started) for m, t in self.active.items()}

    def note(self, events: Counter, alarms: Iterable[tuple] = ()) -> None:
        """A batch was applied: `events` is its per-model count of accepted events,
        `alarms` its detector alarms (`BatchResult.alarms`), published with the deltas."""
        now = self.clock()
        for model, n in events.items():
            if n:
                self.active[model] = now
        for model, found, window in alarms:
            self.alarms.setdefault(model, []).append((found, window))

    def forget(self) -> None:
        """The input since the last checkpoint is re-read (an abort): drop its alarms."""
        self.alarms = {}

    def idle(self, model: str) -> bool:
        return self.clock() - self.active.get(model, self.started) > self.idle_timeout

    def records(self, monitor: Monitor, sources: Iterable[str]) -> list[PartialRecord]:
        """Per model: the deltas since the previous call (taken out of `monitor`), then a
        mark for every input partition this instance owns. Call it inside the checkpoint
        transaction; models with no delta still get their marks (watermarks move on)."""
        sources = sorted(sources)
        deltas = monitor.take_partials()
        out = []
        for model, wm in monitor.watermarks().items():
            idle = self.idle(model)
            marks = [(s, wm, idle) for s in sources]
            windows = deltas.get(model, [])
            alarms = self.alarms.pop(model, [])
            if windows or marks or alarms:
                out.append(PartialRecord(model, windows, marks, self.instance, alarms))
        return out


class PartialMerger:
    """The merging side, per model: pending window sums and each partition's watermark.

    `add(record)` sums the record's deltas into the pending windows and then updates the
    marks of its partitions (a partition's watermark is what its latest owner reported).
    `ready()` closes, oldest first, every pending window whose end plus allowed lateness
    the model's merged watermark has reached: the minimum over the partitions that are
    not idle (when every partition is idle: the maximum). A closed window never reopens:
    a delta that arrives for it later (an idle partition that woke up behind the others,
    or a new owner that accepted an event its predecessor would have rejected as late) is
    counted in `late_events` and dropped, as the single process drops late events.
    """

    def __init__(self, windows: dict[str, tuple[float, float]]):
        self.windows = windows          # model -> (seconds, allowed_lateness)
        self.pending: dict[str, dict[int, ClosedWindow]] = {}
        self.marks: dict[str, dict[str, tuple[float, bool]]] = {}
        self.closed_to: dict[str, float] = {}   # model -> merged watermark applied so far
        self.late_events: Counter = Counter()   # model -> events in deltas after closing
        self.late_records: Counter = Counter()  # model -> such deltas
        # every input partition that must report before a window closes (the Kafka edge
        # sets it from the topics' metadata): an instance that has not published its
        # first marks yet must not be left out as if it did not exist
        self.expected: frozenset[str] = frozenset()

    @classmethod
    def for_monitor(cls, monitor: Monitor) -> PartialMerger:
        return cls({name: (p.windows.window.seconds, p.windows.window.allowed_lateness)
                    for name, p in monitor.models.items()})

    def add(self, record: PartialRecord) -> None:
        model = record.model
        if model not in self.windows:
            raise StateError(f"a partial-window record of model {model!r}, not in the config")
        size, lateness = self.windows[model]
        closed_to = self.closed_to.get(model, _NEG_INF)
        pending = self.pending.setdefault(model, {})
        for w in record.windows:
            if (w.index + 1) * size + lateness <= closed_to:
                self.late_events[model] += w.accumulator.events
                self.late_records[model] += 1
                continue
            have = pending.get(w.index)
            pending[w.index] = w if have is None else ClosedWindow(
                model, w.index, have.accumulator.merge(w.accumulator),
                start=have.start, end=have.end)
        marks = self.marks.setdefault(model, {})
        for source, wm, idle in record.marks:
            marks[source] = (wm, idle)

    def watermark(self, model: str) -> float:
        """The model's merged watermark: the minimum over partitions not idle."""
        reported = self.marks.get(model, {})
        if not reported or not self.expected <= reported.keys():
            return _NEG_INF
        marks = list(reported.values())
        active = [wm for wm, idle in marks if not idle]
        return min(active) if active else max(wm for wm, _ in marks)

    def ready(self) -> dict[str, list[ClosedWindow]]:
        """Per model, the windows that may close now, oldest first (removed from pending)."""
        out = {}
        for model, pending in self.pending.items():
            size, lateness = self.windows[model]
            wm = max(self.watermark(model), self.closed_to.get(model, _NEG_INF))
            self.closed_to[model] = wm
            done = sorted(b for b in pending if (b + 1) * size + lateness <= wm)
            if done:
                out[model] = [pending.pop(b) for b in done]
        return out

    def flush(self) -> dict[str, list[ClosedWindow]]:
        """Close every pending window (end of a bounded input)."""
        out = {m: [p[b] for b in sorted(p)] for m, p in self.pending.items() if p}
        self.pending = {}
        return out

    def pending_events(self) -> dict[str, int]:
        return {m: sum(w.accumulator.events for w in p.values())
                for m, p in self.pending.items()}

    # -- checkpoint: the merger's state travels with the rest of the monitor's ----------

    def model_state(self, model: str) -> dict[str, Any]:
        """One model's pending sums, marks and progress (`pack`-able), for a changelog
        record of the instance that owns the model's partition of `topics.partials`."""
        return {"pending": [[w.index, w.start, w.end, w.accumulator]
                            for w in self.pending.get(model, {}).values()],
                "marks": self.marks.get(model, {}), "closed_to": self.closed_to.get(model),
                "late_events": self.late_events[model], "late_records": self.late_records[model]}

    def load_model_state(self, model: str, state: dict[str, Any]) -> None:
        self.pending[model] = {int(i): ClosedWindow(model, int(i), acc, start=s, end=e)
                               for i, s, e, acc in state["pending"]}
        self.marks[model] = {str(src): (float(wm), bool(idle))
                             for src, (wm, idle) in state["marks"].items()}
        if state["closed_to"] is not None:
            self.closed_to[model] = float(state["closed_to"])
        self.late_events[model] = int(state["late_events"])
        self.late_records[model] = int(state["late_records"])

    def snapshot(self) -> bytes:
        """Every model's state as bytes (`restore` puts it back)."""
        models = sorted(set(self.pending) | set(self.marks))
        body = {m: self.model_state(m) for m in models}
        return frame(MAGIC, VERSION, body)

    def restore(self, data: bytes) -> None:
        body: dict[str, Any] = unframe(data, MAGIC, VERSION, "partial-merger snapshot")
        try:
            for model, state in body.items():
                self.load_model_state(model, state)
        except Exception as exc:
            raise StateError(f"corrupt partial-merger snapshot ({type(exc).__name__}: "
                             f"{exc})") from None
