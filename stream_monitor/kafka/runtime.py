"""Runtime: the Kafka sidecar loop (`run`) and its HTTP endpoints, kept thin and at the edge.

One consumer in a consumer group reads the inference topics in batches (a child process
owning the consumer consumes the next batch while the loop applies the current one,
fetch_process.py; or, with `consumer.prefetch: thread`, a fetch thread, `_Fetcher`),
hands each batch to the same `Monitor` as `replay`, sends rejects to the dead-letter
topic and alert events to the alert topic (idempotent producer) without waiting, and
commits a batch's offsets only once it is applied and everything it and every earlier
batch produced is delivered (at-least-once, on every exit path). A batch that makes the
monitor raise is rolled back and bisected so that only the poison messages are
dead-lettered. `/metrics`, `/healthz` and `/readyz` are served from one bounded server.

That is at-least-once mode. In exactly-once mode (the default, `processing.guarantee`)
the outputs go into an open Kafka transaction instead, and every `checkpoint.interval`
`_checkpoint` commits each model's state snapshot (changelog topic), the consumer
offsets it reflects and those outputs in one transaction; a failed transaction is
aborted and state and input rewound to the last checkpoint, and every assignment
restores the state from the changelog (`changelog.py`) before consuming.
"""

from __future__ import annotations

import argparse
import errno
import functools
import gc
import hashlib
import logging
import queue
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import make_wsgi_app

from stream_monitor.config import (
    Config,
    ConfigError,
    changelog_topic,
    load_config,
    partials_topic,
    transactional_id,
)

if TYPE_CHECKING:  # imported where used: `run` joins its group while the engine loads
    from stream_monitor.io.decode import Reject
    from stream_monitor.io.metrics import MonitorMetrics
    from stream_monitor.pipeline import BatchResult, Monitor

log = logging.getLogger("stream_monitor")

# Keys librdkafka only understands on one side; passing them to the other side only
# produces warnings, so the shared `kafka:` section is split here.
_CONSUMER_ONLY = {
    "group.id", "group.instance.id", "auto.offset.reset", "enable.auto.commit",
    "auto.commit.interval.ms", "enable.auto.offset.store", "session.timeout.ms",
    "heartbeat.interval.ms", "max.poll.interval.ms", "isolation.level",
    "partition.assignment.strategy", "group.protocol", "fetch.min.bytes",
    "fetch.max.bytes", "fetch.wait.max.ms", "max.partition.fetch.bytes",
    "enable.partition.eof", "check.crcs", "queued.min.messages", "fetch.queue.backoff.ms",
    "queued.max.messages.kbytes",
}
_PRODUCER_ONLY = {
    "acks", "enable.idempotence", "linger.ms", "batch.size", "batch.num.messages",
    "compression.type", "message.timeout.ms", "delivery.timeout.ms", "retries",
    "transactional.id", "queue.buffering.max.messages", "queue.buffering.max.ms",
    "transaction.timeout.ms",
}
_SERVICE_CHECK_SECONDS = 2.0
_HTTP_MAX_THREADS = 8          # concurrent HTTP connections served (more wait to be accepted)
_HTTP_TIMEOUT_SECONDS = 5.0    # an idle or slow HTTP client is dropped after this
_MAX_POISON = 10               # more failing messages in one batch: a fault, not poison
_MIN_TRUNCATED = 65_536        # truncated dead letter size when the broker refuses more


def consumer_config(kafka: dict[str, Any]) -> dict[str, Any]:
    # auto.offset.reset, session.timeout.ms and heartbeat.interval.ms come from the
    # config's `kafka:` defaults (config.KAFKA_DEFAULTS), so they are documented there.
    # fetch.queue.backoff.ms: once librdkafka's prefetch queue is full (64 MB, about
    # 100,000 events of 650 bytes) it waits this long before fetching again; its default
    # (1 s) is longer than `run` takes to drain the queue while catching up on a backlog,
    # so the loop stalled in consume() waiting for the next fetch (measured: 2-3 us an
    # event of the ~6; README "Benchmarks").
    cfg = {"topic.metadata.refresh.interval.ms": 10_000, "fetch.queue.backoff.ms": 20}
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
                self._seen.pop(old, None)  # (the fetch thread logs too)
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


class _BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, but at most `max_threads` at once, each with a timeout.

    While every worker is busy the accept loop waits (connections queue in the listen
    backlog), so idle or slow clients cannot make the process start unbounded threads;
    an idle connection is dropped after `_HTTP_TIMEOUT_SECONDS`.
    """

    daemon_threads = True
    max_threads = _HTTP_MAX_THREADS
    request_queue_size = 128  # connections waiting for a worker wait in the backlog

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_threads)
        super().server_activate()

    def process_request(self, request, client_address) -> None:
        while not self._slots.acquire(timeout=0.5):
            if getattr(self, "_BaseServer__shutdown_request", False):
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("http: error while serving %s", client_address[0], exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    timeout = _HTTP_TIMEOUT_SECONDS  # socket timeout: an idle connection is closed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class HttpEndpoints:
    """`/metrics` (Prometheus text format), `/healthz` (alive), `/readyz` (ready)."""

    def __init__(self, metrics: MonitorMetrics, ready: Callable[[], tuple[bool, str]],
                 host: str, port: int):
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._ready = ready
        self.server = make_server(host, port, self._app, _BoundedWSGIServer, _QuietHandler)
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, name="http",
                                        daemon=True)

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok, why = self._ready()  # a short reason: details are in the logs and metrics
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


@dataclass
class _Batch:
    """An applied batch: the offsets it may commit once its outputs are delivered."""

    offsets: dict[tuple[str, int], int]   # (topic, partition) -> next offset to read
    pending: int = 0                      # outputs produced, not yet delivered
    sealed: bool = False                  # every output of the batch has been produced
    since: float = 0.0                    # monotonic time its first output was produced


@dataclass
class _Output:
    """One dead letter or alert event on its way to a topic."""

    batch: _Batch
    topic: str
    key: bytes | None
    value: bytes
    headers: list
    kind: str                             # dead_letter | alert | retrain | window
    severity: str = ""
    attempts: int = 0
    retry_at: float = 0.0


@dataclass
class _Digest:
    """What `_fresh` needs of a consumed batch, taken without a Python step per message."""

    runs: list[tuple[tuple[str, int], int, int, int, int]]  # (tp, start, end, first, last)
    values: list[bytes]


def digest_batch(raw: list, one_topic: bool) -> _Digest | None:
    """The runs of one partition with rising offsets in a consumed batch, and the
    values; None when the batch holds an error or EOF event (the per-message pass
    handles those). A pure function of the batch: the fetch thread calls it."""
    n = len(raw)
    if not n:
        return None
    runs_of = getattr(raw, "runs", None)
    if runs_of is not None:  # a Frame from the fetch process: its arrays give the runs
        runs = runs_of(one_topic)
        return None if runs is None else _Digest(runs, raw.values)
    if any(map(Message.error, raw)):
        return None
    import numpy as np
    offs = np.fromiter(map(Message.offset, raw), np.int64, n)
    parts = list(map(Message.partition, raw))
    if one_topic:  # subscribed to one topic by name: every message is of it
        tops, single = None, raw[0].topic()
    else:
        tops = list(map(Message.topic, raw))
        single = tops[0] if tops.count(tops[0]) == n else None
    cut = offs[1:] <= offs[:-1]  # a run ends where the offset stops rising ...
    if single is None or parts.count(parts[0]) != n:  # ... or the partition changes
        key = np.array(parts, dtype=np.int64)
        if single is None:
            codes = {t: i for i, t in enumerate(dict.fromkeys(tops))}
            key = key * len(codes) + np.array(list(map(codes.__getitem__, tops)))
        cut |= key[1:] != key[:-1]
    cuts = (np.flatnonzero(cut) + 1).tolist()
    starts, ends = [0, *cuts], [*cuts, n]
    firsts, lasts = offs[starts].tolist(), offs[[e - 1 for e in ends]].tolist()
    runs = [((single if single is not None else tops[a], parts[a]), a, b, first, last)
            for a, b, first, last in zip(starts, ends, firsts, lasts, strict=True)]
    values = list(map(Message.value, raw))
    if not all(values):  # a null value (tombstone) is an empty message to the decoder
        values = [v or b"" for v in values]
    return _Digest(runs, values)


class _Job:
    """A consumer call the loop's thread asks the fetch thread to make."""

    __slots__ = ("fn", "args", "kwargs", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            self.error = exc
        self.done.set()


class _Fetcher:
    """A thread that consumes the next batch while the loop applies the current one.

    confluent-kafka builds a batch's message objects holding the GIL, but waiting for a
    fetch, and the engine's numpy work, release it: consuming overlaps with applying.
    It works in lockstep with the loop: the loop starts one consume() (`start`) as it
    takes a batch and waits for it (`join`) at a quiet point of its turn, before it
    uses the consumer itself; so at most one batch is fetched ahead, and nothing here
    touches the monitor's state. confluent-kafka lets one thread at a time into a
    consumer (another thread's call waits for the consume() in progress), and
    librdkafka runs the rebalance callbacks inside consume(), so on this thread: they
    are handed to the loop (`call`), which runs them while joining, in the order the
    single-threaded loop would, and the consumer calls they make are made back here
    (`run`), inside the callback, as they would be without this thread.
    """

    def __init__(self, consumer: Consumer, batch_size: int, timeout: float, one_topic: bool,
                 serve: Callable[[tuple], None]):
        self.consumer, self.batch_size, self.timeout = consumer, batch_size, timeout
        self.one_topic, self.serve = one_topic, serve
        self.inflight = False            # (loop) a consume() started and not joined yet
        self.slot: Any = None            # its result: (raw, digest), or an exception
        self.serving = False             # (loop) running a callback handed over
        self.calls: queue.SimpleQueue = queue.SimpleQueue()  # callbacks for the loop
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()   # consumer calls for this thread
        self._go = threading.Event()
        self._wake = threading.Event()   # a result or a callback is waiting for the loop
        self._done = False
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="kafka-fetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            if self.stopping:
                return
            try:
                raw = self.consumer.consume(self.batch_size, self.timeout)
                result: Any = (raw, digest_batch(raw, self.one_topic) if raw else None)
            except BaseException as exc:  # the loop raises it where it takes the batch
                result = exc
            self.slot, self._done = result, True
            self._wake.set()

    def start(self) -> None:
        """(loop) Consume the next batch now."""
        self.inflight, self._done = True, False
        self._go.set()

    def join(self) -> None:
        """(loop) Wait for the consume() in flight, running the callbacks it hands over."""
        while self.inflight:
            self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    item = self.calls.get_nowait()
                except queue.Empty:
                    break
                self.serve(item)
            if self._done:
                self.inflight = False

    def returned(self) -> bool:
        """(loop) Whether no consume() is in flight any more (its callbacks, if any, were
        run: consume() cannot return before), so joining will not wait."""
        return not self.inflight or self._done

    def take(self) -> tuple[list, _Digest | None]:
        """(loop) The batch consumed last (joined first); [] if none."""
        self.join()
        result, self.slot = self.slot, None
        if isinstance(result, BaseException):
            raise result
        return result if result is not None else ([], None)

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """(this thread, inside a rebalance callback) Run fn on the loop's thread and
        wait, making the consumer calls fn makes meanwhile (re-entrant: this thread is
        inside consume(), as the callback would be without this thread)."""
        done = threading.Event()
        self.calls.put((done, fn, args))
        self._wake.set()
        while not done.is_set():
            try:
                self.jobs.get(timeout=0.002).run()
            except queue.Empty:
                continue
        while True:
            try:
                self.jobs.get_nowait().run()
            except queue.Empty:
                return

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """(loop, running a callback handed over) fn(*args, **kwargs) on this thread."""
        job = _Job(fn, args, kwargs)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self) -> None:
        """(loop) Join what is in flight (its batch is dropped), end the thread."""
        self.join()
        self.slot, self.stopping = None, True
        self._go.set()
        self.thread.join(5.0)


class _RoutedConsumer:
    """The sidecar's consumer. While a callback handed over by the fetch thread runs on
    the loop's thread, its consumer calls are made on the fetch thread (which is inside
    consume()); a call from the loop while a consume() is in flight first joins it (the
    loop joins at quiet points of its turn before using the consumer, so this is only a
    safety net); otherwise calls are made directly."""

    def __init__(self, consumer: Consumer):
        self.consumer = consumer
        self.fetcher: _Fetcher | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.consumer, name)
        f = self.fetcher
        if f is None or not callable(attr) or threading.current_thread() is f.thread:
            return attr
        if f.serving:
            return functools.partial(f.run, attr)
        if f.inflight:
            log.debug("consumer.%s while a fetch is in flight: joining it first", name)
            f.join()
        return attr


class PoisonBatch(Exception):
    """Processing failed for too many messages of a batch one by one: not a poison
    message but a fault of the monitor itself; the batch is not committed."""


class TransactionFailed(Exception):
    """Exactly-once cannot go on (fenced by another instance with the same
    transactional.id, a fatal producer error, a rewind or restore that failed): the
    process exits; the open transaction is aborted, nothing of it is visible."""


class KafkaSidecar:
    """The `run` loop: consume a batch, apply it, produce what it produced, go on.

    Outputs are produced asynchronously while the next batches are consumed and
    applied; a batch's offsets are committed once its outputs and those of every
    earlier batch are delivered, never before (on every exit path too).
    """

    def __init__(self, config: Config, monitor: Monitor | None = None,
                 metrics: MonitorMetrics | None = None,
                 on_alert: Callable[[dict[str, Any]], None] | None = None,
                 on_batch: Callable[[BatchResult], None] | None = None,
                 join_early: bool = False):
        self.config = config
        self.kafka_log = KafkaLogBridge()
        self.eos = config.processing.guarantee == "exactly_once"
        ccfg = consumer_config(config.kafka)
        pcfg = producer_config(config.kafka)
        self._init_eos()
        if self.eos:
            # only committed input (e.g. labels written transactionally upstream)
            ccfg["isolation.level"] = "read_committed"
            pcfg["transactional.id"] = self.transactional_id
        self.fetch_mode = config.consumer.prefetch
        if self.fetch_mode == "process":  # the consumer lives in a child process
            from stream_monitor.kafka.fetch_process import FetchProcess
            self.consumer: Any = FetchProcess(ccfg, self.kafka_log, self._on_kafka_error,
                                              self._on_commit)
        else:
            self.consumer = _RoutedConsumer(Consumer({**ccfg, "logger": self.kafka_log,
                                                      "error_cb": self._on_kafka_error,
                                                      "on_commit": self._on_commit}))
        self.producer = Producer({**pcfg, "logger": self.kafka_log,
                                  "error_cb": self._on_kafka_error})
        # what the producer accepts, less room for the key, headers and framing
        self.max_value_bytes = max(1024, int(pcfg.get("message.max.bytes", 1_000_000)) - 4096)
        self.assigned: set[tuple[str, int]] = set()
        self.broker_ok = False
        self.last_error = ""
        self._batches: deque[_Batch] = deque()     # applied, not yet committed, in order
        self._committable: dict[tuple[str, int], int] = {}  # delivered up to, per partition
        self._retry: list[_Output] = []
        self._failing: set[str] = set()            # topics whose deliveries fail
        self._applied_upto: dict[tuple[str, int], int] = {}
        self._batch_firsts: dict[tuple[str, int], dict[int, int]] = {}
        self._rereading: set[tuple[str, int]] = set()
        self._paused = False
        self._subscribed = False
        self._one_topic = False    # subscribed to exactly one topic by name (_fresh_runs)
        # The next batch is consumed while this one is applied, by the child process
        # (`consumer.prefetch: process`, fetch_process.py) or a fetch thread (`thread`,
        # `_Fetcher`); False (`none`): consumed when the loop asks for it.
        self.prefetch = self.fetch_mode != "none"
        self._fetcher: Any = None
        if join_early:
            # The group join takes seconds (on the embedded broker half the session
            # timeout): start it now, so it overlaps with loading the engine and the
            # references below. Callbacks only run inside consume() (and close()).
            self.subscribe()
        from stream_monitor.io.metrics import MonitorMetrics
        from stream_monitor.pipeline import Monitor
        self.metrics = metrics or MonitorMetrics(config.metrics)
        self.metrics.reserve_models(list(config.models))
        try:
            self.monitor = monitor or Monitor(config)
        except BaseException:  # e.g. a bad reference: leave the group before reporting it
            self.kafka_log.silenced = True  # the error is the one line to show, nothing else
            self.consumer.close()
            raise
        self.on_alert, self.on_batch = on_alert, on_batch
        self.stopping = threading.Event()
        self._sequence = 0
        self._last_check = 0.0
        self._last_data = 0.0
        self._heartbeat = time.monotonic()
        self.undelivered_at_exit = 0
        self.applied = Counter()     # events counted per model (for tests and the demo)
        self.http: HttpEndpoints | None = None
        self.push = None
        if config.alertmanager.url:
            from stream_monitor.io.sinks import AlertmanagerPush
            self.push = AlertmanagerPush(config.alertmanager.url, config.alertmanager.timeout,
                                         on_failure=self.metrics.alert_failures.inc)
            # (the failure counter counts each failed alert once, not each retry)
        self.scale_out = None
        if config.scale_out.enabled:  # partial windows merged across instances
            from stream_monitor.kafka.scale_out import ScaleOut
            self.scale_out = ScaleOut(self)

    # -- state the endpoints report ----------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._heartbeat
        if stalled > max(10.0, 4 * self.config.consumer.poll_timeout):
            return False, f"consume loop stalled for {stalled:.0f}s"
        if not self.broker_ok:
            return False, "broker not reachable"
        if self.eos and not self._txn_ready:
            return False, "transactions not initialised"
        if not self.assigned:
            return False, "no partitions assigned yet"
        age = self.oldest_pending_age()
        if self._failing or age > self.config.delivery.stall_after:
            return False, f"outputs not delivered (oldest waiting {age:.0f}s)"
        return True, f"ready: {len(self.assigned)} partition(s) assigned"

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.last_error = err.str()
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT,
                          KafkaError._RESOLVE):
            self.broker_ok = False
            self.metrics.ready.set(0)
        self.kafka_log.error(err)  # deduplicated: one line per state change

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            log.warning("commit failed: %s", err.str())

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        self._paused = False  # a new assignment starts fetching
        log.info("assigned %s", sorted(self.assigned))
        if self.eos and partitions:  # before the first message of the assignment
            self._restore()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Hand over cleanly: deliver and commit what can be within a short bound. What
        # cannot be committed is re-read by whoever gets the partition; if that is this
        # instance again, `_applied_upto` keeps it from being applied twice.
        if self.eos:
            # the open transaction first: its offsets are still ours to commit
            self._checkpoint(rewind=False)
        else:
            bound = (0.0 if self.stopping.is_set()
                     else min(5.0, self.config.delivery.shutdown_grace))
            self._drain(time.monotonic() + bound)
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        for p in partitions:
            self._positions.pop((p.topic, p.partition), None)
            self._committed_positions.pop((p.topic, p.partition), None)
        for p in partitions:
            try:
                self.metrics.lag.remove(p.topic, str(p.partition))
            except KeyError:
                pass  # no lag reported for it yet

    # -- exactly-once: transactions, checkpoints, restore --------------------------------

    def _init_eos(self) -> None:
        """Exactly-once bookkeeping (also set, unused, in at-least-once mode)."""
        cfg = self.config
        self.transactional_id = transactional_id(cfg) if self.eos else ""
        self.changelog = changelog_topic(cfg)
        self._txn_ready = False           # init_transactions done
        self._txn_open = False
        self._txn_error: KafkaError | None = None
        self._run = uuid.uuid4().hex[:12]  # this process start, in `sm.txn` headers
        self._seq = 0                      # transactions begun by this process
        self._base_txn = ""                # the committed checkpoint the state descends from
        self._positions: dict[tuple[str, int], int] = {}            # applied up to
        self._committed_positions: dict[tuple[str, int], int] = {}  # at the last commit
        self._committed_state: dict[str, bytes] = {}
        self._committed_applied: Counter = Counter()
        self._since_commit = 0             # messages consumed since the last checkpoint
        self._last_commit = time.monotonic()
        self._checkpoint_wanted = False
        self._loop_failed = False
        self._pristine = True              # nothing applied yet: a fresh start keeps the monitor
        self._abort_streak = 0
        self._closing_by: float | None = None  # close(): transactional calls end by then
        self._resume_at = 0.0              # after an abort: back off before re-reading
        # Extra records committed in each checkpoint's transaction (e.g. partial windows
        # of scale-out): callables returning (topic, key, value, headers) tuples, called
        # after the state snapshots are produced and before the offsets are sent.
        self.checkpoint_records: list[Callable[[], Iterable[tuple[str, bytes | None, bytes,
                                                                  list]]]] = []
        # Called after an abort restored the state of the last checkpoint (and after a
        # restore on assignment): whoever keeps state beside the Monitor resets it here.
        self.on_rewind: list[Callable[[], None]] = []

    def _txn_name(self) -> str:
        return f"{self._run}:{self._seq}"

    def _txn_timeout(self) -> float:
        if self._closing_by is not None:  # shutting down: within the grace, whatever hangs
            return max(0.5, self._closing_by - time.monotonic())
        return max(10.0, self.config.delivery.shutdown_grace)

    def _start_eos(self) -> bool:
        """Before the first consume: the changelog exists and the transactional producer
        is initialised (which aborts a crashed predecessor's open transaction, so the
        committed offsets read at assignment are stable). False: retried next turn."""
        if self._txn_ready:
            return True
        from stream_monitor.kafka.changelog import ensure_topic
        done = ensure_topic(self.config.kafka, self.changelog, logger=self.kafka_log)
        if done != "exists":
            log.info("changelog topic %s: %s", self.changelog, done)
        try:
            self.producer.init_transactions(self._txn_timeout())
        except KafkaException as exc:
            err = exc.args[0]
            if err.fatal():
                raise
            self.kafka_log.unreachable(f"init_transactions: {err.str()}", confirmed=True)
            return False
        self._txn_ready = True
        log.info("exactly-once: transactional.id %s, changelog %s, checkpoint every %d "
                 "messages or %.1f s", self.transactional_id, self.changelog,
                 self.config.checkpoint.interval.events, self.config.checkpoint.interval.seconds)
        return True

    def _begin(self) -> None:
        if not self._txn_open:
            self.producer.begin_transaction()
            self._txn_open = True

    def request_checkpoint(self) -> None:
        """Commit at the next turn even without new input (e.g. a watermark moved)."""
        self._checkpoint_wanted = True

    def _checkpoint_due(self) -> bool:
        if not (self._since_commit or self._txn_open or self._checkpoint_wanted):
            return False
        every = self.config.checkpoint.interval
        return (self._since_commit >= every.events or self._checkpoint_wanted
                or time.monotonic() - self._last_commit >= every.seconds)

    def _checkpoint(self, rewind: bool = True) -> bool:
        """Commit one checkpoint: each model's snapshot to the changelog, the extra
        `checkpoint_records`, the consumer offsets the state reflects, and every output
        produced since the last checkpoint, in one Kafka transaction. On failure the
        transaction is aborted and state and input rewound to the last checkpoint
        (`rewind=False`: state only, for partitions being revoked). True when committed
        or nothing was to commit."""
        if not self.eos or not self._txn_ready:
            return True
        if not (self._since_commit or self._txn_open or self._checkpoint_wanted):
            return True
        if self._txn_error is not None:
            self._abort(f"a delivery failed: {self._txn_error.str()}", seek=rewind)
            return False
        started = time.perf_counter()
        offsets = {tp: o for tp, o in self._positions.items() if tp in self.assigned}
        name, now = self._txn_name(), time.time()
        from stream_monitor.kafka.changelog import headers, parts
        head = headers(offsets, name, self._base_txn, now)
        snaps: dict[str, bytes] = {}
        try:
            self._begin()
            # extra records first: scale-out takes its partial windows out of the monitor
            # here, so the snapshots below hold none that were also published
            for extra in self.checkpoint_records:
                for topic, key, value, hdrs in extra():
                    self._produce_raw(topic, key, value,
                                      [*(hdrs or []), ("sm.txn", name.encode())])
            for model in self.config.models:
                snaps[model] = data = self.monitor.snapshot(model)
                for key, piece, part_headers in parts(model, data):
                    self._produce_raw(self.changelog, key, piece, head + part_headers)
            if offsets:
                self.producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())],
                    self.consumer.consumer_group_metadata(), self._txn_timeout())
            self._commit_transaction()
        except KafkaException as exc:
            err = exc.args[0]
            self._abort(err.str() if isinstance(err, KafkaError) else str(err), seek=rewind,
                        fatal=isinstance(err, KafkaError) and err.fatal())
            return False
        self.producer.poll(0)  # delivery callbacks: alert counts, on_alert
        self._txn_open, self._seq = False, self._seq + 1
        self._base_txn = name
        self._committed_positions.update(offsets)
        self._committed_state = snaps
        self._committed_applied = Counter(self.applied)
        self._batches.clear()
        self._since_commit, self._checkpoint_wanted = 0, False
        self._last_commit = time.monotonic()
        self._abort_streak = 0
        self._failing.clear()
        m = self.metrics
        m.checkpoints.inc()
        m.checkpoint_age.set(0)
        for model, data in snaps.items():
            if m._models.admit(model):
                m.checkpoint_size.labels(model).set(len(data))
        log.debug("checkpoint %s committed in %.1f ms", name,
                  1000 * (time.perf_counter() - started))
        return True

    def _produce_raw(self, topic: str, key: bytes | None, value: bytes, hdrs: list) -> None:
        """Produce into the open transaction, waiting while the local queue is full."""
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=hdrs,
                                      on_delivery=self._raw_delivered)
                return
            except BufferError:
                self.producer.poll(0.1)

    def _raw_delivered(self, err: KafkaError | None, msg) -> None:
        if err is not None and self._txn_error is None:
            self._txn_error = err

    def _commit_transaction(self) -> None:
        """commit_transaction, retried while the error says a retry may succeed."""
        for attempt in range(3):
            try:
                self.producer.commit_transaction(self._txn_timeout())
                return
            except KafkaException as exc:
                err = exc.args[0]
                if (attempt == 2 or not err.retriable() or err.txn_requires_abort()
                        or self._closing_by is not None):
                    raise

    def _abort(self, why: str, seek: bool = True, fatal: bool = False) -> None:
        """Abort the open transaction and go back to the last committed checkpoint:
        the monitor's state restored from its snapshots, the consumer rewound to its
        offsets, so the re-done batches count once."""
        self.metrics.txn_aborts.inc()
        self._abort_streak += 1
        if fatal:  # fenced (another instance with this transactional.id) or worse
            log.error("transaction failed fatally (%s): exiting; the open transaction is "
                      "aborted by the broker or the next instance", why)
            raise TransactionFailed(f"fatal transaction error: {why}")
        log.warning("transaction aborted (%s): state and input rewound to checkpoint %s",
                    why, self._base_txn or "(start)")
        if self._txn_open:
            try:
                self.producer.abort_transaction(self._txn_timeout())
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal():
                    raise TransactionFailed(f"fatal transaction error: {err.str()}") from exc
                log.warning("abort_transaction failed (%s)", err.str())
        self._txn_open, self._txn_error, self._seq = False, None, self._seq + 1
        self._rebuild(self._committed_state)
        self.applied = Counter(self._committed_applied)
        self._batches.clear()
        self._since_commit, self._checkpoint_wanted = 0, False
        self._last_commit = time.monotonic()
        self._applied_upto.clear()
        self._batch_firsts.clear()
        self._rereading.clear()
        self._positions = dict(self._committed_positions)
        backoff = min(self.config.delivery.retry_backoff_max, 2.0 ** (self._abort_streak - 1))
        self._resume_at = time.monotonic() + (backoff if self._abort_streak > 1 else 0.0)
        if seek:
            tps = [TopicPartition(t, p, off)
                   for (t, p), off in sorted(self._committed_positions.items())
                   if (t, p) in self.assigned]
            fetcher = self._fetcher
            if fetcher is not None:  # what it consumed ahead is from before the rewind
                fetcher.join()       # (a no-op: the loop joined before its checkpoint)
                fetcher.slot = None
            self._seek(tps)
        for hook in self.on_rewind:
            hook()

    def _seek(self, tps: list[TopicPartition]) -> None:
        consumer = self.consumer  # routed: from a handed-over callback, on the fetch thread
        for tp in tps:
            try:
                consumer.seek(tp)
            except KafkaException as exc:
                raise TransactionFailed(f"cannot rewind {tp.topic}[{tp.partition}] to offset "
                                        f"{tp.offset}: {exc.args[0].str()}") from exc

    def _rebuild(self, states: dict[str, bytes]) -> None:
        """A fresh Monitor (same config and references) holding `states`: models
        without a snapshot start empty."""
        from stream_monitor.pipeline import Monitor
        old = self.monitor
        refs = {n: p.reference for n, p in old.models.items()
                if self.config.models[n].reference is not None}
        mon = Monitor(self.config, refs, labels=old.performance is not None)
        for model, data in states.items():
            if model in self.config.models:
                mon.restore(model, data)
        self.monitor = mon

    def _pin_latest(self, tps: list[TopicPartition], committed: dict[tuple[str, int], int],
                    timeout: float) -> None:
        """A partition without a committed offset, with `auto.offset.reset: latest`,
        starts at its end as of now (the assignment, when the monitor turns ready), not
        whenever the fetcher first asks: outputs produced just after readiness are read.
        The start is assigned explicitly and is the rewind target of the first abort."""
        reset = str(self.config.kafka.get("auto.offset.reset", "latest"))
        cooperative = "cooperative" in str(self.config.kafka.get(
            "partition.assignment.strategy", ""))
        if reset not in ("latest", "largest", "end") or cooperative:
            return
        pinned, needed = [], False
        for tp in tps:
            key = (tp.topic, tp.partition)
            if key not in committed:
                _, high = self.consumer.get_watermark_offsets(tp, timeout=timeout)
                committed[key], needed = high, True
            pinned.append(TopicPartition(tp.topic, tp.partition, committed[key]))
        if needed:
            self.consumer.assign(pinned)

    def _restore(self) -> None:
        """On assignment: the committed offsets, and the changelog read to its end;
        each model restored from its snapshot at exactly those offsets."""
        from stream_monitor.kafka.changelog import choose, read_changelog
        from stream_monitor.kafka.state import StateError
        started = time.perf_counter()
        if self._txn_open:  # not committed at revocation: it cannot be any more
            self._abort("reassigned with a transaction open", seek=False)
        tps = [TopicPartition(t, p) for t, p in sorted(self.assigned)]
        timeout = self.config.checkpoint.restore_timeout
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in self.consumer.committed(tps, timeout=timeout) if tp.offset >= 0}
        group_offsets = dict(committed)
        self._pin_latest(tps, committed, timeout)
        records = read_changelog(self.config.kafka, self.changelog, timeout, self.kafka_log)
        chosen = choose(records, group_offsets)
        for model in chosen.mismatched:
            log.warning("changelog %s: no snapshot of %s at the committed offsets; restoring "
                        "its newest (offsets reset by hand?)", self.changelog, model)
        try:
            if chosen.states or not self._pristine:
                self._rebuild(chosen.states)
        except StateError as exc:
            raise TransactionFailed(f"cannot restore from the changelog {self.changelog}: {exc}") \
                from None
        self._positions = dict(committed)
        self._committed_positions = dict(committed)
        self._committed_state = {m: self.monitor.snapshot(m) for m in self.config.models}
        self._committed_applied = Counter(self.applied)
        bases = {r.txn for r in chosen.records.values()}
        self._base_txn = min(bases) if len(bases) == 1 else ",".join(sorted(bases))
        self._since_commit = 0
        self._last_commit = time.monotonic()
        for hook in self.on_rewind:
            hook()
        took = time.perf_counter() - started
        self.metrics.restore_seconds.set(took)
        log.info("restored %d model(s) from %s (%d record(s) read) at offsets %s in %.2f s",
                 len(chosen.states), self.changelog, chosen.read,
                 {f"{t}[{p}]": o for (t, p), o in sorted(committed.items())} or "(none)", took)

    # -- delivery ---------------------------------------------------------------------

    def oldest_pending_age(self) -> float:
        for b in self._batches:
            if b.pending:
                return time.monotonic() - b.since
        return 0.0

    def pending_outputs(self) -> int:
        return sum(b.pending for b in self._batches)

    def _produce(self, out: _Output) -> None:
        def delivered(err, msg, out=out):
            if err is None:
                self._delivered(out)
            else:
                self._failed(out, err)

        out.attempts += 1
        if self.eos:
            if self._txn_error is not None:
                return  # the transaction is doomed: aborted and re-done at the checkpoint
            try:
                self._begin()
            except KafkaException as exc:
                self._txn_error = exc.args[0]
                return
            out.headers = [*out.headers, ("sm.txn", self._txn_name().encode())]
        give_up = time.monotonic() + 5.0
        while True:
            try:
                self.producer.produce(out.topic, value=out.value, key=out.key,
                                      headers=out.headers, on_delivery=delivered)
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self.producer.poll(0.2)
                if self.eos and time.monotonic() > give_up:
                    self._txn_error = KafkaError(KafkaError._QUEUE_FULL)
                    return
                if self.stopping.is_set() or time.monotonic() > give_up:
                    out.retry_at = time.monotonic() + 1.0  # later, from the retry list
                    self._retry.append(out)
                    return
            except KafkaException as exc:  # e.g. an invalid or unknown topic
                self._failed(out, exc.args[0])
                return

    def _delivered(self, out: _Output) -> None:
        out.batch.pending -= 1
        if out.topic in self._failing:
            self._failing.discard(out.topic)
            log.info("deliveries to %s succeed again", out.topic)
        if out.kind == "alert":
            self.metrics.alerts.labels(out.severity).inc()
            if self.on_alert is not None:
                self.on_alert(orjson.loads(out.value))
        elif out.kind == "dead_letter":
            self.metrics.dead_letters.inc()

    def _failed(self, out: _Output, err: KafkaError) -> None:
        self.metrics.alert_failures.inc()
        if self.eos:
            # a failed delivery makes the transaction abortable: the checkpoint aborts it,
            # rewinds and re-does the batches (no retry inside the doomed transaction)
            if self._txn_error is None:
                log.warning("delivery to %s failed (%s): the transaction will be aborted and "
                            "its input re-read", out.topic, err.str())
            self._txn_error = self._txn_error or err
            self._failing.add(out.topic)
            return
        if (err.code() == KafkaError.MSG_SIZE_TOO_LARGE and out.kind == "dead_letter"
                and len(out.value) > _MIN_TRUNCATED):
            # the broker's limit is below the producer's: send a smaller truncated copy
            out.value, out.headers = _truncate(out.value, out.headers, _MIN_TRUNCATED)
            self.metrics.truncated.inc()
            out.retry_at = 0.0
        else:
            backoff = min(self.config.delivery.retry_backoff_max, 2.0 ** (out.attempts - 1))
            out.retry_at = time.monotonic() + backoff
            if out.topic not in self._failing:
                self._failing.add(out.topic)
                log.warning("delivery to %s failed (%s); retrying with backoff up to %.0fs, "
                            "offsets are not committed past it", out.topic, err.str(),
                            self.config.delivery.retry_backoff_max)
        self._retry.append(out)

    def _resend_due(self) -> None:
        if not self._retry:
            return
        now = time.monotonic()
        due = [o for o in self._retry if o.retry_at <= now]
        if due:
            self._retry = [o for o in self._retry if o.retry_at > now]
            for out in due:
                self._produce(out)

    def _commit_delivered(self, asynchronous: bool = True) -> None:
        """Commit the offsets of the leading batches whose outputs are all delivered."""
        if self.eos:  # offsets are committed in the checkpoint's transaction only
            return
        offsets: dict[tuple[str, int], int] = {}
        while self._batches and self._batches[0].sealed and self._batches[0].pending == 0:
            offsets.update(self._batches.popleft().offsets)
        self._committable.update(offsets)
        # partitions revoked meanwhile are not ours to commit (the new owner re-reads them)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()
               if (t, p) in self.assigned]
        if not tps:
            return
        try:
            self.consumer.commit(offsets=tps, asynchronous=asynchronous)
        except KafkaException as exc:
            log.warning("commit failed: %s", exc.args[0].str())

    def _pump(self, commit: bool = True) -> None:
        """Serve delivery callbacks, resend what is due, commit what is delivered
        (`commit=False`: at the next turn)."""
        self.producer.poll(0)
        self._resend_due()
        if commit:
            self._commit_delivered()
        self.metrics.pending.set(self.pending_outputs())
        self.metrics.oldest_pending.set(self.oldest_pending_age())
        self.metrics.uncommitted.set(len(self._batches))

    def _drain(self, deadline: float, asynchronous: bool = False) -> bool:
        """Deliver and commit everything applied, until `deadline`; True when all is."""
        while True:
            self.producer.poll(0.05)
            self._resend_due()
            self._commit_delivered(asynchronous)
            if not self._batches or time.monotonic() >= deadline:
                return not self._batches
            if not self._batches[0].sealed:  # a batch that failed: it will never be
                return False

    def _final_commit_and_leave(self) -> None:
        """Commit (synchronously) every delivered batch's offsets, then leave the group.
        Runs in a thread that `close` waits for within the grace: against a hung broker
        either call can block far longer."""
        tps = [TopicPartition(t, p, o) for (t, p), o in self._committable.items()
               if (t, p) in self.assigned]
        if tps and not self.eos:
            try:
                self.consumer.commit(offsets=tps, asynchronous=False)
            except KafkaException as exc:
                log.warning("final commit failed: %s", exc.args[0].str())
        self.consumer.close()

    def _deliver(self, result: BatchResult, messages: list, base: int, batch: _Batch) -> None:
        topics = self.config.topics
        outputs = []
        for rej in result.rejects:
            msg = messages[rej.position - base]
            headers = [("reason", _h(rej.reason)), ("detail", _h(rej.detail[:1000])),
                       ("source.topic", _h(msg.topic())),
                       ("source.partition", str(msg.partition()).encode()),
                       ("source.offset", str(msg.offset()).encode())]
            if rej.model:
                headers.append(("model", _h(rej.model)))
            if rej.feature:
                headers.append(("feature", _h(rej.feature)))
            value = rej.raw
            if len(value) > self.max_value_bytes:
                value, headers = _truncate(value, headers, self.max_value_bytes)
                self.metrics.truncated.inc()
            outputs.append(_Output(batch, topics.dead_letter, msg.key(), value, headers,
                                   "dead_letter"))
        for alert in result.alerts:
            outputs.append(_Output(
                batch, topics.alerts, alert["fingerprint"].encode(), orjson.dumps(alert),
                [("kind", alert["kind"].encode()), ("status", alert["status"].encode())],
                "alert", alert["labels"]["severity"]))
        for record in result.retrain:  # retraining requests and refusals (performance.py)
            outputs.append(_Output(batch, topics.retrain, record["id"].encode(),
                                   orjson.dumps(record),
                                   [("decision", record["decision"].encode())], "retrain"))
        if topics.windows:  # closed windows' reports, as replay writes them to windows.jsonl
            for report in result.reports:
                outputs.append(_Output(
                    batch, topics.windows, report["model"].encode(),
                    orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY),
                    [("index", str(report["window"].get("index")).encode())], "window"))
        batch.pending += len(outputs)
        batch.since = time.monotonic()
        for out in outputs:
            self._produce(out)
        batch.sealed = True

    # -- applying a batch ---------------------------------------------------------------

    def _process(self, values: list[bytes], positions: range,
                 is_label: list[bool] | None) -> BatchResult:
        from stream_monitor.kafka.label_topic import process_batch
        return process_batch(self.monitor, values, positions, is_label)

    def _apply(self, values: list[bytes], positions: range,
               is_label: list[bool] | None = None) -> BatchResult:
        """`Monitor.process`, with poison messages isolated instead of crashing the loop.

        When a batch raises, the monitor is rolled back and the batch is split in
        halves, recursively, until the message(s) that raise are found: those become
        `processing_error` rejects (dead-lettered), the rest is applied once. More than
        `_MAX_POISON` such messages in one batch is a fault of the monitor, not of the
        data: `PoisonBatch` is raised and nothing of the batch is committed.
        """
        checkpoint = self.monitor.checkpoint()
        try:
            return self._process(values, positions, is_label)
        except Exception as exc:
            self.monitor.rollback(checkpoint)
            log.error("a batch of %d messages failed (%s: %s); isolating the message(s) "
                      "that cause it", len(values), type(exc).__name__, exc)
        from stream_monitor.pipeline import BatchResult
        result, poison = BatchResult(), []
        mid = len(values) // 2
        self._bisect(values[:mid], positions[:mid], _part(is_label, 0, mid), result, poison)
        self._bisect(values[mid:], positions[mid:], _part(is_label, mid, None), result, poison)
        result.rejects += poison
        result.messages = len(values)
        log.error("dead-lettering %d message(s) the monitor cannot process", len(poison))
        return result

    def _bisect(self, values: list[bytes], positions: range, is_label: list[bool] | None,
                result: BatchResult, poison: list[Reject]) -> None:
        if not values:
            return
        checkpoint = self.monitor.checkpoint()
        try:
            result.extend(self._process(values, positions, is_label))
            return
        except Exception as exc:
            self.monitor.rollback(checkpoint)
            if len(values) == 1:
                detail = f"{type(exc).__name__}: {exc}"[:500]
                from stream_monitor.io.decode import PROCESSING_ERROR, Reject
                poison.append(Reject(positions[0], PROCESSING_ERROR, values[0], detail=detail))
                if len(poison) > _MAX_POISON:
                    raise PoisonBatch(f"more than {_MAX_POISON} messages of one batch fail; "
                                      f"last: {detail}") from exc
                return
        mid = len(values) // 2
        self._bisect(values[:mid], positions[:mid], _part(is_label, 0, mid), result, poison)
        self._bisect(values[mid:], positions[mid:], _part(is_label, mid, None), result, poison)

    # -- the loop ---------------------------------------------------------------------

    def _service_checks(self) -> None:
        """Every couple of seconds: broker reachability, readiness and consumer lag."""
        now = time.monotonic()
        if now - self._last_check < _SERVICE_CHECK_SECONDS:
            return
        self._last_check = now
        # a metadata round trip proves the broker answers; while data keeps arriving
        # that is proven already, and the call costs a busy loop time
        if now - self._last_data > _SERVICE_CHECK_SECONDS or not self.broker_ok:
            try:
                self.consumer.list_topics(timeout=1.0)
                self.broker_ok = True
                self.kafka_log.reachable()
            except KafkaException as exc:
                self.broker_ok = False
                self.last_error = str(exc)
                err = exc.args[0] if exc.args else None
                self.kafka_log.unreachable(
                    err.str() if isinstance(err, KafkaError) else str(exc), confirmed=True)
        self.metrics.ready.set(1 if self.readiness()[0] else 0)
        if self.eos:
            self.metrics.checkpoint_age.set(now - self._last_commit)
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
            # what is applied, not what the fetch thread has consumed ahead of it
            pos = min(pos, self._applied_upto.get((tp.topic, tp.partition), pos))
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - pos))

    def _backpressure(self) -> None:
        """Stop fetching while too many outputs wait for delivery; resume after."""
        full = self.pending_outputs() >= self.config.delivery.max_pending
        if full == self._paused:
            return
        try:
            parts = self.consumer.assignment()
            if full:
                self.consumer.pause(parts)
                log.warning("%d outputs wait for delivery: fetching paused",
                            self.pending_outputs())
            else:
                self.consumer.resume(parts)
                log.info("outputs delivered: fetching resumed")
            self._paused = full
        except KafkaException as exc:
            log.warning("pause/resume failed: %s", exc.args[0].str())

    def _fresh(self, raw: list, digest: _Digest | None = None
               ) -> tuple[list, list[bytes], dict, Counter]:
        """The messages of a consumed batch not applied yet by this instance, their
        values, the next offset per partition and the count per topic.

        The usual batch (no error, nothing below what was applied) takes C-level `map`s
        over the batch (`digest_batch`, done by the fetch thread) and a few steps per run
        of one partition (`_fresh_runs`); any other batch the per-message pass
        (`_fresh_each`). Both give the same result.
        """
        fast = self._fresh_runs(raw, digest)
        return fast if fast is not None else self._fresh_each(raw)

    def _fresh_runs(self, raw: list, digest: _Digest | None = None
                    ) -> tuple[list, list[bytes], dict, Counter] | None:
        """`_fresh` without a Python step per message, or None when the batch needs
        the per-message pass: an error or EOF event in it, or a run of one partition
        (offsets rising) that starts below what this instance applied (a re-read).
        """
        if digest is None:
            digest = digest_batch(raw, self._one_topic)
        if digest is None:
            return None
        upto = self._applied_upto
        for tp, _, _, first, _ in digest.runs:
            if first < upto.get(tp, -1):
                return None
        offsets: dict[tuple[str, int], int] = {}
        topics: Counter = Counter()
        firsts = self._batch_firsts
        for tp, a, b, first, last in digest.runs:
            if tp not in offsets:  # first of the batch: remembered to spot a re-read
                marks = firsts.setdefault(tp, {})
                marks[first] = _fingerprint(raw[a])
                if len(marks) > 1000:  # only recent batches can come back
                    for old in sorted(marks)[:500]:
                        del marks[old]
            offsets[tp] = last + 1
            topics[tp[0]] += b - a
            self._rereading.discard(tp)
        for key, next_offset in offsets.items():
            if next_offset > upto.get(key, -1):
                upto[key] = next_offset
        return raw, digest.values, offsets, topics

    def _fresh_each(self, raw: list) -> tuple[list, list[bytes], dict, Counter]:
        """`_fresh`, one message at a time (one pass).

        After a failed commit (assignment lost in an outage) the same messages come back
        from the last committed offset: this instance already applied them, so they are
        skipped, not counted twice. A re-read is recognised by the first message of an
        uncommitted batch coming back unchanged at its offset; if other data shows up
        at an offset already seen (the topic was recreated), it is read as new data.
        """
        messages, values, offsets, topics = [], [], {}, Counter()
        skipped: dict[tuple[str, int], int] = {}
        upto, firsts = self._applied_upto, self._batch_firsts
        tp, limit, part, topic = None, -1, None, None
        for m in raw:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self.kafka_log.error(err)
                continue
            offset = m.offset()
            if m.partition() != part or m.topic() != topic:  # a new run of one partition
                part, topic = m.partition(), m.topic()
                tp = (topic, part)
                limit = upto.get(tp, -1)
                if tp not in offsets:  # first of the batch: remembered to spot a re-read
                    marks = firsts.setdefault(tp, {})
                    if offset >= limit:
                        marks[offset] = _fingerprint(m)
                        if len(marks) > 1000:  # only recent batches can come back
                            for old in sorted(marks)[:500]:
                                del marks[old]
            if offset < limit and not self._is_reread(tp, offset, m):
                limit = upto.get(tp, -1)
            offsets[tp] = offset + 1
            if offset < limit:
                skipped[tp] = skipped.get(tp, 0) + 1
                continue
            self._rereading.discard(tp)
            messages.append(m)
            values.append(m.value() or b"")
            topics[topic] += 1
        for key, next_offset in offsets.items():
            if next_offset > upto.get(key, -1):
                upto[key] = next_offset
        if skipped:
            n = sum(skipped.values())
            self.metrics.reread_skipped.inc(n)
            log.info("skipped %d message(s) this instance had already applied", n)
        return messages, values, offsets, topics

    def _is_reread(self, tp: tuple[str, int], offset: int, msg) -> bool:
        """Whether a message below what was applied is one this instance saw."""
        if tp in self._rereading:
            return True
        if self._batch_firsts.get(tp, {}).get(offset) == _fingerprint(msg):
            self._rereading.add(tp)
            return True
        log.warning("%s[%d] went back to offset %d with other data (topic recreated?): "
                    "reading it as new", tp[0], tp[1], offset)
        self._applied_upto.pop(tp, None)
        self._batch_firsts[tp] = {offset: _fingerprint(msg)}
        return False

    # -- consuming: on a fetch thread, one batch ahead of the loop ----------------------

    @property
    def fetch_thread(self) -> threading.Thread | None:
        return self._fetcher.thread if self._fetcher is not None else None

    @property
    def fetch_process(self) -> Any:
        """The child process consuming for the loop (`FetchProcess`), if any."""
        return self.consumer if self.fetch_mode == "process" else None

    def _in_loop(self, handler: Callable[..., None], *args: Any) -> None:
        """A rebalance callback: run on the loop's thread (the fetch thread, inside
        consume(), waits for it), so it never overlaps with applying a batch."""
        fetcher = self._fetcher
        if fetcher is not None and threading.current_thread() is fetcher.thread:
            fetcher.call(handler, *args)
        else:
            handler(*args)

    def _serve_call(self, item: tuple) -> None:
        done, handler, args = item
        fetcher = self._fetcher
        fetcher.serving = True
        try:
            handler(*args)  # an exception ends the loop; the fetch thread goes on
        finally:
            fetcher.serving = False
            done.set()

    def _join_fetch(self) -> None:
        """At a quiet point of the turn, before the loop uses the consumer: wait for the
        consume() in flight, running the rebalance callbacks it hands over."""
        if self._fetcher is not None:
            self._fetcher.join()

    def _next_batch(self) -> tuple[list, _Digest | None]:
        """The next consumed batch (and its digest), or ([], None) after poll_timeout;
        the fetch thread then consumes the one after while this one is applied."""
        cfg = self.config.consumer
        if not self.prefetch:
            return self.consumer.consume(cfg.batch_size, cfg.poll_timeout), None
        fetcher = self._fetcher
        if fetcher is None and self.fetch_mode == "process":
            fetcher = self._fetcher = self.consumer.ahead(cfg.batch_size, cfg.poll_timeout)
        elif fetcher is None:
            fetcher = self._fetcher = _Fetcher(self.consumer.consumer, cfg.batch_size,
                                               cfg.poll_timeout, self._one_topic,
                                               self._serve_call)
            self.consumer.fetcher = fetcher
        if not fetcher.inflight and fetcher.slot is None:
            fetcher.start()
        raw, digest = fetcher.take()
        if raw:
            fetcher.start()
        return raw, digest

    def _stop_fetcher(self) -> None:
        """End the fetch thread (at close): the batch it consumed ahead is not applied
        (its offsets were never committed); callbacks it hands over meanwhile are run."""
        fetcher = self._fetcher
        if fetcher is None:
            return
        while True:  # until its consume() has returned: it holds the consumer till then
            try:
                fetcher.stop()
                break
            except Exception:
                log.exception("a rebalance callback failed while stopping")
        if self.fetch_mode != "process":
            self.consumer.fetcher = None
        self._fetcher = None

    def poll_once(self) -> int:
        """Consume, apply and hand over the outputs of one batch; returns its size."""
        cfg = self.config.consumer
        self._heartbeat = time.monotonic()
        self.metrics.heartbeat.set(time.time())
        self._join_fetch()  # the batch consumed ahead (and its callbacks) before all else
        self._service_checks()
        if self.push is not None and self.push.due():
            self.push.send([])
        self._pump()
        self._backpressure()
        if self.eos and (not self._start_eos() or time.monotonic() < self._resume_at):
            time.sleep(cfg.poll_timeout)  # transactions not ready, or backing off
            return 0
        if self.scale_out is not None:
            self.scale_out.tick()
        raw, digest = self._next_batch()
        if not raw:
            if self.eos and self._checkpoint_due():
                self._checkpoint()
            return 0
        self._last_data = time.monotonic()
        messages, values, offsets, topics = self._fresh(raw, digest)
        partials: list = []
        if self.scale_out is not None and (not hasattr(messages, "has_topic")
                                           or messages.has_topic(self.scale_out.topic)):
            # other instances' partial windows: to the merger
            messages, values, partials = self.scale_out.split(messages, values)
        batch = _Batch(offsets)
        self._batches.append(batch)
        if not messages and not partials:  # only re-reads: nothing to apply, but the
            # offsets may be committed
            batch.sealed = True
            if self.eos:
                self._track_positions(raw, offsets)
            return 0
        self.broker_ok = True
        self.kafka_log.reachable()
        started = time.perf_counter()
        base = self._sequence
        self._sequence += len(messages)
        labels_topic = self.config.topics.labels
        if not labels_topic:
            is_label = None
        elif hasattr(messages, "topic_mask"):  # a Frame: from its topic codes
            is_label = messages.topic_mask(labels_topic)
        else:
            is_label = [m.topic() == labels_topic for m in messages]
        if messages or not partials:
            result = self._apply(values, range(base, base + len(messages)), is_label)
        else:  # only partials in this batch
            from stream_monitor.pipeline import BatchResult
            result = BatchResult()
        if self.scale_out is not None:
            self.scale_out.applied(result)
            if partials:
                result.extend(self.scale_out.apply(partials))
        _strip_positions(result)
        for line in map(window_line, result.reports):
            log.info("%s", line)
        for line in map(alert_line, result.alerts):
            log.info("%s", line)
        self._deliver(result, messages, base, batch)
        if self.eos:  # applied and handed to the transaction: part of the next checkpoint
            self._pristine = False
            self._track_positions(raw, offsets)
        self.metrics.record_batch(
            result, topics, time.perf_counter() - started,
            self.monitor.policy,
            {n: p.windows.open_events for n, p in self.monitor.models.items()},
            self.monitor.newest_event)
        if self.monitor.performance is not None:
            from stream_monitor.io.metrics import record_performance
            record_performance(self.metrics, result, self.monitor)
        self.applied.update(result.events)
        if self.push is not None and (result.alerts or self.push.due()):
            if self.push.due() or not self.push.pending:
                self.push.send(result.alerts)
            else:  # backing off: queue them for the next attempt
                self.push.queue(result.alerts)
        # The commit uses the consumer: only once the fetch in flight has returned (it
        # has, unless the topic is drained and it waits for more); else next turn.
        fetched = self._fetcher is None or self._fetcher.returned()
        if fetched and not self.eos:
            self._join_fetch()
        self._pump(commit=fetched)
        if self.on_batch is not None:
            self.on_batch(result)
        if self.eos and self._checkpoint_due():
            self._join_fetch()
            self._checkpoint()
        return len(messages)

    def _track_positions(self, raw: list, offsets: dict[tuple[str, int], int]) -> None:
        """Exactly-once: where each partition's applied input ends, and where it started
        when the group had no committed offset for it (the rewind target)."""
        self._since_commit += len(raw)
        if offsets.keys() - self._committed_positions.keys():
            for m in raw:
                tp = (m.topic(), m.partition())
                if tp not in self._committed_positions and m.error() is None:
                    self._committed_positions[tp] = m.offset()
        self._positions.update(offsets)

    def subscribe(self) -> None:
        if self._subscribed:  # again would make the group rebalance
            return
        self._subscribed = True
        labels = [self.config.topics.labels] if self.config.topics.labels else []
        if self.config.scale_out.enabled:  # the internal topics exist before the join
            from stream_monitor.kafka.scale_out import ensure_topics
            ensure_topics(self)
            labels.append(partials_topic(self.config))
        topics = list(self.config.topics.inferences) + labels
        self._one_topic = len(topics) == 1 and not topics[0].startswith("^")
        self.consumer.subscribe(
            topics, on_assign=lambda c, p: self._in_loop(self._on_assign, c, p),
            on_revoke=lambda c, p: self._in_loop(self._on_revoke, c, p),
            on_lost=lambda c, p: self._in_loop(self._on_lost, c, p))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # the group session expired (e.g. a broker outage): nothing can be committed for
        # these partitions any more; re-reads are skipped by `_applied_upto`
        log.warning("partitions lost: %s", sorted((p.topic, p.partition) for p in partitions))
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        if self.eos and (self._txn_open or self._since_commit):
            # their offsets cannot be committed any more (another member may own them):
            # abort, and restore from the changelog at the next assignment
            self._abort("partitions lost", seek=False)

    def run(self) -> bool:
        """Run until `stop()` (or SIGTERM/SIGINT when installed), then shut down within
        `delivery.shutdown_grace`. True when every output was delivered and committed."""
        self.subscribe()
        # Everything built so far (engine, references, clients, metrics) is moved out of
        # the cyclic GC's reach while the loop runs: each batch's rollback checkpoint (and,
        # with the fetch thread, the batch consumed ahead) lives across a batch, gets
        # promoted, and triggers full collections that walked the whole heap (measured
        # in `run`: 0.26-0.32 us an event of GC, 0.03 with the heap frozen; the engine
        # alone 0.01). Unfrozen on the way out, so a process that goes on (tests, the
        # demo) collects it again. (Rarer young collections, every 20,000 allocations,
        # took the fetch thread's 0.20 us an event of GC away but measured no faster.)
        gc.collect()
        gc.freeze()
        try:
            while not self.stopping.is_set():
                self.poll_once()
        except BaseException:
            # exactly-once: the state may hold part of the failed batch; nothing more is
            # committed, the restart resumes from the last checkpoint
            self._loop_failed = True
            raise
        finally:
            try:
                clean = self.close()
            finally:
                gc.unfreeze()
        return clean

    def close(self) -> bool:
        """Deliver and commit what was applied (bounded by the shutdown grace), publish
        pending alerts, leave the group. Offsets of undelivered outputs are never
        committed. True when nothing was left undelivered."""
        deadline = time.monotonic() + self.config.delivery.shutdown_grace
        self._stop_fetcher()  # the consumer is this thread's again
        if self.eos and self._loop_failed:
            delivered = False
            if self._txn_open:
                try:
                    self.producer.abort_transaction(min(5.0, self._txn_timeout()))
                except KafkaException as exc:
                    log.warning("abort_transaction failed (%s)", exc.args[0].str())
                self._txn_open = False
            self._txn_ready = False  # nothing more is committed on the way out
        elif self.eos:
            # the last checkpoint: state, offsets and outputs committed together (or,
            # failing that, aborted: a restart resumes from the previous checkpoint)
            self._closing_by = deadline - min(5.0, self.config.delivery.shutdown_grace / 3)
            try:
                delivered = self._checkpoint(rewind=False)
            except TransactionFailed as exc:
                log.error("%s", exc)
                delivered = False
        else:
            # keep part of the grace for the final commit and leaving the group
            delivered = self._drain(
                deadline - min(5.0, self.config.delivery.shutdown_grace / 3),
                asynchronous=True)
        if self.push is not None and self.push.pending:
            self.push.retry_at = 0.0  # one last attempt before exiting
            if not self.push.send([]):
                log.error("shutting down with %d alert(s) not pushed to Alertmanager",
                          len(self.push.pending))
        self.undelivered_at_exit = self.pending_outputs() + sum(
            1 for b in self._batches if not b.sealed)
        if not delivered:
            log.error("shutting down with %d undelivered output(s); the offsets of %d "
                      "batch(es) from the first one not delivered on are not committed",
                      self.pending_outputs(), len(self._batches))
        # leaving the group can hang while the broker is unreachable: bounded too
        closer = threading.Thread(target=self._final_commit_and_leave, name="consumer-close",
                                  daemon=True)
        closer.start()
        closer.join(max(1.0, deadline - time.monotonic()))
        if closer.is_alive():
            log.error("leaving the consumer group timed out; exiting anyway")
        self.metrics.ready.set(0)
        return delivered

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def serve_http(self) -> HttpEndpoints:
        self.http = HttpEndpoints(self.metrics, self.readiness, self.config.http.host,
                                  self.config.http.port)
        self.http.start()
        return self.http


def _fingerprint(msg) -> int:
    return hash((msg.value(), msg.timestamp()[1]))


def _h(text: str) -> bytes:
    """A header value (never fails on odd text)."""
    return text.encode("utf-8", "replace")


def _truncate(value: bytes, headers: list, limit: int) -> tuple[bytes, list]:
    """A copy of a reject that fits: the first `limit` bytes, flagged, with the original
    size and the SHA-256 of the full message in headers (set once, on the first cut)."""
    known = {k for k, _ in headers}
    if "truncated" not in known:
        headers = [*headers, ("truncated", b"true"),
                   ("original.size", str(len(value)).encode()),
                   ("original.sha256", hashlib.sha256(value).hexdigest().encode())]
    return value[:limit], headers


def _part(mask: list[bool] | None, lo: int, hi: int | None) -> list[bool] | None:
    return None if mask is None else mask[lo:hi]


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
        clean = sidecar.run()
    except Exception:
        log.exception("the consume loop failed; only batches applied and delivered were "
                      "committed")
        return 1
    finally:
        http.stop()
    if not clean:
        log.error("stopped with %d output(s) undelivered, their offsets not committed: "
                  "exit 1", sidecar.undelivered_at_exit)
        return 1
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
    from stream_monitor import demo
    demo.add_command(sub)
