"""Scale-out on Kafka: the glue between `KafkaSidecar`'s transactions and `partials.py`.

Owns the two internal topics and what moves through them; the records and the merging
rules are `partials.py`, the transactions `runtime.py`:

- `topics.partials` (default `<group.id>-partials`; delete policy, `scale_out.partitions`
  partitions, key = model): at every checkpoint, inside its transaction, each instance
  publishes per model the deltas of its open event-time windows and a watermark mark
  per input partition it owns (`PartialPublisher`). It is not compacted: every delta
  counts, not only the last one.
- The instance that is assigned a model's partition of `topics.partials` (the same
  consumer group subscribes to it beside the inference topics) feeds the records to its
  `PartialMerger`, judges the windows it closes with its own `Monitor` (the alert policy
  of the merged windows lives there, once per model) and produces the reports and
  alerts in the same transaction that commits the partials' offsets.
- `<topics.partials>-merger` (compacted, key = model): the merger's state per model
  (pending sums, marks, the judge's policy state) with the partials offset it reflects,
  written in every checkpoint; the new owner of a partials partition restores it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgspec

from stream_monitor.config import partials_topic
from stream_monitor.kafka.partials import PartialMerger, PartialPublisher, PartialRecord
from stream_monitor.kafka.state import StateError, pack, unpack

if TYPE_CHECKING:
    from stream_monitor.kafka.runtime import KafkaSidecar
    from stream_monitor.pipeline import BatchResult

log = logging.getLogger("stream_monitor")
_MERGER_MAGIC = b"SMPM"


def merger_topic(partials: str) -> str:
    return f"{partials}-merger"


def ensure_topics(sidecar: KafkaSidecar, timeout: float = 10.0) -> None:
    """Create the partials topic (delete policy) and the merger's state topic
    (compacted) when absent; a failure is logged (auto-creation may still work)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from stream_monitor.kafka.runtime import _CONSUMER_ONLY, _PRODUCER_ONLY
    cfg = sidecar.config
    topic = partials_topic(cfg)
    kafka = {k: v for k, v in cfg.kafka.items()
             if k not in _CONSUMER_ONLY and k not in _PRODUCER_ONLY}
    admin = AdminClient({**kafka, "logger": sidecar.kafka_log})
    n = cfg.scale_out.partitions
    wanted = {topic: NewTopic(topic, n, replication_factor=-1,
                              config={"cleanup.policy": "delete"}),
              merger_topic(topic): NewTopic(merger_topic(topic), n, replication_factor=-1,
                                            config={"cleanup.policy": "compact"})}
    try:
        md = admin.list_topics(timeout=timeout)
        missing = [t for name, t in wanted.items()
                   if name not in md.topics or not md.topics[name].partitions]
        if missing:
            for name, fut in admin.create_topics(missing).items():
                try:
                    fut.result(timeout)
                    log.info("scale-out: created topic %s", name)
                except KafkaException as exc:
                    if "exist" not in str(exc).lower():
                        log.warning("scale-out: topic %s not created (%s)", name, exc)
    except KafkaException as exc:
        log.warning("scale-out: cannot check the internal topics (%s)", exc)


class ScaleOut:
    """One instance's part in scale-out: publisher of its partials, merger of the models
    whose partials partition it owns. Hooks into the sidecar's checkpoint transaction."""

    def __init__(self, sidecar: KafkaSidecar):
        from stream_monitor.pipeline import Monitor
        self.sidecar = sidecar
        cfg = sidecar.config
        self.topic = partials_topic(cfg)
        self.state_topic = merger_topic(self.topic)
        self.inputs = set(cfg.topics.inferences)
        self.publisher = PartialPublisher(cfg.scale_out.idle_timeout,
                                          sidecar.transactional_id or "")
        refs = {n: p.reference for n, p in sidecar.monitor.models.items()}
        self._judge_args = (cfg, refs)
        self.judge = Monitor(cfg, refs)
        self.merger = PartialMerger.for_monitor(self.judge)
        self.home: dict[str, int] = {}           # model -> its partials partition
        self.next_offset: dict[int, int] = {}    # partials partition -> next to read
        self._candidate: dict[str, tuple[int, bytes]] = {}   # in the open transaction
        self._committed: dict[str, tuple[int, bytes]] = {}   # model -> (partition, state)
        self._candidate_next: dict[int, int] = {}
        self._candidate_txn = ""                             # the transaction they are in
        self._committed_next: dict[int, int] = {}            # partials offsets committed
        self._owned: frozenset[int] | None = None
        self._idle_sent: dict[str, bool] = {}
        self.bad_records = 0
        self._late_logged = 0
        self._sources: list[str] = []
        sidecar.checkpoint_records.append(self.records)
        sidecar.on_rewind.append(self.rewind)

    # -- which partitions -------------------------------------------------------------

    def sources(self) -> list[str]:
        return sorted(f"{t}:{p}" for t, p in self.sidecar.assigned if t in self.inputs)

    def owned(self) -> frozenset[int]:
        return frozenset(p for t, p in self.sidecar.assigned if t == self.topic)

    def expect_inputs(self) -> None:
        """Every partition of the inference topics must report before windows close."""
        from confluent_kafka import KafkaException
        try:
            md = self.sidecar.consumer.list_topics(timeout=5.0)
        except KafkaException:
            return
        self.merger.expected = frozenset(
            f"{t}:{p}" for t in self.inputs if t in md.topics
            for p in md.topics[t].partitions)

    # -- the instance side ----------------------------------------------------------

    def split(self, messages: list, values: list[bytes]) -> tuple[list, list[bytes], list]:
        """A consumed batch: (input messages, their values, partials messages)."""
        if not any(m.topic() == self.topic for m in messages):
            return messages, values, []
        keep = [i for i, m in enumerate(messages) if m.topic() != self.topic]
        return ([messages[i] for i in keep], [values[i] for i in keep],
                [m for m in messages if m.topic() == self.topic])

    def applied(self, result: BatchResult) -> None:
        """After a batch of input was applied: models that had events are not idle."""
        self.publisher.note(result.events, result.alarms)

    def tick(self) -> None:
        """Every turn of the loop: a model that turned idle (or busy) publishes its marks
        at once, even without new input, so it stops holding windows open."""
        for model in self.sidecar.monitor.models:
            idle = self.publisher.idle(model)
            if self._idle_sent.get(model, False) != idle:
                self.sidecar.request_checkpoint()
                return

    def records(self) -> list[tuple[str, bytes | None, bytes, list]]:
        """Checkpoint hook (inside the transaction, before the state snapshots): this
        instance's partial records, then the merger's state of the models it merges."""
        from stream_monitor.kafka.changelog import encode_offsets
        self._promote()
        self._candidate = {}
        self._candidate_next = dict(self.next_offset)
        self._candidate_txn = self.sidecar._txn_name()
        out = []
        for rec in self.publisher.records(self.sidecar.monitor, self.sources()):
            self._idle_sent[rec.model] = bool(rec.marks and rec.marks[0][2])
            out.append((self.topic, rec.model.encode(), rec.encode(), []))
        owned = self.owned()
        for model, part in self.home.items():
            if part not in owned:
                continue
            value = self._merger_state(model)
            offset = self.next_offset.get(part, 0)
            self._candidate[model] = (part, value)
            out.append((self.state_topic, model.encode(), value,
                        [("sm.offsets", encode_offsets({(self.topic, part): offset})),
                         ("sm.time", repr(time.time()).encode())]))  # `state inspect` age
        return out

    def _promote(self) -> None:
        """The merger state written in the last checkpoint becomes the one to go back
        to, if that checkpoint's transaction committed (the sidecar's base is it)."""
        if self._candidate_txn and self.sidecar._base_txn == self._candidate_txn:
            self._committed.update(self._candidate)
            self._committed_next.update(self._candidate_next)
        self._candidate, self._candidate_next, self._candidate_txn = {}, {}, ""

    def _merger_state(self, model: str) -> bytes:
        body = {"model": model, "merger": self.merger.model_state(model),
                "judge": self.judge.snapshot(model)}
        return _MERGER_MAGIC + msgspec.msgpack.encode(pack(body))

    # -- the merging side -------------------------------------------------------------

    def apply(self, messages: list) -> BatchResult:
        """Records of `topics.partials` (consumed in this batch) into the merger; the
        windows that closed, judged once: reports, alerts, retraining records."""
        from stream_monitor.pipeline import BatchResult
        result = BatchResult()
        late_before = dict(self.merger.late_events)
        for m in messages:
            self.next_offset[m.partition()] = m.offset() + 1
            try:
                rec = PartialRecord.decode(m.value() or b"")
                self.merger.add(rec)
            except StateError as exc:
                self.bad_records += 1
                log.error("scale-out: %s[%d]@%d skipped: %s", m.topic(), m.partition(),
                          m.offset(), exc)
                continue
            self.home[rec.model] = m.partition()
            if rec.alarms:  # instances' detector alarms, judged with the merged windows
                result.extend(self.judge.judge_alarms(
                    rec.model, [(rec.model, found, window) for found, window in rec.alarms]))
        metrics = getattr(self.sidecar, "metrics", None)
        for model, n in self.merger.late_events.items():
            if metrics is not None and n > late_before.get(model, 0):
                metrics.late_partials.labels(model=metrics._model(model)).inc(
                    n - late_before.get(model, 0))
        late = sum(self.merger.late_events.values())
        if late > self._late_logged:  # one line per change, not per record
            log.warning("scale-out: %d event(s) in all arrived for windows already closed "
                        "and were dropped (%s); an idle partition woke up behind the "
                        "others? raise scale_out.idle_timeout", late,
                        dict(self.merger.late_events))
            self._late_logged = late
        for model, windows in self.merger.ready().items():
            result.extend(self.judge.close_windows(model, windows))
        return result

    def rewind(self) -> None:
        """After an abort or a (re)assignment: the merger back to its committed state.
        A new set of partials partitions is restored from the merger's state topic."""
        self._promote()   # committed before this abort or assignment, or discarded
        self.publisher.forget()
        if self.sources() != self._sources:  # new input partitions: a grace period
            self._sources = self.sources()
            self.publisher.assigned()
        owned = self.owned()
        if owned != self._owned:
            self._owned = owned
            self._committed, self._committed_next = (self._read_states(owned) if owned
                                                     else ({}, {}))
            self.expect_inputs()
        self._rebuild()
        self.sidecar.request_checkpoint()   # publish marks for the new assignment soon

    def _rebuild(self) -> None:
        from stream_monitor.pipeline import Monitor
        self.judge = Monitor(*self._judge_args)
        expected = self.merger.expected
        self.merger = PartialMerger.for_monitor(self.judge)
        self.merger.expected = expected
        self.home = {}
        self.next_offset = dict(self._committed_next)
        for model, (part, data) in self._committed.items():
            body = unpack(msgspec.msgpack.decode(data[len(_MERGER_MAGIC):]))
            self.merger.load_model_state(model, body["merger"])
            self.judge.restore(model, body["judge"])
            self.home[model] = part

    def _read_states(self, owned: frozenset[int]
                     ) -> tuple[dict[str, tuple[int, bytes]], dict[int, int]]:
        """Per model of an owned partials partition: the newest state record whose offset
        is the group's committed offset of that partition (the checkpoint that committed
        it); none when the group has not committed that partition yet."""
        from confluent_kafka import TopicPartition

        from stream_monitor.kafka.changelog import read_changelog
        sidecar = self.sidecar
        timeout = sidecar.config.checkpoint.restore_timeout
        tps = [TopicPartition(self.topic, p) for p in sorted(owned)]
        committed = {tp.partition: tp.offset
                     for tp in sidecar.consumer.committed(tps, timeout=timeout)
                     if tp.offset >= 0}
        chosen: dict[str, tuple[int, bytes]] = {}
        for rec in read_changelog(sidecar.config.kafka, self.state_topic, timeout,
                                  sidecar.kafka_log):
            for (topic, part), offset in rec.offsets.items():
                if topic == self.topic and part in owned and committed.get(part) == offset:
                    chosen[rec.model] = (part, rec.value)   # the last such record wins
        if chosen:
            log.info("scale-out: merger state of %d model(s) restored (partials "
                     "partitions %s)", len(chosen), sorted(owned))
        return chosen, committed


# -- `state inspect`: what the merger state topic holds ----------------------------------

def _iso(ts: float | None) -> str:
    import datetime as dt
    if ts is None or ts != ts or ts in (float("inf"), float("-inf")):
        return "-"
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).isoformat(timespec="seconds")


def merger_summaries(cfg, committed: dict[int, int], records: list, now: float) -> list[str]:
    """One line per model about the merger's state (`<topics.partials>-merger`): the
    record at the group's committed offset of the model's partials partition (or the
    newest, flagged), its pending windows, partitions' marks, merged-to watermark, late
    partials and the merged windows' alerts."""
    from stream_monitor.kafka.state import decode
    topic = partials_topic(cfg)
    chosen: dict[str, tuple] = {}
    for rec in records:                 # in order: the last match per model wins
        for (t, part), offset in rec.offsets.items():
            if t != topic:
                continue
            at = committed.get(part) == offset
            if at or not chosen.get(rec.model, (None, False))[1]:
                chosen[rec.model] = (rec, at, part, offset)
    lines = []
    for model in sorted(chosen):
        rec, at, part, offset = chosen[model]
        age = f"{max(0.0, now - rec.time):.1f}s" if rec.time else "?"
        head = (f"{model} (merger): state {rec.txn or '?'} age {age} size {len(rec.value):,} B"
                f", {topic}[{part}]@{offset}"
                + ("" if at else " (not at the committed offsets)"))
        try:
            if bytes(rec.value[:4]) != _MERGER_MAGIC:
                raise StateError("not a merger state record (bad magic bytes)")
            body = unpack(msgspec.msgpack.decode(bytes(rec.value[4:])))
            m, judge = body["merger"], decode(body["judge"])
        except Exception as exc:  # noqa: BLE001 - a line about it, not a traceback
            lines.append(f"{head}; unreadable: {exc}")
            continue
        pending = m["pending"]
        events = sum(int(getattr(acc, "events", 0)) for *_, acc in pending)
        marks = m["marks"]
        idle = sum(1 for _, is_idle in marks.values() if is_idle)
        wms = [float(wm) for wm, _ in marks.values()]
        states = judge["policy"]["states"]
        firing = [s for s in states.values() if getattr(s, "severity", 0) > 0]
        crit = sum(1 for s in firing if s.severity >= 2)
        lines.append(
            f"{head}; windows pending {len(pending)} with {events:,} events, merged up to "
            f"{_iso(m['closed_to'])}; partitions reporting {len(marks)} ({idle} idle), "
            f"watermarks {_iso(min(wms, default=None))} .. {_iso(max(wms, default=None))}; "
            f"late partial events {int(m['late_events']):,} in {int(m['late_records']):,} "
            f"record(s); alerts firing {len(firing)} ({crit} critical, "
            f"{len(firing) - crit} warning) of {len(states)} tracked")
    return lines
