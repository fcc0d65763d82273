"""Runtime: the Kafka sidecar loop (`run`) and its HTTP endpoints, kept thin and at the edge.

One consumer in a consumer group reads the inference topics in batches, hands each
batch to the same `Monitor` as `replay`, sends rejects to the dead-letter topic and
alert events to the alert topic (idempotent producer), and commits offsets only
once the batch is applied and everything it produced is delivered (at-least-once).
`/metrics`, `/healthz` and `/readyz` are served from one port.
"""

from __future__ import annotations

import argparse
import errno
import logging
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import make_wsgi_app

from .config import Config, ConfigError, load_config

if TYPE_CHECKING:  # imported where used: `run` joins its group while the engine loads
    from .metrics import MonitorMetrics
    from .pipeline import BatchResult, Monitor

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
    # auto.offset.reset, session.timeout.ms and heartbeat.interval.ms come from the
    # config's `kafka:` defaults (config.KAFKA_DEFAULTS), so they are documented there.
    cfg = {"topic.metadata.refresh.interval.ms": 10_000}
    cfg.update({k: v for k, v in kafka.items() if k not in _PRODUCER_ONLY})
    cfg["enable.auto.commit"] = False  # offsets are committed only after a batch is applied
    return cfg


def producer_config(kafka: dict[str, Any]) -> dict[str, Any]:
    cfg = {"linger.ms": 5}
    cfg.update({k: v for k, v in kafka.items() if k not in _CONSUMER_ONLY})
    cfg["enable.idempotence"] = True  # retries never duplicate or reorder alert events
    return cfg


class _Discard:
    """A `logger` for throw-away clients: their librdkafka lines are not wanted."""

    def log(self, *_: Any) -> None:
        pass


_QUOTED = re.compile(r"[\"`]([A-Za-z0-9._-]+)[\"`]")


def client_config_problems(kafka: dict[str, Any], source: str = "<config>") -> list[str]:
    """Every librdkafka setting of `kafka:` that the clients would refuse, one line each.

    Constructing a client validates its settings without connecting (the brokers are
    left out of the probe, so nothing is contacted). librdkafka names only the first
    bad property, so each one found is dropped and the probe repeated: every mistake
    is reported in one pass, with its key path.
    """
    problems: list[str] = []
    for build, client in ((consumer_config, Consumer), (producer_config, Producer)):
        conf = {k: v for k, v in build(kafka).items() if k != "bootstrap.servers"}
        for _ in range(len(conf) + 1):
            try:
                c = client({**conf, "logger": _Discard()})
            except (KafkaException, TypeError, ValueError) as exc:
                err = exc.args[0] if exc.args else exc
                text = (err.str() if isinstance(err, KafkaError) else str(err)).strip()
                text = re.sub(r"^Failed to create (consumer|producer): ", "", text)
                key = next((k for k in _QUOTED.findall(text) if k in conf and k in kafka),
                           None)
                where = f"kafka.{key}" if key else "kafka"
                got = f" (got {kafka[key]!r})" if key else ""
                problems.append(f"{source}: {where}: {text}{got}")
                if key is None:
                    break
                conf.pop(key)
                continue
            if isinstance(c, Consumer):
                c.close()
            break
    return list(dict.fromkeys(problems))


class KafkaLogBridge:
    """librdkafka's log lines and client errors -> Python logging, quietly.

    Passed as the clients' `logger` (so librdkafka no longer writes raw lines to
    stderr) and fed their `error_cb`. Losing the cluster (librdkafka's "all brokers
    down", or a failed request of the sidecar's own) is one warning ("unreachable,
    retrying"), getting it back one info line, with a reminder every `reminder`
    seconds in between. Trouble with one broker connection (refused, disconnected:
    librdkafka retries it several times a second, and idle connections are closed
    routinely) is only logged at DEBUG: the cluster-level state says what matters.
    Any other librdkafka line is logged at its own level at most once per `reminder`
    seconds per kind of message, with a count of the repeats.
    """

    _DOWN_CODES = (KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE)
    _CONNECTION_CODES = (KafkaError._TRANSPORT,)
    _CONNECTION_TEXT = re.compile(r"Connect to .* failed|brokers are down|Connection refused|"
                                  r"Disconnected|Receive failed|Send failed|timed out")

    def __init__(self, logger: logging.Logger | None = None, reminder: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, grace: float = 5.0):
        self.logger = logger or logging.getLogger("stream_monitor.kafka")
        self.reminder, self.clock, self.grace = reminder, clock, grace
        self.down_since: float | None = None
        self._back_at = -float("inf")
        self._reminded = 0.0
        self.last_error = ""
        self._seen: dict[str, list[float]] = {}  # kind of message -> [last logged, repeats]
        self.silenced = False

    # librdkafka's `logger` hook: log(level, "%s [%s] %s", facility, client, message)
    def log(self, level: int, fmt: str, *args: Any) -> None:
        if self.silenced:
            return
        facility, message = (args[0], args[-1]) if len(args) >= 3 else ("", fmt % args)
        message = re.sub(r"^\[thrd:[^\]]*\]: ", "", str(message))
        if self._CONNECTION_TEXT.search(message):
            self.logger.debug("kafka %s: %s", facility, message)
        else:
            self._limited(level, f"kafka {facility}: {message}")

    def error(self, err: KafkaError) -> None:
        """The clients' `error_cb` and consume() errors."""
        if self.silenced:
            return
        if err.code() in self._DOWN_CODES:
            self.unreachable(err.str())
        elif err.code() in self._CONNECTION_CODES:
            self.logger.debug("kafka: %s", err.str())
        else:
            self._limited(logging.WARNING, f"kafka: {err.str()}")

    def unreachable(self, why: str, confirmed: bool = False) -> None:
        """The broker looks down. librdkafka's own lines and errors arrive late (they are
        queued until the next poll), so within `grace` seconds of the broker coming back
        only a `confirmed` report (a failed request of ours) counts as going down again."""
        now, self.last_error = self.clock(), why
        if self.down_since is None and not confirmed and now - self._back_at < self.grace:
            self.logger.debug("kafka (stale, ignored): %s", why)
            return
        if self.down_since is None:
            self.down_since = self._reminded = now
            self.logger.warning("kafka: broker unreachable (%s); retrying", why)
        elif now - self._reminded >= self.reminder:
            self._reminded = now
            self.logger.warning("kafka: broker still unreachable after %.0f s (%s); retrying",
                                now - self.down_since, why)

    def reachable(self) -> None:
        if self.down_since is not None:
            self._back_at = self.clock()
            self.logger.info("kafka: broker reachable again after %.0f s",
                             self._back_at - self.down_since)
            self.down_since = None

    def _limited(self, level: int, line: str) -> None:
        kind = re.sub(r"\d+", "#", line)  # the same message about another broker/offset
        now, seen = self.clock(), self._seen.get(kind)
        if seen is not None and now - seen[0] < self.reminder:
            seen[1] += 1
            return
        repeats = f" ({int(seen[1])} more like it since)" if seen and seen[1] else ""
        self._seen[kind] = [now, 0]
        if len(self._seen) > 1000:  # bounded: forget the oldest kinds
            for old in list(self._seen)[:500]:
                del self._seen[old]
        self.logger.log(level, "%s%s", line, repeats)


def window_line(report: dict[str, Any]) -> str:
    """One concise log line for a closed window of one model."""
    win, ds = report["window"], report.get("dataset") or {}
    drifting = ds.get("drifted_features") or []
    worst = max((f.get("severity", "ok") for f in report.get("features", {}).values()),
                key=("ok", "warning", "critical").index, default="ok")
    shown = ", ".join(drifting[:5]) + (f", ... ({len(drifting) - 5} more)"
                                       if len(drifting) > 5 else "")
    return (f"window closed: model={report['model']} #{win.get('index')} "
            f"events={win.get('events')} drifting={len(drifting)}"
            + (f" ({shown})" if drifting else "") + f" severity={worst}")


def alert_line(alert: dict[str, Any]) -> str:
    """One concise log line for an alert event."""
    labels = alert["labels"]
    about = labels.get("feature") or ",".join(f["feature"] for f in alert.get("features", []))
    cause = (alert.get("diagnosis") or {}).get("root_cause")
    return (f"alert {alert['status']} {labels['severity']} {labels['alertname']} "
            f"model={labels['model']}" + (f" features={about}" if about else "")
            + (f" cause={cause}" if cause else "") + f" fingerprint={alert['fingerprint']}")


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
                 on_batch: Callable[[BatchResult], None] | None = None,
                 join_early: bool = False):
        self.config = config
        self.kafka_log = KafkaLogBridge()
        self.consumer = Consumer({**consumer_config(config.kafka), "logger": self.kafka_log,
                                  "error_cb": self._on_kafka_error})
        self.producer = Producer({**producer_config(config.kafka), "logger": self.kafka_log,
                                  "error_cb": self._on_kafka_error})
        self.assigned: set[tuple[str, int]] = set()
        self.broker_ok = False
        self.last_error = ""
        self._subscribed = False
        if join_early:
            # The group join takes seconds (on the embedded broker half the session
            # timeout): start it now, so it overlaps with loading the engine and the
            # references below. Callbacks only run inside consume() (and close()).
            self.subscribe()
        from .metrics import MonitorMetrics
        from .pipeline import Monitor
        self.metrics = metrics or MonitorMetrics(config.metrics)
        try:
            self.monitor = monitor or Monitor(config)
        except BaseException:  # e.g. a bad reference: leave the group before reporting it
            self.kafka_log.silenced = True  # the error is the one line to show, nothing else
            self.consumer.close()
            raise
        self.on_alert, self.on_batch = on_alert, on_batch
        self.stopping = threading.Event()
        self._retry: list[tuple[str, bytes | None, bytes, list, str]] = []
        self._undelivered = 0
        self._sequence = 0
        self._last_check = 0.0
        self.applied = Counter()     # events counted per model (for tests and the demo)
        self.http: HttpEndpoints | None = None
        self.push = None
        if config.alertmanager.url:
            from .sinks import AlertmanagerPush
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
        self.kafka_log.error(err)  # deduplicated: one line per state change

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
            else:
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
            self.kafka_log.reachable()
        except KafkaException as exc:
            self.broker_ok = False
            self.last_error = str(exc)
            err = exc.args[0] if exc.args else None
            self.kafka_log.unreachable(err.str() if isinstance(err, KafkaError) else str(exc),
                                       confirmed=True)
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
                self.kafka_log.error(err)
        if not messages:
            return 0
        self.broker_ok = True
        self.kafka_log.reachable()
        started = time.perf_counter()
        base = self._sequence
        self._sequence += len(messages)
        values = [m.value() or b"" for m in messages]
        result = self.monitor.process(values, range(base, base + len(messages)))
        _strip_positions(result)
        for line in map(window_line, result.reports):
            log.info("%s", line)
        for line in map(alert_line, result.alerts):
            log.info("%s", line)
        topics = Counter(m.topic() for m in messages)
        self._deliver(result, messages, base)
        self.metrics.record_batch(
            result, topics, time.perf_counter() - started, self.monitor.policy,
            {n: p.windows.open_events for n, p in self.monitor.models.items()},
            self.monitor.newest_event)
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
        if self._subscribed:  # again would make the group rebalance
            return
        self._subscribed = True
        self.consumer.subscribe(list(self.config.topics.inferences), on_assign=self._on_assign,
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
    problems = client_config_problems(cfg.kafka, cfg.source)
    if problems:
        raise ConfigError(problems)
    if cfg.http.port:  # a taken port fails before any Kafka client is started
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((cfg.http.host, cfg.http.port))
            except OSError as exc:
                raise ConfigError([http_port_problem(cfg, exc)]) from None
    sidecar = KafkaSidecar(cfg, join_early=True)
    try:
        http = sidecar.serve_http()
    except OSError as exc:
        sidecar.consumer.close()
        raise ConfigError([http_port_problem(cfg, exc)]) from None
    log.info("serving /metrics, /healthz and /readyz on %s:%d", cfg.http.host, http.port)
    install_signal_handlers(sidecar)
    try:
        sidecar.run()
    finally:
        http.stop()
    log.info("stopped cleanly")
    return 0


def http_port_problem(cfg: Config, exc: OSError) -> str:
    """The one line for an HTTP port that cannot be bound (usually: already in use)."""
    host, port = cfg.http.host, cfg.http.port
    why = exc.strerror or str(exc)
    hint = (" (another stream-monitor or the demo? choose another http.port, or 0 for any "
            "free port)" if exc.errno == errno.EADDRINUSE else "")
    return f"{cfg.source}: http.port: cannot listen on {host}:{port}: {why}{hint}"


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="consume inference events from Kafka (the sidecar)")
    r.add_argument("--config", required=True, help="YAML config file (see check-config)")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level of stderr lines (default: %(default)s)")
    r.set_defaults(func=_cmd_run)
    from . import demo
    demo.add_command(sub)
