"""Nothing lost, ever (issue 9): poison messages, oversized rejects, undeliverable outputs,
exceptions in the loop, re-reads, hung brokers and shutdown, against the embedded broker."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from helpers import read_topic, wait_until
from poison import poison_messages
from test_runtime import _config, _metric, _names, _scrape

from stream_monitor.config import parse_config
from stream_monitor.io import synthetic
from stream_monitor.kafka.runtime import KafkaSidecar, PoisonBatch

pytestmark = pytest.mark.integration

BAD_TOPIC = "not a valid topic name!"  # the broker refuses it on every attempt


def _good(n: int, seed: int) -> list[bytes]:
    return [m for chunk in synthetic.generate(n, seed=seed) for m in chunk]


def _send(bootstrap: str, topic: str, messages: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10,
                  "message.max.bytes": 60_000_000})
    for i, m in enumerate(messages):
        p.produce(topic, m, key=str(i).encode())
        p.poll(0)
    assert p.flush(60) == 0


def _committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "session.timeout.ms": 6000})
    got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    c.close()
    return sum(max(tp.offset, 0) for tp in got)


def _alo(cfg: dict) -> dict:
    """At-least-once mode: these tests are about its mechanics (outputs retried while the
    commit waits, re-reads skipped); exactly-once aborts and re-does instead
    (tests/test_exactly_once.py)."""
    return {**cfg, "processing": {"guarantee": "at_least_once"}}


def _start(cfg_dict: dict, **kw) -> tuple[KafkaSidecar, threading.Thread, list]:
    sidecar = KafkaSidecar(parse_config(cfg_dict), **kw)
    errors: list[BaseException] = []

    def target():
        try:
            sidecar.result = sidecar.run()
        except BaseException as exc:  # the test inspects how the loop ended
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return sidecar, thread, errors


def _stop(sidecar: KafkaSidecar, thread: threading.Thread) -> None:
    sidecar.stop()
    thread.join(60)
    assert not thread.is_alive()


def test_poison_messages_through_run(kafka_broker, churn_reference_file):
    """Every poison message of issue 9 between good events: the loop never stops, each
    one is dead-lettered with its reason (truncated and flagged where it must be), the
    invariant holds and the configured model's metrics are there."""
    names = _names("poison")
    bootstrap = kafka_broker.bootstrap_servers
    kafka_broker.create_topics({names["inferences"]: 1, names["alerts"]: 1,
                                names["dead_letter"]: 1})
    good = _good(4000, seed=31)
    poison = poison_messages(good[0])
    unknown = [p for p in poison if p[1] == "unknown_model"]
    others = [p for p in poison if p[1] != "unknown_model"]
    # unknown model names first: they once used up the label cap before the real model
    stream = [p for p, _ in unknown] + good[:2000] + [p for p, _ in others] + good[2000:]
    cfg = _config(bootstrap, names, churn_reference_file, window=1000)
    cfg["kafka"]["fetch.max.bytes"] = 60_000_000
    sidecar, thread, errors = _start(cfg)
    http = sidecar.serve_http()
    try:
        _send(bootstrap, names["inferences"], stream)
        wait_until(lambda: sum(sidecar.applied.values()) >= 4000 or not thread.is_alive(), 120,
                   "all good events applied")
        assert thread.is_alive(), errors
        dlq = read_topic(bootstrap, names["dead_letter"], len(poison), timeout=60)
        wait_until(lambda: sidecar.pending_outputs() == 0, 30, "outputs delivered")
        _, text = _scrape(http.port)
    finally:
        _stop(sidecar, thread)
        http.stop()
    assert not errors and sidecar.result is True
    assert sum(sidecar.applied.values()) == 4000
    by_offset = {int(dict(m.headers())["source.offset"]): m for m in dlq}
    assert len(by_offset) == len(dlq) == len(poison)
    for offset, (raw, reason) in enumerate(unknown + others, start=0):
        if offset >= len(unknown):
            offset += 2000  # the others come after the first 2000 good events
        m = by_offset[offset]
        headers = dict(m.headers())
        assert headers["reason"] == reason.encode(), (offset, headers)
        if len(raw) > sidecar.max_value_bytes:
            assert headers["truncated"] == b"true"
            assert int(headers["original.size"]) == len(raw)
            assert headers["original.sha256"] == hashlib.sha256(raw).hexdigest().encode()
            assert m.value() == raw[:len(m.value())] and len(m.value()) < 1_000_000
        else:
            assert "truncated" not in headers and m.value() == raw
    consumed = _metric(text, "stream_monitor_messages_consumed_total")
    events = _metric(text, "stream_monitor_events_total", model="churn")
    dead = _metric(text, "stream_monitor_dead_letters_total")
    assert (consumed, events, dead) == (len(stream), 4000, len(poison))
    assert _metric(text, "stream_monitor_rejects_total", model="unknown",
                   reason="unknown_model") == 200
    assert _metric(text, "stream_monitor_windows_closed_total", model="churn") == 4
    assert _metric(text, "stream_monitor_feature_drift_score", model="churn", feature="f01",
                   method="psi") >= 0
    assert _metric(text, "stream_monitor_dead_letters_truncated_total") == sum(
        len(raw) > sidecar.max_value_bytes for raw, _ in poison)
    assert 'model="made-up-' not in text
    assert _committed(bootstrap, names["group"], names["inferences"]) == len(stream)


def _fault_after(sidecar: KafkaSidecar, armed: threading.Event) -> None:
    """From `armed` on, every window evaluation raises: mid-batch, after the batch's
    events were added to the windows (a fault of the monitor, not of the data)."""
    evaluator = sidecar.monitor.models["churn"].evaluator
    real = evaluator.evaluate

    def evaluate(window):
        if armed.is_set():
            raise RuntimeError("injected fault")
        return real(window)

    evaluator.evaluate = evaluate


def test_exception_mid_batch_commits_only_the_last_applied_batch(kafka_broker,
                                                                  churn_reference_file):
    names = _names("crash")
    bootstrap = kafka_broker.bootstrap_servers
    kafka_broker.create_topics({names["inferences"]: 1, names["alerts"]: 1,
                                names["dead_letter"]: 1})
    good = _good(6000, seed=32)
    first = good[:2999] + [b"not json"]  # with one dead letter to deliver before the commit
    sidecar, thread, errors = _start(_config(bootstrap, names, churn_reference_file,
                                             window=1000))
    armed = threading.Event()
    _fault_after(sidecar, armed)
    _send(bootstrap, names["inferences"], first)
    wait_until(lambda: sum(sidecar.applied.values()) == 2999, 60, "first batches applied")
    wait_until(lambda: sidecar.pending_outputs() == 0 and not sidecar._batches, 30,
               "first batches delivered and committed")
    armed.set()
    _send(bootstrap, names["inferences"], good[3000:])  # closes windows: the fault fires
    thread.join(60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], PoisonBatch), errors
    assert _committed(bootstrap, names["group"], names["inferences"]) == 3000
    # a restart applies exactly what was not committed, once
    sidecar2, thread2, errors2 = _start(_config(bootstrap, names, churn_reference_file,
                                                window=1000))
    try:
        wait_until(lambda: sum(sidecar2.applied.values()) >= 3000, 60, "the rest applied")
        time.sleep(1.0)
    finally:
        _stop(sidecar2, thread2)
    assert sum(sidecar2.applied.values()) == 3000 and not errors2
    assert _committed(bootstrap, names["group"], names["inferences"]) == 6000


def test_poison_pill_is_isolated_and_dead_lettered(kafka_broker, churn_reference_file):
    """A message that makes the monitor raise after part of its batch was applied: the
    batch is rolled back, bisected, the poison dead-lettered, the rest applied once."""
    names = _names("pill")
    bootstrap = kafka_broker.bootstrap_servers
    kafka_broker.create_topics({names["inferences"]: 1, names["alerts"]: 1,
                                names["dead_letter"]: 1})
    good = _good(5000, seed=33)
    pill = good[2500].replace(b'"churn-2500"', b'"POISON"')
    stream = good[:2500] + [pill] + good[2501:]
    sidecar, thread, errors = _start(_config(bootstrap, names, churn_reference_file,
                                             window=1000))
    real = sidecar.monitor.process

    def process(messages, positions):
        bad = [i for i, m in enumerate(messages) if b'"POISON"' in m]
        if bad:
            real(messages[:bad[0]], positions[:bad[0]])  # part of the batch gets applied
            raise KeyError("a decoder bug")
        return real(messages, positions)

    sidecar.monitor.process = process
    try:
        _send(bootstrap, names["inferences"], stream)
        wait_until(lambda: sum(sidecar.applied.values()) >= 4999, 60, "good events applied")
        dlq = read_topic(bootstrap, names["dead_letter"], 1)
        time.sleep(0.5)
    finally:
        _stop(sidecar, thread)
    assert not errors and sum(sidecar.applied.values()) == 4999
    (dead,) = dlq
    headers = dict(dead.headers())
    assert dead.value() == pill and headers["reason"] == b"processing_error"
    assert headers["detail"].startswith(b"KeyError") and headers["source.offset"] == b"2500"
    windows = sidecar.monitor.models["churn"].windows
    assert windows.closed_count == 4 and windows.open_events == 999
    assert _committed(bootstrap, names["group"], names["inferences"]) == 5000


def test_undeliverable_output_holds_commits_and_readiness(kafka_broker, churn_reference_file):
    """Offsets are committed only after delivery: while a dead letter cannot be delivered,
    neither its batch nor any later one is committed; retries back off; /readyz says why
    in a few words; stopping reports the loss instead of hiding it."""
    names = _names("undeliv")
    bootstrap = kafka_broker.bootstrap_servers
    kafka_broker.create_topics({names["inferences"]: 1, names["alerts"]: 1})
    cfg = _alo(_config(bootstrap, names, churn_reference_file, window=1000))
    cfg["topics"]["dead_letter"] = BAD_TOPIC
    cfg["delivery"] = {"stall_after": 2, "shutdown_grace": 3}
    good = _good(3000, seed=34)
    sidecar, thread, errors = _start(cfg)
    http = sidecar.serve_http()
    try:
        _send(bootstrap, names["inferences"], good[:1000])
        wait_until(lambda: _committed(bootstrap, names["group"], names["inferences"]) == 1000,
                   60, "a clean batch committed")
        _send(bootstrap, names["inferences"], [b"not json"] + good[1000:2000])
        wait_until(lambda: sum(sidecar.applied.values()) == 2000, 30, "second wave applied")
        _send(bootstrap, names["inferences"], good[2000:])
        wait_until(lambda: sum(sidecar.applied.values()) == 3000, 30, "third wave applied")
        wait_until(lambda: _scrape(http.port, "/readyz")[0] == 503, 20, "unready")
        status, body = _scrape(http.port, "/readyz")
        time.sleep(4)
        _, text = _scrape(http.port)
        assert _committed(bootstrap, names["group"], names["inferences"]) == 1000
    finally:
        _stop(sidecar, thread)
        http.stop()
    assert body.startswith("outputs not delivered") and "topic" not in body.lower()
    assert _metric(text, "stream_monitor_pending_deliveries") == 1
    assert _metric(text, "stream_monitor_oldest_pending_delivery_seconds") > 2
    assert _metric(text, "stream_monitor_uncommitted_batches") >= 2
    assert 1 <= _metric(text, "stream_monitor_alert_delivery_failures_total") <= 6  # backoff
    assert not errors and sidecar.result is False and sidecar.undelivered_at_exit == 1
    assert _committed(bootstrap, names["group"], names["inferences"]) == 1000


@pytest.mark.slow
def test_reread_after_a_failed_commit_is_not_applied_twice(kafka_broker,
                                                           churn_reference_file):
    """An uncommitted batch comes back after a rebalance: this instance skips it."""
    names = _names("reread")
    bootstrap = kafka_broker.bootstrap_servers
    kafka_broker.create_topics({names["inferences"]: 1, names["alerts"]: 1})
    cfg = _alo(_config(bootstrap, names, churn_reference_file, window=1000))
    cfg["topics"]["dead_letter"] = BAD_TOPIC  # keeps the second batch uncommitted
    good = _good(2000, seed=35)
    sidecar, thread, errors = _start(cfg)
    try:
        _send(bootstrap, names["inferences"], good[:1000])
        wait_until(lambda: _committed(bootstrap, names["group"], names["inferences"]) == 1000,
                   60, "first batch committed")
        _send(bootstrap, names["inferences"], [b"not json"] + good[1000:])
        wait_until(lambda: sum(sidecar.applied.values()) == 2000, 30, "second batch applied")
        # another member joins and leaves: the partition is revoked and handed back, and
        # consumption restarts from the committed offset (1000)
        other = Consumer({"bootstrap.servers": bootstrap, "group.id": names["group"],
                          "session.timeout.ms": 6000, "enable.auto.commit": False})
        other.subscribe([names["inferences"]])
        deadline = time.monotonic() + 30
        while not other.assignment() and time.monotonic() < deadline and not sidecar.assigned:
            other.poll(0.2)
        for _ in range(10):
            other.poll(0.2)
        other.close()
        wait_until(lambda: sidecar.metrics.reread_skipped._value.get() > 0, 60,
                   "the uncommitted batch read again")
        time.sleep(1.0)
    finally:
        _stop(sidecar, thread)
    assert not errors
    assert sum(sidecar.applied.values()) == 2000   # not 3000
    assert sidecar.monitor.models["churn"].windows.closed_count == 2


def _freeze(broker, on: bool) -> None:
    import os
    os.kill(broker._proc.pid, signal.SIGSTOP if on else signal.SIGCONT)


@pytest.mark.slow
def test_unready_while_the_broker_hangs_then_ready(churn_reference_file):
    from stream_monitor.kafka.broker import EmbeddedBroker
    with EmbeddedBroker() as broker:
        names = _names("hung")
        broker.create_topics({names["inferences"]: 1, names["alerts"]: 1,
                              names["dead_letter"]: 1})
        sidecar, thread, errors = _start(_config(broker.bootstrap_servers, names,
                                                 churn_reference_file, window=1000))
        http = sidecar.serve_http()
        try:
            _send(broker.bootstrap_servers, names["inferences"], _good(1000, 36))
            wait_until(lambda: _scrape(http.port, "/readyz")[0] == 200, 60, "ready")
            _freeze(broker, True)
            t0 = time.monotonic()
            try:
                wait_until(lambda: _scrape(http.port, "/readyz")[0] == 503, 20,
                           "unready while the broker hangs")
                unready_after = time.monotonic() - t0
                assert thread.is_alive()
            finally:
                _freeze(broker, False)
            wait_until(lambda: _scrape(http.port, "/readyz")[0] == 200, 60, "ready again")
            _send(broker.bootstrap_servers, names["inferences"], [b"not json"])
            wait_until(lambda: sidecar.metrics.dead_letters._value.get() == 1, 60,
                       "delivering again")
        finally:
            _stop(sidecar, thread)
            http.stop()
        assert not errors and unready_after < 15


@pytest.mark.slow
def test_sigterm_with_undeliverable_outputs_exits_nonzero_within_grace(
        kafka_broker, churn_reference_file, tmp_path):
    from stream_monitor.kafka.broker import EmbeddedBroker
    with EmbeddedBroker() as broker:
        names = _names("grace")
        broker.create_topics({names["inferences"]: 1, names["alerts"]: 1})
        cfg = _alo(_config(broker.bootstrap_servers, names, churn_reference_file, window=1000))
        cfg["topics"]["dead_letter"] = BAD_TOPIC
        cfg["delivery"] = {"shutdown_grace": 5}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        _send(broker.bootstrap_servers, names["inferences"], _good(500, 37) + [b"not json"])
        proc = subprocess.Popen([sys.executable, "-m", "stream_monitor", "run", "--config",
                                 str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            wait_until(lambda: any("delivery to" in line for line in lines), 60,
                       "a failed delivery", lambda: "".join(lines))
            _freeze(broker, True)  # and the broker hangs on top of it
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            took = time.monotonic() - t0
        finally:
            _freeze(broker, False)
            if proc.poll() is None:
                proc.kill()
        reader.join(5)
    out = "".join(lines)
    assert code == 1 and took < 5 + 5, (code, took, out)
    assert "1 output(s) undelivered" in out and "Traceback" not in out
    assert sum("delivery to" in line for line in lines) == 1  # one line, not a flood


def test_readyz_body_is_short_and_never_librdkafka_text(churn_reference_file):
    cfg = parse_config(_config("127.0.0.1:1", _names("ready"), churn_reference_file))
    sidecar = KafkaSidecar(cfg)
    sidecar.last_error = "sasl.password=hunter2 failed: broker 10.0.0.7:9093 says no"
    http = sidecar.serve_http()
    try:
        status, body = _scrape(http.port, "/readyz")
    finally:
        http.stop()
        sidecar.consumer.close()
    assert status == 503 and body == "broker not reachable\n"


def test_http_server_bounds_threads_and_drops_idle_connections():
    import socket

    from stream_monitor.io.metrics import MonitorMetrics
    from stream_monitor.kafka.runtime import HttpEndpoints, _BoundedWSGIServer, _QuietHandler
    http = HttpEndpoints(MonitorMetrics(), lambda: (True, "ready"), "127.0.0.1", 0)
    http.start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", http.port)) for _ in range(60)]
    try:
        time.sleep(1.0)
        assert threading.active_count() - before <= _BoundedWSGIServer.max_threads
        t0 = time.monotonic()
        idle[0].settimeout(_QuietHandler.timeout + 5)
        assert idle[0].recv(1) == b""  # the server hung up on the idle client
        assert time.monotonic() - t0 <= _QuietHandler.timeout + 2
    finally:
        for s in idle:
            s.close()
    status, _ = _scrape(http.port, "/healthz")
    http.stop()
    assert status == 200


def test_secret_values_never_appear_in_config_errors():
    from datetime import date

    from stream_monitor.config import ConfigError
    for bad in (["hunter2", "hunter3"], date(2024, 1, 2), {"v": "hunter2"}):
        data = {"kafka": {"bootstrap.servers": "b:9092", "sasl.password": bad,
                          "ssl.key.password": bad, "sasl.oauthbearer.client.secret": bad},
                "models": {"m": {"baseline": {"events": 10}}}}
        with pytest.raises(ConfigError) as err:
            parse_config(data)
        text = str(err.value)
        assert "kafka.sasl.password" in text and "redacted" in text
        assert "hunter" not in text and "2024" not in text, text


@pytest.mark.slow
def test_alert_events_survive_an_unusable_alert_topic_without_crashing(
        kafka_broker, churn_reference_file):
    """An invalid alert topic: retried with backoff, counted, never fatal."""
    names = _names("badalert")
    bootstrap = kafka_broker.bootstrap_servers
    kafka_broker.create_topics({names["inferences"]: 1, names["dead_letter"]: 1})
    cfg = _alo(_config(bootstrap, names, churn_reference_file, window=2000))
    cfg["topics"]["alerts"] = BAD_TOPIC
    messages = _good(8000, seed=38) + [b"x"]
    drifted = [m for chunk in synthetic.generate(4000, seed=39, start_index=8000,
                                                 drift=synthetic.default_drift(0))
               for m in chunk]
    sidecar, thread, errors = _start(cfg)
    try:
        _send(bootstrap, names["inferences"], messages + drifted)
        wait_until(lambda: sum(sidecar.applied.values()) == 12_000, 60, "all applied")
        wait_until(lambda: sidecar.metrics.alert_failures._value.get() >= 1, 30,
                   "a failed alert delivery")
        assert thread.is_alive()
    finally:
        _stop(sidecar, thread)
    assert not errors and sidecar.result is False
    assert len(read_topic(bootstrap, names["dead_letter"], 1)) == 1
    # the batch whose alert is undelivered, and every later one, stay uncommitted
    assert 0 < _committed(bootstrap, names["group"], names["inferences"]) < 12_001


def test_unknown_model_names_cannot_use_up_the_label_cap():
    """Unit check of item 9.7 (the broker test above covers it end to end)."""
    from stream_monitor.alerting.policy import AlertPolicy
    from stream_monitor.config import MetricsConfig
    from stream_monitor.io.decode import Reject
    from stream_monitor.io.metrics import MonitorMetrics
    from stream_monitor.pipeline import BatchResult
    m = MonitorMetrics(MetricsConfig(max_models=5))
    m.reserve_models(["churn"])
    noise = BatchResult(rejects=[Reject(i, "unknown_model", b"{}", model=f"x{i}")
                                 for i in range(200)])
    policy = AlertPolicy({})
    m.record_batch(noise, {"t": 200}, 0.01, policy, {}, {})
    from collections import Counter
    m.record_batch(BatchResult(events=Counter(churn=10)), {"t": 10}, 0.01, policy,
                   {"churn": 10}, {})
    assert m.events.labels("churn")._value.get() == 10
    assert m.rejects.labels("unknown", "unknown_model")._value.get() == 200
    assert m.dropped.labels("model")._value.get() == 0


@pytest.mark.slow
def test_outage_past_the_session_timeout_does_not_double_count(churn_reference_file):
    """The broker hangs longer than the session: the assignment is lost, the uncommitted
    batch is read again after the group rejoins, and is not applied twice."""
    from stream_monitor.kafka.broker import EmbeddedBroker
    with EmbeddedBroker() as broker:
        names = _names("lost")
        bootstrap = broker.bootstrap_servers
        broker.create_topics({names["inferences"]: 1, names["alerts"]: 1})
        cfg = _alo(_config(bootstrap, names, churn_reference_file, window=1000))
        cfg["topics"]["dead_letter"] = BAD_TOPIC  # keeps the second batch uncommitted
        good = _good(2000, seed=40)
        sidecar, thread, errors = _start(cfg)
        try:
            _send(bootstrap, names["inferences"], good[:1000])
            wait_until(lambda: _committed(bootstrap, names["group"], names["inferences"])
                       == 1000, 60, "first batch committed")
            _send(bootstrap, names["inferences"], [b"not json"] + good[1000:])
            wait_until(lambda: sum(sidecar.applied.values()) == 2000, 30, "second batch")
            _freeze(broker, True)
            try:
                time.sleep(10)  # past session.timeout.ms (6 s)
            finally:
                _freeze(broker, False)
            wait_until(lambda: sidecar.metrics.reread_skipped._value.get() > 0, 60,
                       "the uncommitted batch read again")
            time.sleep(1.0)
        finally:
            _stop(sidecar, thread)
        assert not errors
        assert sum(sidecar.applied.values()) == 2000   # not 3000
        assert sidecar.metrics.consumed.labels(names["inferences"])._value.get() == 2001
