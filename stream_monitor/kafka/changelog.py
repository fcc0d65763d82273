"""Changelog: the compacted topic that holds each model's last committed state snapshot.

Owns the topic's record format and its I/O, nothing else (what a snapshot holds is
`state.py`; when a checkpoint is taken is `runtime.py`). One record per model and
checkpoint: key = model name, value = the `state.snapshot` bytes, headers:

- `sm.offsets`: JSON `{"topic:partition": next offset}`, the consumer offsets the state
  reflects (committed in the same transaction as the record);
- `sm.txn`: the transaction that wrote it (`<run>:<sequence>`, `run` unique per process
  start), `sm.base`: the committed checkpoint its state descends from (`sm.txn` of the
  previous committed checkpoint, or the one restored at start);
- `sm.time`: Unix time of the checkpoint;
- `sm.parts`, `sm.part`, `sm.model`: a snapshot larger than `PART_BYTES` (a baseline in
  progress holds its rows) is cut into parts, since brokers refuse messages over about
  1 MB by default: part 0 has key = model, part i key = `model` + U+001F + `i`; a
  restore joins the parts of one transaction.

Restoring picks, per model, the newest record whose `sm.offsets` equal the group's
committed offsets. On Apache Kafka a `read_committed` reader never sees records of
aborted transactions, so that is the newest record; on a broker that delivers them
anyway (the embedded Tansu broker does) the offsets tell a committed checkpoint from an
aborted one, which may be newer. The changelog may not be compacted yet: every record
is read and the last match per key kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

log = logging.getLogger("stream_monitor")

Offsets = dict[tuple[str, int], int]

PART_BYTES = 512 * 1024   # well under the 1 MB message limit brokers have by default


def parts(model: str, data: bytes) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """A snapshot as (key, value, part headers) records."""
    pieces = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
    n = len(pieces)
    return [((model if i == 0 else f"{model}\x1f{i}").encode(), piece,
             [("sm.model", model.encode()), ("sm.part", str(i).encode()),
              ("sm.parts", str(n).encode())]) for i, piece in enumerate(pieces)]


@dataclass
class ChangelogRecord:
    model: str
    value: bytes
    offsets: Offsets
    txn: str = ""
    base: str = ""
    time: float = 0.0
    position: tuple[int, int] = (0, 0)       # changelog (partition, offset)
    part: int = 0
    parts: int = 1


@dataclass
class Restored:
    """What a restore chose: the snapshot per model, and where it came from."""

    states: dict[str, bytes] = field(default_factory=dict)
    records: dict[str, ChangelogRecord] = field(default_factory=dict)
    mismatched: list[str] = field(default_factory=list)   # models restored from a guess
    read: int = 0                                         # changelog records read


def encode_offsets(offsets: Offsets) -> bytes:
    return orjson.dumps({f"{t}:{p}": o for (t, p), o in sorted(offsets.items())})


def decode_offsets(raw: bytes | None) -> Offsets:
    if not raw:
        return {}
    out: Offsets = {}
    for key, offset in orjson.loads(raw).items():
        topic, _, part = key.rpartition(":")
        out[(topic, int(part))] = int(offset)
    return out


def headers(offsets: Offsets, txn: str, base: str, at: float) -> list[tuple[str, bytes]]:
    return [("sm.offsets", encode_offsets(offsets)), ("sm.txn", txn.encode()),
            ("sm.base", base.encode()), ("sm.time", repr(at).encode())]


def _record(msg) -> ChangelogRecord | None:
    key, value = msg.key(), msg.value()
    if not key or not value:
        return None  # a tombstone (a model removed): nothing to restore
    h = {k: v for k, v in (msg.headers() or [])}
    try:
        offsets = decode_offsets(h.get("sm.offsets"))
        at = float(h.get("sm.time", b"0") or 0)
        part, n = int(h.get("sm.part", b"0")), int(h.get("sm.parts", b"1"))
    except (ValueError, orjson.JSONDecodeError):
        offsets, at, part, n = {}, 0.0, 0, 1
    model = (h.get("sm.model") or key).decode("utf-8", "replace")
    return ChangelogRecord(model, value, offsets,
                           (h.get("sm.txn") or b"").decode(), (h.get("sm.base") or b"").decode(),
                           at, (msg.partition(), msg.offset()), part, n)


def reader_config(kafka: dict[str, Any]) -> dict[str, Any]:
    """A plain consumer for reading the changelog: the cluster settings of `kafka:`
    (security...), no group membership (it only `assign`s), read_committed."""
    from stream_monitor.kafka.runtime import _CONSUMER_ONLY, _PRODUCER_ONLY
    cfg = {k: v for k, v in kafka.items() if k not in _CONSUMER_ONLY and k not in _PRODUCER_ONLY}
    cfg.update({"group.id": f"{kafka.get('group.id', 'stream-monitor')}-changelog-reader",
                "enable.auto.commit": False, "enable.partition.eof": True,
                "isolation.level": "read_committed", "auto.offset.reset": "earliest",
                # the end of the topic is reported by the first empty fetch: do not let
                # the broker hold it for the default 500 ms
                "fetch.wait.max.ms": 20})
    return cfg


def read_changelog(kafka: dict[str, Any], topic: str, timeout: float = 60.0,
                   logger: Any = None) -> list[ChangelogRecord]:
    """Every record of the changelog, in order per partition, read to its end (the last
    stable offset: records of transactions still open are not waited for). An absent
    topic is an empty changelog; a broker that does not answer within `timeout` raises
    `TimeoutError`."""
    cfg = reader_config(kafka)
    if logger is not None:
        cfg["logger"] = logger
    c = Consumer(cfg)
    try:
        deadline = time.monotonic() + timeout
        try:
            # all topics: asking for this one by name may auto-create it
            md = c.list_topics(timeout=max(1.0, min(10.0, timeout)))
        except KafkaException as exc:
            raise TimeoutError(f"cannot read the changelog {topic}: "
                               f"{exc.args[0].str()}") from None
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return []
        parts = sorted(meta.partitions)
        c.assign([TopicPartition(topic, p, -2) for p in parts])  # -2: from the beginning
        waiting, out = set(parts), []
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading the changelog {topic} did not reach its end "
                                   f"within {timeout:.0f} s (partitions {sorted(waiting)})")
            for m in c.consume(1000, 0.05):  # returns at the timeout unless the batch fills
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        waiting.discard(m.partition())
                    elif err.fatal():
                        raise TimeoutError(f"reading the changelog {topic}: {err.str()}")
                    continue
                rec = _record(m)
                if rec is not None:
                    out.append(rec)
        return out
    finally:
        c.close()


def choose(records: list[ChangelogRecord], committed: Offsets) -> Restored:
    """Per model, the newest record whose offsets equal the committed offsets (on the
    partitions both name); with no such record the newest one, flagged as mismatched,
    unless the group has committed nothing yet (a fresh start: no state at all)."""
    by_model: dict[str, list[ChangelogRecord]] = {}
    pieces: dict[tuple[str, str, int], bytes] = {}
    for rec in records:
        if rec.part == 0:
            by_model.setdefault(rec.model, []).append(rec)
        else:
            pieces[(rec.model, rec.txn, rec.part)] = rec.value
    out = Restored(read=len(records))

    def whole(rec: ChangelogRecord) -> ChangelogRecord | None:
        """A record with the value of all its parts, None when a part is missing."""
        if rec.parts <= 1:
            return rec
        rest = [pieces.get((rec.model, rec.txn, i)) for i in range(1, rec.parts)]
        if any(p is None for p in rest):
            return None
        import dataclasses
        return dataclasses.replace(rec, value=rec.value + b"".join(rest))

    for model, recs in by_model.items():
        recs = [r for r in map(whole, recs) if r is not None]
        if not recs:
            continue
        chosen = None
        for rec in reversed(recs):
            common = rec.offsets.keys() & committed.keys()
            if common and all(rec.offsets[k] == committed[k] for k in common):
                chosen = rec
                break
            if not rec.offsets and not committed:
                chosen = rec
                break
        if chosen is None:
            if not committed:
                continue  # a group without committed offsets starts afresh
            chosen = recs[-1]
            out.mismatched.append(model)
        out.states[model], out.records[model] = chosen.value, chosen
    return out


def ensure_topic(kafka: dict[str, Any], topic: str, partitions: int = 1,
                 logger: Any = None, timeout: float = 10.0) -> str:
    """Create the changelog (compacted) when it does not exist; returns what was done.
    A failure (no permission, broker down) is returned as text, not raised: producing
    to a topic that exists after all, or is auto-created, still works."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from stream_monitor.kafka.runtime import _CONSUMER_ONLY, _PRODUCER_ONLY
    cfg = {k: v for k, v in kafka.items() if k not in _CONSUMER_ONLY and k not in _PRODUCER_ONLY}
    if logger is not None:
        cfg["logger"] = logger
    admin = AdminClient(cfg)
    try:
        # all topics: asking for this one by name makes some brokers auto-create it
        # (uncompacted)
        md = admin.list_topics(timeout=timeout)
        meta = md.topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return "exists"
        futures = admin.create_topics([NewTopic(topic, partitions, replication_factor=-1,
                                                config={"cleanup.policy": "compact"})])
        futures[topic].result(timeout)
        return "created"
    except KafkaException as exc:
        err = exc.args[0]
        if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return "exists"
        return f"not created ({err.str() if isinstance(err, KafkaError) else err})"
    except Exception as exc:  # noqa: BLE001 - a timeout of the future, reported as text
        return f"not created ({type(exc).__name__}: {exc})"
