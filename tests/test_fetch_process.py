"""The Kafka consumer in a child process (kafka/fetch_process.py), against the embedded
broker: what a frame carries, rebalance handlers run in the parent while the child waits,
consumer errors logged once by the parent, offsets committed only after delivery, and
the child dying with a SIGKILLed parent."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from helpers import wait_until
from test_runtime import _config, _names

from stream_monitor.config import parse_config
from stream_monitor.io import synthetic
from stream_monitor.kafka.fetch_process import FetchProcess, Frame
from stream_monitor.kafka.runtime import KafkaSidecar

pytestmark = pytest.mark.integration


class _Lines:
    """A `logger` for librdkafka lines: kept, not shown."""

    def __init__(self):
        self.lines: list[tuple] = []

    def log(self, level, fmt, *args):
        self.lines.append((level, fmt % args if args else fmt))


def _consumer_cfg(bootstrap: str, group: str) -> dict:
    return {"bootstrap.servers": bootstrap, "group.id": group, "session.timeout.ms": 6000,
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
            "log.connection.close": False}


def _committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return [tp.offset for tp in c.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10)]
    finally:
        c.close()


def _gone(pid: int) -> bool:
    """No such process any more (or only its zombie, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_frames_carry_what_messages_carry(kafka_broker):
    """Several topics and partitions, keys or none, null values, values holding newlines:
    every accessor the loop uses gives what an in-process consumer's Message gives, and
    the vectorised runs of the frame equal those of the message list."""
    from stream_monitor.kafka.runtime import digest_batch
    tag = uuid.uuid4().hex[:8]
    topics = {f"fr-a-{tag}": 2, f"fr-b-{tag}": 1}
    kafka_broker.create_topics(topics)
    p = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers, "linger.ms": 5})
    for i in range(600):
        topic = list(topics)[i % 2]
        value = (None if i % 97 == 5 else
                 b'{"i": %d,\n "x": 1}' % i if (i // 200 == 1 and i % 7 == 0) else
                 b'{"i": %d}' % i)
        p.produce(topic, value, key=None if i % 3 else str(i).encode(),
                  partition=(i // 2) % topics[topic], timestamp=1_000_000 + i)
    assert p.flush(30) == 0
    subscribe = list(topics)

    def read(consume, close) -> list:
        out, deadline = [], time.monotonic() + 60
        while len(out) < 600 and time.monotonic() < deadline:
            out += [m for m in consume(250, 0.5) if m.error() is None]
        close()
        return out

    plain = Consumer(_consumer_cfg(kafka_broker.bootstrap_servers, f"fr-plain-{tag}"))
    plain.subscribe(subscribe)
    want = read(plain.consume, plain.close)
    fp = FetchProcess(_consumer_cfg(kafka_broker.bootstrap_servers, f"fr-child-{tag}"),
                      _Lines(), lambda err: None, lambda err, parts: None)
    fp.subscribe(subscribe)
    frames: list[Frame] = []

    def consume(n, timeout):
        got = fp.consume(n, timeout)
        if got:
            frames.append(got)
        return got

    got = read(consume, fp.close)

    def facts(m):
        return (m.topic(), m.partition(), m.offset(), m.value(), m.key(), m.timestamp())

    assert len(want) == 600
    assert sorted(map(facts, got)) == sorted(map(facts, want))
    for fr in frames:
        runs = digest_batch(fr, False)
        as_list = digest_batch([_AsMessage(m) for m in fr], False)
        assert runs is not None and as_list is not None
        assert runs.runs == as_list.runs and runs.values == as_list.values
        assert fr.topic_mask(subscribe[1]) == [m.topic() == subscribe[1] for m in fr]


class _AsMessage:
    """A FrameMessage seen through confluent-kafka's `Message` accessors, for the
    reference pass of `digest_batch` (which maps `Message` methods)."""

    def __new__(cls, m):
        from confluent_kafka import Message
        return Message(topic=m.topic(), partition=m.partition(), offset=m.offset(),
                       value=m.value(), key=m.key(), timestamp=m.timestamp())


def test_rebalance_handlers_run_in_the_parent_while_the_child_waits(kafka_broker):
    """on_assign runs in the parent process, inside the child's consume(): the consumer
    calls it makes (committed, assign to a chosen offset) are served by the child there,
    so the first message consumed is the one the handler chose. on_revoke (at close)
    commits synchronously from the parent, before the child leaves the group."""
    tag = uuid.uuid4().hex[:8]
    topic, group = f"rb-{tag}", f"rb-group-{tag}"
    kafka_broker.create_topics({topic: 1})
    p = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
    for i in range(50):
        p.produce(topic, b'{"i": %d}' % i)
    assert p.flush(30) == 0
    fp = FetchProcess(_consumer_cfg(kafka_broker.bootstrap_servers, group), _Lines(),
                      lambda err: None, lambda err, parts: None)
    seen: list[tuple] = []

    def on_assign(consumer, partitions):
        committed = consumer.committed(partitions, timeout=10)
        consumer.assign([TopicPartition(tp.topic, tp.partition, 17) for tp in partitions])
        time.sleep(0.5)  # the child waits meanwhile: nothing is consumed before 17
        seen.append(("assign", os.getpid(), threading.get_ident(),
                     [(tp.topic, tp.partition, tp.offset) for tp in committed]))

    def on_revoke(consumer, partitions):
        consumer.commit(offsets=[TopicPartition(tp.topic, tp.partition, 42)
                                 for tp in partitions], asynchronous=False)
        seen.append(("revoke", os.getpid(), threading.get_ident(),
                     [(tp.topic, tp.partition) for tp in partitions]))

    fp.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
    first = None
    deadline = time.monotonic() + 60
    while first is None and time.monotonic() < deadline:
        batch = fp.consume(10, 0.5)
        first = batch[0].offset() if batch else None
    assert first == 17
    fp.close()
    me = (os.getpid(), threading.get_ident())
    assert fp.pid != os.getpid() and fp.process.returncode == 0
    assert seen[0] == ("assign", *me, [(topic, 0, -1001)])
    assert seen[-1] == ("revoke", *me, [(topic, 0)])
    assert _committed(kafka_broker.bootstrap_servers, group, topic) == [42]


def test_a_consumer_error_reaches_the_parent_log_once(churn_reference_file, caplog, capfd):
    """The broker is unreachable: librdkafka's errors and log lines, raised inside the
    child's consume(), reach the parent's log bridge as one warning (not one per
    attempt), and the child writes nothing of its own to stderr."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    names = _names("err")
    cfg = _config(f"127.0.0.1:{port}", names, churn_reference_file)
    cfg["consumer"] = {"prefetch": "process", "poll_timeout": 0.2}
    cfg["processing"] = {"guarantee": "at_least_once"}
    errors: list = []
    caplog.set_level(logging.DEBUG, logger="stream_monitor.kafka")
    sidecar = KafkaSidecar(parse_config(cfg), join_early=True)
    assert isinstance(sidecar.consumer, FetchProcess)
    real = sidecar.consumer.error_cb
    sidecar.consumer.error_cb = lambda err: (errors.append(err), real(err))
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            sidecar.poll_once()
    finally:
        sidecar.stop()
        sidecar.close()
    assert errors, "no error forwarded from the child"
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "stream_monitor.kafka" and r.levelno >= logging.WARNING]
    assert len([w for w in warnings if "broker unreachable" in w]) == 1, warnings
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # connection lines
    err = capfd.readouterr().err
    assert "Connection refused" not in err and "%3|" not in err, err[-2000:]


def test_offsets_are_committed_only_after_delivery_through_the_fetch_process(
        kafka_broker, churn_reference_file):
    """Every batch holds a malformed message (a dead letter): each commit the loop makes
    through the child covers only messages whose dead letters were delivered before it;
    at the end everything is committed and delivered."""
    names = _names("fpc")
    bootstrap = kafka_broker.bootstrap_servers
    kafka_broker.create_topics({names[k]: 1 for k in ("inferences", "alerts", "dead_letter")})
    msgs = [m for chunk in synthetic.generate(6_000, seed=12) for m in chunk]
    bad = list(range(150, 6_000, 500))
    for i in bad:
        msgs[i] = b"not json"
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    for m in msgs:
        p.produce(names["inferences"], m)
    assert p.flush(30) == 0
    cfg = _config(bootstrap, names, churn_reference_file, window=1000)
    cfg["consumer"] = {"prefetch": "process", "batch_size": 500}
    cfg["processing"] = {"guarantee": "at_least_once"}
    sidecar = KafkaSidecar(parse_config(cfg))
    assert isinstance(sidecar.consumer, FetchProcess)
    commits: list[tuple[int, float]] = []   # (offset committed, dead letters delivered)
    real_commit = sidecar.consumer.commit

    def commit(*args, **kwargs):
        for tp in kwargs.get("offsets") or []:
            commits.append((tp.offset, sidecar.metrics.dead_letters._value.get()))
        return real_commit(*args, **kwargs)

    sidecar.consumer.commit = commit
    thread = threading.Thread(target=sidecar.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: _committed(bootstrap, names["group"], names["inferences"])
                   == [6_000], 90, "everything committed")
    finally:
        sidecar.stop()
        thread.join(60)
    assert not thread.is_alive() and sidecar.undelivered_at_exit == 0
    assert len(commits) >= 3
    for offset, delivered in commits:
        assert delivered >= sum(1 for i in bad if i < offset), (offset, delivered)
    assert sidecar.metrics.dead_letters._value.get() == len(bad)


def test_an_asynchronous_commit_is_sent_without_waiting_for_the_child(kafka_broker):
    """The loop's per-batch commit (asynchronous) costs no round trip: no reply is read
    from the child for it; its result comes back through `on_commit` (as an in-process
    consumer's would) and the offset is committed. A synchronous commit still waits."""
    tag = uuid.uuid4().hex[:8]
    topic, group = f"fpa-{tag}", f"fpa-g-{tag}"
    kafka_broker.create_topics({topic: 1})
    p = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers, "linger.ms": 5})
    for i in range(20):
        p.produce(topic, b'{"i": %d}' % i)
    assert p.flush(30) == 0
    results: list = []
    fp = FetchProcess(_consumer_cfg(kafka_broker.bootstrap_servers, group), _Lines(),
                      lambda err: None, lambda err, parts: results.append((err, parts)))
    try:
        fp.subscribe([topic])
        got, deadline = 0, time.monotonic() + 60
        while got < 20 and time.monotonic() < deadline:
            got += len(fp.consume(20, 0.5))
        assert got == 20
        reads, recv = [], fp.conn.recv
        fp.conn.recv = lambda: reads.append(1) or recv()
        fp.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=True)
        assert reads == []              # sent, not waited for
        fp.conn.recv = recv
        wait_until(lambda: fp.consume(1, 0.1) == [] and results, 30, "the commit's result")
        (err, parts), = results
        assert err is None and [(t.topic, t.offset) for t in parts] == [(topic, 10)]
        assert _committed(kafka_broker.bootstrap_servers, group, topic) == [10]
        fp.commit(offsets=[TopicPartition(topic, 0, 15)], asynchronous=False)
        assert _committed(kafka_broker.bootstrap_servers, group, topic) == [15]
    finally:
        fp.close()


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
        except FileNotFoundError:  # a thread that ended since the listing
            continue
    return out


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_the_child_dies_with_a_sigkilled_parent(kafka_broker, churn_reference_file,
                                                tmp_path, guarantee):
    """`run` is SIGKILLed while consuming: its fetch process does not outlive it."""
    names = _names("orphan")
    kafka_broker.create_topics({names[k]: 1 for k in ("inferences", "alerts", "dead_letter")})
    cfg = _config(kafka_broker.bootstrap_servers, names, churn_reference_file)
    cfg["processing"] = {"guarantee": guarantee}
    cfg["consumer"] = {"prefetch": "process"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "stream_monitor", "run", "--config",
                             str(path), "--log-level", "warning"])
    try:
        children: list[int] = []

        def child_started() -> bool:
            children[:] = [c for c in _children(proc.pid)
                           if b"fetch_process" in open(f"/proc/{c}/cmdline", "rb").read()]
            return bool(children)

        wait_until(child_started, 30, "the fetch process started")
        p = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
        for m in (m for chunk in synthetic.generate(3_000, seed=5) for m in chunk):
            p.produce(names["inferences"], m)
        p.flush(30)
        time.sleep(1.0)
        assert proc.poll() is None and not _gone(children[0])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    wait_until(lambda: _gone(children[0]), 10, "the fetch process gone with its parent")


@pytest.mark.parametrize("bad", ["fork", "", True, 2])
def test_a_bad_prefetch_value_fails_fast_with_its_key_path(bad, tmp_path, churn_reference_file):
    """`consumer.prefetch` takes process, thread or none; anything else is one line
    naming the key, and `check-config` exits 2 with it (no traceback)."""
    from stream_monitor.config import ConfigError
    with pytest.raises(ConfigError, match=r"consumer\.prefetch: .*'process', 'thread' or "
                                          r"'none'"):
        parse_config({"consumer": {"prefetch": bad}, "models": {"m": {"reference": "r.json"}}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"consumer": {"prefetch": bad},
                                    "models": {"churn": {"reference": str(churn_reference_file)}}}))
    done = subprocess.run([sys.executable, "-m", "stream_monitor", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "consumer.prefetch" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_fetch_process_is_the_default(churn_reference_file):
    """Without `consumer.prefetch`, `run` consumes in a child process, one batch ahead."""
    cfg = parse_config(_config("127.0.0.1:9", _names("default"), churn_reference_file))
    assert cfg.consumer.prefetch == "process"
    sidecar = KafkaSidecar(cfg)
    try:
        assert isinstance(sidecar.consumer, FetchProcess) and sidecar.fetch_process is not None
        assert sidecar.prefetch and sidecar.fetch_thread is None
    finally:
        sidecar.consumer.close()
    assert sidecar.consumer.process.poll() is not None


@pytest.mark.parametrize("mode", ["thread", "none"])
def test_the_in_process_modes_stay_selectable(mode, churn_reference_file):
    """`thread` and `none` keep the consumer in the process (no child is started)."""
    cfg = _config("127.0.0.1:9", _names("mode"), churn_reference_file)
    cfg["consumer"] = {"prefetch": mode}
    sidecar = KafkaSidecar(parse_config(cfg))
    try:
        assert sidecar.fetch_process is None and not isinstance(sidecar.consumer, FetchProcess)
        assert sidecar.prefetch == (mode == "thread")
    finally:
        sidecar.consumer.close()


# -- the end-to-end tests of the in-process paths, through the fetch process ---------------

@pytest.fixture
def through_the_fetch_process(monkeypatch):
    """Every sidecar built in-process gets `consumer.prefetch: process`; returns the
    fetch processes started."""
    started: list[FetchProcess] = []
    real = KafkaSidecar.__init__

    def init(self, config, *args, **kwargs):
        config = config.model_copy(update={"consumer": config.consumer.model_copy(
            update={"prefetch": "process"})})
        real(self, config, *args, **kwargs)
        assert isinstance(self.consumer, FetchProcess)
        started.append(self.consumer)

    monkeypatch.setattr(KafkaSidecar, "__init__", init)
    return started


def test_windows_of_replay_and_every_offset_committed_through_the_fetch_process(
        kafka_broker, churn_reference_file, tmp_path, through_the_fetch_process):
    """tests/test_run_loop.py's end-to-end check (windows equal replay's, dead letters,
    every offset committed, in both guarantees, with and without a batch ahead)."""
    from test_run_loop import test_fetch_thread_gives_the_windows_of_replay_and_commits_everything
    test_fetch_thread_gives_the_windows_of_replay_and_commits_everything(
        kafka_broker, churn_reference_file, tmp_path)
    assert len(through_the_fetch_process) == 3
    assert all(fp.process.poll() is not None for fp in through_the_fetch_process)


@pytest.mark.slow
def test_an_aborted_transaction_is_rewound_through_the_fetch_process(
        kafka_broker, churn_reference_file, tmp_path, through_the_fetch_process):
    """tests/test_exactly_once.py's abort: the rewind (seek) and the checkpoints' group
    metadata cross to the child; outputs equal replay's."""
    from test_exactly_once import test_an_aborted_transaction_is_rewound_and_redone_once
    test_an_aborted_transaction_is_rewound_and_redone_once(kafka_broker, churn_reference_file,
                                                           tmp_path)
    assert through_the_fetch_process


def test_the_labels_topic_through_the_fetch_process(kafka_broker, tmp_path,
                                                    through_the_fetch_process):
    """tests/test_labels_kafka.py: a second topic on the same consumer (label messages
    told apart by the frame's topic codes)."""
    from test_labels_kafka import test_late_out_of_order_labels_join_on_kafka
    test_late_out_of_order_labels_join_on_kafka(kafka_broker, tmp_path)
    assert through_the_fetch_process


@pytest.mark.parametrize("values", [
    [b"x"],                                   # one message: a format of one item
    [b""],                                    # an empty (not null) value
    [b"", b"a", b"", b"bc"],                  # empty values between others
    [b"\n" * 1_500_000, b"{}", b"z" * 10],    # a length of 7 digits, newlines inside
    [bytes([i % 256]) * (i % 700) for i in range(3_000)],  # many lengths, 0 included
])
def test_a_frame_round_trips_through_shared_memory(values):
    """The child's `_write` and the parent's `Frame` (the values' `struct` format, the
    arrays written straight from their buffers) give back every value, offset,
    partition, topic and timestamp, whatever the lengths (no broker: messages built
    in memory)."""
    import mmap

    from confluent_kafka import Message

    from stream_monitor.kafka.fetch_process import _Child

    topics = ["t-a", "t-b"]
    msgs = [Message(topic=topics[i % 2] if len(values) > 2 else "t-a", partition=i % 3,
                    offset=10 * i + 7, value=v, key=None,
                    timestamp=(1 + i % 2, 1_700_000_000_000 + i))
            for i, v in enumerate(values)]
    child = _Child.__new__(_Child)
    child.memfd = os.memfd_create("test-frame")
    try:
        child.size = 1 << 16  # small: a large batch makes it grow
        os.ftruncate(child.memfd, child.size)
        child.mm = mmap.mmap(child.memfd, child.size)
        meta = child._write(msgs)
        frame = Frame(meta, mmap.mmap(child.memfd, meta["size"]))
        assert frame.values == values
        assert [(m.topic(), m.partition(), m.offset(), m.value(), m.key(), m.timestamp())
                for m in frame] == [
            (m.topic(), m.partition(), m.offset(), m.value(), m.key(), m.timestamp())
            for m in msgs]
    finally:
        os.close(child.memfd)


def test_error_events_in_a_batch_are_carried_whole_beside_its_messages():
    """A consume() batch holding error events (a broker outage: no topic, partition or
    offset) goes through the frame: each error comes back at its place, the messages
    around it unchanged. (The blank written in an error's place once had the offset
    None, and the whole batch failed with a TypeError.)"""
    import mmap

    from confluent_kafka import KafkaError, Message

    from stream_monitor.kafka.fetch_process import _Child

    down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
    eof = KafkaError(KafkaError._PARTITION_EOF, "end of partition")
    msgs = [Message(error=down),
            Message(topic="t", partition=1, offset=41, value=b'{"a": 1}', key=b"k",
                    timestamp=(1, 1_700_000_000_000)),
            Message(topic="t", partition=2, offset=9, error=eof),
            Message(topic="t", partition=1, offset=42, value=None, timestamp=(1, 5))]
    child = _Child.__new__(_Child)
    child.memfd = os.memfd_create("test-frame-errors")
    try:
        child.size = 1 << 12
        os.ftruncate(child.memfd, child.size)
        child.mm = mmap.mmap(child.memfd, child.size)
        meta = child._write(msgs)
        frame = Frame(meta, mmap.mmap(child.memfd, meta["size"]))
        got = [(m.topic(), m.partition(), m.offset(), m.value(), m.error()) for m in frame]
        assert got == [(m.topic(), m.partition(), m.offset(), m.value(), m.error())
                       for m in msgs]
        assert got[0][4].code() == KafkaError._ALL_BROKERS_DOWN and got[0][2] is None
        assert [m.timestamp() for m in list(frame)[1::2]] == [(1, 1_700_000_000_000), (1, 5)]
    finally:
        os.close(child.memfd)
