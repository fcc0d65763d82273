"""Runtime: the Kafka sidecar loop (`run`) and its HTTP endpoints, kept thin and at the edge.

One consumer in a consumer group reads the inference topics in batches, hands each
batch to the same `Monitor` as `replay`, sends rejects to the dead-letter topic and
alert events to the alert topic (idempotent producer), and commits offsets only
once the batch is applied and everything it produced is delivered (at-least-once).
`/metrics`, `/healthz` and `/readyz` are served from one port.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import make_wsgi_app

from .config import Config, load_config
from .label_topic import process_batch
from .metrics import MonitorMetrics, record_performance
from .pipeline import BatchResult, Monitor
from .sinks import AlertmanagerPush

log = logging.getLogger("stream_monitor")

# Keys librdkafka only understands on one side; passing them to the other side only
# produces warnings, so the shared `kafka:` section is split here.
_CONSUMER_ONLY = {
    "group.id", "group.instance.id", "auto.offset.reset", "enable.auto.commit",
    "auto.commit.interval.ms", "enable.auto.offset.store", "session.timeout.ms",
    "heartbeat.interval.ms", "max.poll.interval.ms", "isolation.level",
    "partition.assignment.strategy", "group.protocol", "fetch.min.bytes",
    "fetch.max.bytes", "fetch.wait.max.ms", "max.partition.fetch.bytes",
    "enable.partition.eof", "check.crcs", "queued.min.messages",
}
_PRODUCER_ONLY = {
    "acks", "enable.idempotence", "linger.ms", "batch.size", "batch.num.messages",
    "compression.type", "message.timeout.ms", "delivery.timeout.ms", "retries",
    "transactional.id", "queue.buffering.max.messages", "queue.buffering.max.ms",
}
_SERVICE_CHECK_SECONDS = 2.0


def consumer_config(kafka: dict[str, Any]) -> dict[str, Any]:
    cfg = {"auto.offset.reset": "earliest", "topic.metadata.refresh.interval.ms": 10_000}
    cfg.update({k: v for k, v in kafka.items() if k not in _PRODUCER_ONLY})
    cfg["enable.auto.commit"] = False  # offsets are committed only after a batch is applied
    return cfg


def producer_config(kafka: dict[str, Any]) -> dict[str, Any]:
    cfg = {"linger.ms": 5}
    cfg.update({k: v for k, v in kafka.items() if k not in _CONSUMER_ONLY})
    cfg["enable.idempotence"] = True  # retries never duplicate or reorder alert events
    return cfg


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class HttpEndpoints:
    """`/metrics` (Prometheus text format), `/healthz` (alive), `/readyz` (ready)."""

    def __init__(self, metrics: MonitorMetrics, ready: Callable[[], tuple[bool, str]],
                 host: str, port: int):
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._ready = ready
        self.server = make_server(host, port, self._app, _ThreadingWSGIServer, _QuietHandler)
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, name="http",
                                        daemon=True)

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok, why = self._ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [(why + "\n").encode()]
        if path in ("/metrics", "/"):
            return self._metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class KafkaSidecar:
    """The `run` loop: consume a batch, apply it, deliver what it produced, commit."""

    def __init__(self, config: Config, monitor: Monitor | None = None,
                 metrics: MonitorMetrics | None = None,
                 on_alert: Callable[[dict[str, Any]], None] | None = None,
                 on_batch: Callable[[BatchResult], None] | None = None):
        self.config = config
        self.monitor = monitor or Monitor(config)
        self.metrics = metrics or MonitorMetrics(config.metrics)
        self.on_alert, self.on_batch = on_alert, on_batch
        self.stopping = threading.Event()
        self.consumer = Consumer({**consumer_config(config.kafka),
                                  "error_cb": self._on_kafka_error})
        self.producer = Producer({**producer_config(config.kafka),
                                  "error_cb": self._on_kafka_error})
        self.assigned: set[tuple[str, int]] = set()
        self.broker_ok = False
        self.last_error = ""
        self._retry: list[tuple[str, bytes | None, bytes, list, str]] = []
        self._undelivered = 0
        self._sequence = 0
        self._last_check = 0.0
        self.applied = Counter()     # events counted per model (for tests and the demo)
        self.http: HttpEndpoints | None = None
        self.push = None
        if config.alertmanager.url:
            self.push = AlertmanagerPush(config.alertmanager.url, config.alertmanager.timeout,
                                         on_failure=self.metrics.alert_failures.inc)
            # (the failure counter counts each failed alert once, not each retry)

    # -- state the endpoints report ----------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if not self.broker_ok:
            return False, f"broker not reachable{': ' + self.last_error if self.last_error else ''}"
        if not self.assigned:
            return False, "no partitions assigned yet"
        return True, f"ready: {len(self.assigned)} partition(s) assigned"

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.last_error = err.str()
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT,
                          KafkaError._RESOLVE):
            self.broker_ok = False
            self.metrics.ready.set(0)
        log.warning("kafka: %s", err.str())

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("assigned %s", sorted(self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Every batch consumed so far is applied and committed (or will be retried) by
        # the time consume() can call this, so there is nothing to hand over.
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        for p in partitions:
            try:
                self.metrics.lag.remove(p.topic, str(p.partition))
            except KeyError:
                pass  # no lag reported for it yet

    # -- delivery ---------------------------------------------------------------------

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: list,
                 kind: str, severity: str = "") -> None:
        def delivered(err, msg, _item=(topic, key, value, headers, kind), _sev=severity):
            self._undelivered -= 1
            if err is not None:
                self.metrics.alert_failures.inc()
                log.warning("delivery to %s failed (%s); will retry", topic, err)
                self._retry.append(_item)
            elif kind == "alert":
                self.metrics.alerts.labels(_sev).inc()
                if self.on_alert is not None:
                    self.on_alert(orjson.loads(value))
            elif kind == "dead_letter":
                self.metrics.dead_letters.inc()

        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers,
                                      on_delivery=delivered)
                self._undelivered += 1
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self.producer.poll(0.5)

    def _deliver(self, result: BatchResult, messages: list, base: int) -> None:
        topics = self.config.topics
        for rej in result.rejects:
            msg = messages[rej.position - base]
            headers = [("reason", rej.reason.encode()), ("detail", rej.detail.encode()),
                       ("source.topic", msg.topic().encode()),
                       ("source.partition", str(msg.partition()).encode()),
                       ("source.offset", str(msg.offset()).encode())]
            if rej.model:
                headers.append(("model", rej.model.encode()))
            if rej.feature:
                headers.append(("feature", rej.feature.encode()))
            self._produce(topics.dead_letter, msg.key(), rej.raw, headers, "dead_letter")
        for alert in result.alerts:
            self._produce(topics.alerts, alert["fingerprint"].encode(), orjson.dumps(alert),
                          [("kind", alert["kind"].encode()), ("status", alert["status"].encode())],
                          "alert", alert["labels"]["severity"])
        for record in result.retrain:  # retraining requests and refusals (performance.py)
            self._produce(topics.retrain, record["id"].encode(), orjson.dumps(record),
                          [("decision", record["decision"].encode())], "retrain")

    def _flush(self, timeout: float) -> bool:
        """Deliver everything produced so far (retrying failures); True when all arrived."""
        deadline = time.monotonic() + timeout
        while True:
            self.producer.flush(max(0.0, deadline - time.monotonic()))
            if self._retry:
                items, self._retry = self._retry, []
                for topic, key, value, headers, kind in items:
                    sev = orjson.loads(value)["labels"]["severity"] if kind == "alert" else ""
                    self._produce(topic, key, value, headers, kind, sev)
            if (self._undelivered == 0 and not self._retry) or time.monotonic() >= deadline:
                return self._undelivered == 0 and not self._retry

    def _commit(self) -> bool:
        try:
            self.consumer.commit(asynchronous=False)
            return True
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError._NO_OFFSET:
                return True  # nothing consumed since the last commit
            log.warning("commit failed: %s", exc)
            return False

    # -- the loop ---------------------------------------------------------------------

    def _service_checks(self) -> None:
        """Every couple of seconds: broker reachability, readiness and consumer lag."""
        now = time.monotonic()
        if now - self._last_check < _SERVICE_CHECK_SECONDS:
            return
        self._last_check = now
        try:
            self.consumer.list_topics(timeout=1.0)
            self.broker_ok = True
        except KafkaException as exc:
            self.broker_ok = False
            self.last_error = str(exc)
        self.metrics.ready.set(1 if self.readiness()[0] else 0)
        if not self.assigned:
            return
        tps = [TopicPartition(t, p) for t, p in sorted(self.assigned)]
        try:
            positions = self.consumer.position(tps)
        except KafkaException:
            return
        for tp in positions:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high is None or high < 0:
                continue
            pos = tp.offset if tp.offset >= 0 else low
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - pos))

    def poll_once(self) -> int:
        """Consume, apply and deliver one batch; returns the number of messages."""
        cfg = self.config.consumer
        self._service_checks()
        if self.push is not None and self.push.due():
            self.push.send([])
        if self._retry or self._undelivered:
            if self._flush(5.0):
                self._commit()
        raw = self.consumer.consume(cfg.batch_size, cfg.poll_timeout)
        messages = []
        for m in raw:
            err = m.error()
            if err is None:
                messages.append(m)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume: %s", err.str())
        if not messages:
            return 0
        self.broker_ok = True
        started = time.perf_counter()
        base = self._sequence
        self._sequence += len(messages)
        values = [m.value() or b"" for m in messages]
        result = process_batch(self.monitor, messages, values, base, self.config.topics.labels)
        _strip_positions(result)
        topics = Counter(m.topic() for m in messages)
        self._deliver(result, messages, base)
        self.metrics.record_batch(
            result, topics, time.perf_counter() - started, self.monitor.policy,
            {n: p.windows.open_events for n, p in self.monitor.models.items()},
            self.monitor.newest_event)
        record_performance(self.metrics, result, self.monitor)
        self.applied.update(result.events)
        if self.push is not None and (result.alerts or self.push.due()):
            if self.push.due() or not self.push.pending:
                self.push.send(result.alerts)
            else:  # backing off: queue them for the next attempt
                self.push.queue(result.alerts)
        if self._flush(30.0):
            self._commit()
        if self.on_batch is not None:
            self.on_batch(result)
        return len(messages)

    def subscribe(self) -> None:
        labels = [self.config.topics.labels] if self.config.topics.labels else []
        self.consumer.subscribe(list(self.config.topics.inferences) + labels,
                                on_assign=self._on_assign,
                                on_revoke=self._on_revoke)

    def run(self) -> None:
        """Run until `stop()` (or SIGTERM/SIGINT when installed); then shut down cleanly."""
        self.subscribe()
        try:
            while not self.stopping.is_set():
                self.poll_once()
        finally:
            self.close()

    def close(self) -> None:
        """Publish pending alerts, flush, commit what was applied, leave the group."""
        delivered = self._flush(30.0)
        if self.push is not None and self.push.pending:
            self.push.retry_at = 0.0  # one last attempt before exiting
            if not self.push.send([]):
                log.error("shutting down with %d alert(s) not pushed to Alertmanager",
                          len(self.push.pending))
        if delivered:
            self._commit()
        else:
            log.error("shutting down with %d undelivered messages; their offsets are not "
                      "committed", self._undelivered + len(self._retry))
        self.consumer.close()
        self.metrics.ready.set(0)

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def serve_http(self) -> HttpEndpoints:
        self.http = HttpEndpoints(self.metrics, self.readiness, self.config.http.host,
                                  self.config.http.port)
        self.http.start()
        return self.http


def _strip_positions(result: BatchResult) -> None:
    """Kafka positions are internal sequence numbers, not input lines: keep them out."""
    for doc in result.reports + result.alerts:
        doc["window"].pop("first_line", None)
        doc["window"].pop("last_line", None)


def install_signal_handlers(sidecar: KafkaSidecar) -> None:
    signal.signal(signal.SIGTERM, sidecar.stop)
    signal.signal(signal.SIGINT, sidecar.stop)


def _cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    sidecar = KafkaSidecar(cfg)
    http = sidecar.serve_http()
    log.info("serving /metrics, /healthz and /readyz on %s:%d", cfg.http.host, http.port)
    install_signal_handlers(sidecar)
    try:
        sidecar.run()
    finally:
        http.stop()
    log.info("stopped cleanly")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="consume inference events from Kafka (the sidecar)")
    r.add_argument("--config", required=True)
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=_cmd_run)
    from . import demo
    demo.add_command(sub)
