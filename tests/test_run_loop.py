"""`run`'s per-batch bookkeeping (kafka/runtime.py): the vectorised pass over a consumed
batch gives exactly what the per-message pass gives, on batches unlike the benchmark's
(several partitions and topics interleaved, offset gaps, re-reads, errors, null values)."""

from __future__ import annotations

import gc
import random
import threading

import pytest
from confluent_kafka import KafkaError, Message
from helpers import wait_until

from stream_monitor.config import parse_config
from stream_monitor.io.metrics import MonitorMetrics
from stream_monitor.kafka.runtime import KafkaLogBridge, KafkaSidecar


def _bookkeeper(one_topic: bool) -> KafkaSidecar:
    """A sidecar holding only what `_fresh` reads and writes (no clients, no engine)."""
    s = object.__new__(KafkaSidecar)
    s._applied_upto, s._batch_firsts, s._rereading = {}, {}, set()
    s._one_topic = one_topic
    s.kafka_log = KafkaLogBridge()
    s.metrics = MonitorMetrics(parse_config({"models": {"m": {"reference": "r.json"}}}).metrics)
    return s


def _state(s: KafkaSidecar) -> tuple:
    return (dict(s._applied_upto), {k: dict(v) for k, v in s._batch_firsts.items()},
            set(s._rereading), s.metrics.reread_skipped._value.get())


class _Log:
    """What a topic holds: (topic, partition) -> list of (offset, value), offsets with gaps
    (transaction markers take offsets too), as a consumer would read it."""

    def __init__(self, rng: random.Random, tps: list[tuple[str, int]]):
        self.rng, self.data = rng, {}
        for tp in tps:
            offset, rows = rng.randrange(0, 50), []
            for i in range(3000):
                offset += 1 if rng.random() < 0.9 else rng.randrange(2, 4)
                value = None if rng.random() < 0.01 else f'{{"i": {i}, "tp": "{tp}"}}'.encode()
                rows.append((offset, value))
            self.data[tp] = rows

    def run(self, tp: tuple[str, int], start: int, n: int) -> list[Message]:
        return [Message(topic=tp[0], partition=tp[1], offset=o, value=v, timestamp=(1, 1000 + o))
                for o, v in self.data[tp][start:start + n]]


def _batches(rng: random.Random, tps: list[tuple[str, int]]):
    """Batches as consume() returns them: runs of one partition, interleaved; sometimes a
    partition goes back to an earlier position (a re-read after a failed commit), an EOF
    event or an error is mixed in."""
    log, pos = _Log(rng, tps), dict.fromkeys(tps, 0)
    starts: dict[tuple[str, int], list[int]] = {tp: [0] for tp in tps}
    for _ in range(60):
        batch: list[Message] = []
        for _ in range(rng.randrange(1, 5)):
            tp = rng.choice(tps)
            if rng.random() < 0.04 and pos[tp] > 20:  # back to where a batch began earlier,
                # or (rarely) anywhere: the topic was recreated
                pos[tp] = (rng.choice(starts[tp]) if rng.random() < 0.8
                           else rng.randrange(0, pos[tp]))
            if not batch or batch[-1].partition() != tp[1] or batch[-1].topic() != tp[0]:
                starts[tp].append(pos[tp])
            n = rng.randrange(1, 40)
            batch += log.run(tp, pos[tp], n)
            pos[tp] = min(pos[tp] + n, len(log.data[tp]))
        if rng.random() < 0.1:
            code = rng.choice([KafkaError._PARTITION_EOF, KafkaError._MSG_TIMED_OUT])
            tp = rng.choice(tps)
            batch.insert(rng.randrange(0, len(batch) + 1),
                         Message(topic=tp[0], partition=tp[1], offset=-1,
                                 error=KafkaError(code)))
        yield batch


def test_vectorised_fresh_equals_the_per_message_pass():
    """Same messages, values, offsets, counts per topic and re-read state, batch after
    batch, over five seeds and three shapes of subscription; the vectorised pass serves
    most batches (it is not a fallback that never runs)."""
    for seed in range(5):
        for tps, one_topic in (([("in", 0)], True), ([("in", 0), ("in", 1), ("in", 2)], True),
                               ([("in", 0), ("in", 1), ("labels", 0)], False)):
            rng = random.Random(seed)
            fast, each = _bookkeeper(one_topic), _bookkeeper(one_topic)
            served = 0
            for batch in _batches(rng, tps):
                got_fast = fast._fresh_runs(batch)
                served += got_fast is not None
                got = got_fast if got_fast is not None else fast._fresh_each(batch)
                want = each._fresh_each(batch)
                assert got[0] == want[0]  # the same Message objects, in order
                assert got[1:] == want[1:], (seed, tps)
                assert _state(fast) == _state(each), (seed, tps)
            assert served >= 20, (seed, tps, served)


def test_vectorised_fresh_leaves_re_reads_and_errors_to_the_per_message_pass():
    s = _bookkeeper(True)
    log = _Log(random.Random(1), [("in", 0)])
    for start in (0, 50):
        batch = log.run(("in", 0), start, 50)
        assert s._fresh_runs(batch)[2] == {("in", 0): batch[-1].offset() + 1}
    again = log.run(("in", 0), 50, 100)  # from the second batch's start: a re-read
    assert s._fresh_runs(again) is None
    messages, values, offsets, topics = s._fresh(again)
    assert [m.offset() for m in messages] == [m.offset() for m in again[50:]]
    assert s.metrics.reread_skipped._value.get() == 50
    eof = Message(topic="in", partition=0, offset=-1, error=KafkaError(KafkaError._PARTITION_EOF))
    assert s._fresh_runs([*log.run(("in", 0), 150, 10), eof]) is None


def test_consumer_refetches_soon_after_its_queue_was_full():
    """librdkafka waits fetch.queue.backoff.ms (1 s by default) before fetching again once
    its queue is full, longer than `run` takes to drain it while catching up: the default
    is short, the user's setting wins, and the producer is not given it."""
    from stream_monitor.kafka.runtime import consumer_config, producer_config
    assert consumer_config({})["fetch.queue.backoff.ms"] <= 100
    assert consumer_config({"fetch.queue.backoff.ms": 500})["fetch.queue.backoff.ms"] == 500
    assert "fetch.queue.backoff.ms" not in producer_config({"fetch.queue.backoff.ms": 500})


# -- the fetch thread, end to end through the embedded broker -------------------------------

@pytest.mark.integration
def test_fetch_thread_gives_the_windows_of_replay_and_commits_everything(
        kafka_broker, churn_reference_file, tmp_path):
    """With the next batch consumed ahead on the fetch thread, `run` closes exactly the
    windows `replay` closes on the same events (batches of 700 against windows of 1,000,
    a few malformed messages), in both guarantees, as without the thread; every offset
    is committed once the outputs are delivered; the thread really ran ahead."""
    from test_exactly_once import _comparable, _replay
    from test_runtime import _config, _names, _produce

    from stream_monitor.io import synthetic
    msgs = [m for chunk in synthetic.generate(7_000, seed=41) for m in chunk]
    for i in (5, 2_345, 6_001):
        msgs[i] = b'{"model": "churn", "features": '  # cut short: a dead letter
    expected = _replay(_config("unused:9092", _names("x"), churn_reference_file, window=1000),
                       msgs, tmp_path)["windows"]
    assert len(expected) == 6
    names = _names("fetch")
    kafka_broker.create_topics({names[k]: 1 for k in ("inferences", "alerts", "dead_letter")})
    _produce(kafka_broker.bootstrap_servers, names["inferences"], msgs)
    for guarantee, prefetch in (("exactly_once", True), ("at_least_once", True),
                                ("exactly_once", False)):
        cfg = _config(kafka_broker.bootstrap_servers, names, churn_reference_file, window=1000)
        cfg["kafka"]["group.id"] = f"{names['group']}-{guarantee}-{prefetch}"
        cfg["consumer"] = {"batch_size": 700, "prefetch": "thread"}  # (not the default)
        cfg["processing"] = {"guarantee": guarantee}
        sidecar = KafkaSidecar(parse_config(cfg))
        sidecar.prefetch = prefetch
        windows, ahead, frozen = [], [], []

        def on_batch(result, sidecar=sidecar, windows=windows, ahead=ahead, frozen=frozen):
            windows.extend(_comparable(dict(r)) for r in result.reports)
            f = sidecar._fetcher
            ahead.append(f is not None and (f.inflight or f.slot is not None))
            frozen.append(gc.get_freeze_count())

        sidecar.on_batch = on_batch
        thread = threading.Thread(target=sidecar.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda s=sidecar: sum(s.applied.values()) == 7_000 - 3, 90, "applied")
            wait_until(lambda g=cfg["kafka"]["group.id"]: _committed_offset(
                kafka_broker.bootstrap_servers, g, names["inferences"]) == 7_000, 60,
                "every offset committed")
        finally:
            sidecar.stop()
            thread.join(60)
        assert not thread.is_alive() and sidecar.undelivered_at_exit == 0
        assert windows == expected, (guarantee, prefetch)
        assert sidecar.metrics.dead_letters._value.get() == 3
        assert any(ahead) == prefetch, (guarantee, prefetch)
        # the heap built before the loop is out of the cyclic GC's reach while it runs
        # (no full collections walking it per batch), and given back after
        assert min(frozen) > 10_000 and gc.get_freeze_count() == 0


def _committed_offset(bootstrap: str, group: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return c.committed([TopicPartition(topic, 0)], 10)[0].offset
    finally:
        c.close()


def test_rollback_after_windows_closed_equals_never_applying_the_batch(churn_reference_file):
    """`Monitor.checkpoint` shares what is replaced, never changed in place (the detectors'
    layout, the policy's last feature reports): a batch that closed windows, fired
    detectors and alerts, rolled back, leaves the monitor exactly as before it (same
    snapshot bytes), and re-applying it gives the same windows and alerts."""
    from stream_monitor.io import synthetic
    from stream_monitor.pipeline import Monitor

    cfg = parse_config({"defaults": {"window": {"events": 1000}, "block": 250},
                        "models": {"churn": {"reference": str(churn_reference_file)}}})
    # drifted events from the second batch on: windows close with findings and alerts
    drift = synthetic.default_drift(1500)
    events = [m for chunk in synthetic.generate(6000, seed=5, drift=drift) for m in chunk]
    mon = Monitor(cfg)
    mon.process(events[:2500], range(2500))
    before = mon.snapshot("churn")
    ck = mon.checkpoint()
    lost = mon.process(events[2500:4700], range(2500, 4700))
    assert lost.reports and lost.alerts  # the batch changed the policy's last features
    assert mon.snapshot("churn") != before
    mon.rollback(ck)
    assert mon.snapshot("churn") == before
    again = mon.process(events[2500:4700], range(2500, 4700))
    assert ([r["window"]["index"] for r in again.reports]
            == [r["window"]["index"] for r in lost.reports])
    assert ([(a["fingerprint"], a["status"]) for a in again.alerts]
            == [(a["fingerprint"], a["status"]) for a in lost.alerts])
    assert ([sorted(r["features"]) for r in again.reports]
            == [sorted(r["features"]) for r in lost.reports])
