"""`topics.windows`: `run` publishes every closed window's report, as `replay` writes it."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from helpers import read_topic, wait_until

from stream_monitor.config import parse_config
from stream_monitor.io import synthetic
from stream_monitor.io.replay import replay
from stream_monitor.kafka.runtime import KafkaSidecar

pytestmark = pytest.mark.integration



def test_run_publishes_the_window_reports_replay_writes(kafka_broker, churn_reference_file,
                                                         tmp_path: Path):
    tag = uuid.uuid4().hex[:8]
    names = {"inferences": f"win-in-{tag}", "alerts": f"win-alerts-{tag}",
             "dead_letter": f"win-dlq-{tag}", "windows": f"win-windows-{tag}"}
    kafka_broker.create_topics({n: 1 for n in names.values()})
    raw = {
        "kafka": {"bootstrap.servers": kafka_broker.bootstrap_servers,
                  "group.id": f"win-group-{tag}", "session.timeout.ms": 6000,
                  "log.connection.close": False,
                  "auto.offset.reset": "earliest"},  # the topic is filled before the join
        "topics": names,
        "http": {"host": "127.0.0.1", "port": 0},
        "defaults": {"window": {"events": 2000}},
        "models": {"churn": {"reference": str(churn_reference_file)}},
    }
    messages = [m for chunk in synthetic.generate(
        12_500, seed=5, drift=synthetic.default_drift(7_300)) for m in chunk]
    # a few rejects in the stream: they are counted in no window, here or in replay
    messages[100:100] = [b"not json", b'{"model": "churn", "features": {"f01": "x"}}']
    p = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers, "linger.ms": 10})
    for i, m in enumerate(messages):
        p.produce(names["inferences"], m, key=str(i).encode())
        if i % 5000 == 0:
            p.poll(0)
    assert p.flush(30) == 0

    sidecar = KafkaSidecar(parse_config(raw))
    thread = threading.Thread(target=sidecar.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: sum(sidecar.applied.values()) >= 12_500, 90, "all events applied")
        got = read_topic(kafka_broker.bootstrap_servers, names["windows"], 6)
    finally:
        sidecar.stop()
        thread.join(30)
    assert not thread.is_alive()

    # the same events through replay (which also flushes the open seventh window)
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(messages) + b"\n")
    replay(parse_config(raw), tmp_path / "in.jsonl", tmp_path / "out", progress=False)
    expected = [orjson.loads(line) for line in
                (tmp_path / "out" / "windows.jsonl").read_bytes().splitlines()]
    for doc in expected:  # replay's input line numbers mean nothing on a topic
        doc["window"].pop("first_line")
        doc["window"].pop("last_line")
    complete = [d for d in expected if d["window"]["complete"]]
    assert len(complete) == 6 and len(expected) == 7

    reports = [orjson.loads(m.value()) for m in got]
    assert all(m.key() == b"churn" for m in got)
    assert reports == complete          # same windows, counts, scores, in order
    assert any(r["dataset"]["drifted_features"] for r in reports)  # the drift is in them
    assert [r["window"]["index"] for r in reports] == list(range(6))
