"""`stream-monitor demo`: a real broker, synthetic traffic with drift, the live monitor.

Starts the embedded Kafka-protocol broker (or uses --bootstrap-servers), creates the
topics, builds references for two models from synthetic training data, produces
inference traffic for both, injects drift after a while (a covariate shift in
`churn`, a feature going missing in `fraud`) and runs the sidecar loop with a live
terminal view of throughput, windows, drifting features and published alerts.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import Producer

from stream_monitor.config import ProfileConfig, parse_config

if TYPE_CHECKING:  # the engine is imported when the demo runs, not when the CLI starts
    from stream_monitor.io import synthetic

MODELS = ("churn", "fraud")


def _drift(model: str, at: int) -> synthetic.Drift:
    from stream_monitor.io import synthetic
    if model == "churn":
        return synthetic.Drift(at=at, mean_shift={"f01": 0.8, "f04": 0.8, "f09": 0.8},
                               categorical={"plan": synthetic.SHIFTED_PLAN})
    return synthetic.Drift(at=at, missing={"f07": 0.7})


class Traffic(threading.Thread):
    """Produces inference events for both models at a steady rate."""

    def __init__(self, bootstrap: str, topic: str, rate: float, drift_after: float):
        super().__init__(name="traffic", daemon=True)
        from stream_monitor.kafka.runtime import KafkaLogBridge
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                                  "log.connection.close": False, "logger": KafkaLogBridge()})
        self.topic, self.rate, self.drift_after = topic, rate, drift_after
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        from stream_monitor.io import synthetic
        per_model = self.rate / len(MODELS)
        at = int(per_model * self.drift_after)
        gens = [synthetic.generate(10**9, seed=100 + i, model=m, drift=_drift(m, at),
                                   start_ts=time.time(), rate=per_model, chunk=500)
                for i, m in enumerate(MODELS)]
        started = time.monotonic()
        while not self.stop.is_set():
            for gen in gens:
                for value in next(gen):
                    while True:
                        try:
                            self.producer.produce(self.topic, value)
                            break
                        except BufferError:
                            self.producer.poll(0.1)
                    self.sent += 1
            self.producer.poll(0)
            ahead = self.sent / self.rate - (time.monotonic() - started)
            if ahead > 0:
                self.stop.wait(ahead)
        self.producer.flush(5)


class LiveView:
    """What the demo shows: rates, windows, drifting features, alerts."""

    def __init__(self, sidecar, traffic: Traffic, metrics_url: str):
        self.sidecar, self.traffic, self.url = sidecar, traffic, metrics_url
        self.alerts: deque[dict[str, Any]] = deque(maxlen=12)
        self.latest: dict[str, dict[str, Any]] = {}
        self.windows = 0
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque()  # (time, events counted)
        self.rate = 0.0
        # the state shown once the run is over (the sidecar is closed by then, so asking
        # it would report "no partitions assigned" after a good run)
        self.final: tuple[bool, str] | None = None

    def on_batch(self, result) -> None:
        for report in result.reports:
            self.latest[report["model"]] = report
            self.windows += 1

    def on_alert(self, alert: dict[str, Any]) -> None:
        self.alerts.append(alert)

    RATE_SECONDS = 3.0

    def tick(self) -> None:
        """Events/s over the last few seconds: batches arrive in bursts, so a rate over
        one tick (or one second) swings between 0 and several times the real rate."""
        now, counted = time.monotonic(), sum(self.sidecar.applied.values())
        self._samples.append((now, counted))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.RATE_SECONDS:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        if now - t0 >= 0.5:
            self.rate = (counted - c0) / (now - t0)

    def finish(self) -> None:
        """Freeze what the final frame shows: readiness and the average rate of the run."""
        self.tick()
        self.final = self.sidecar.readiness()
        counted = sum(self.sidecar.applied.values())
        self.rate = counted / max(time.monotonic() - self.started, 1e-9)

    def _state(self) -> tuple[str, str]:
        ready, why = self.final or self.sidecar.readiness()
        text = ("ready" if ready else f"not ready ({why})")
        if self.final is not None:
            text = f"finished (was {text})"
        return text, ("green" if ready else "yellow")

    def render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
        state = self._state()
        rate = "events/s on average" if self.final is not None else "events/s"
        head = Text.assemble(
            ("stream-monitor demo", "bold"), f"  {time.monotonic() - self.started:5.0f}s  ",
            f"produced {self.traffic.sent:,}  counted {sum(self.sidecar.applied.values()):,}  ",
            f"{self.rate:,.0f} {rate}  windows {self.windows}  ", state,
            f"\nmetrics: {self.url}")
        models = Table(title="latest window per model", expand=True)
        for col in ("model", "window", "drifting features (method score)", "data quality"):
            models.add_column(col)
        for name, r in sorted(self.latest.items()):
            feats = r["features"]
            drifting = ", ".join(f"{n} ({feats[n]['method']} {feats[n]['value']:.2f})"
                                 for n in r["dataset"]["drifted_features"][:6]) or "none"
            dq = ", ".join(f"{n}: {c} {q['value']:.0%}" for n, f in feats.items()
                           for c, q in f["data_quality"].items() if q["severity"] != "ok")
            models.add_row(name, f"#{r['window']['index']} ({r['window']['events']} events)",
                           drifting, dq or "ok")
        alerts = Table(title="alerts published to the alert topic", expand=True)
        for col in ("status", "severity", "alert", "model", "about", "cause"):
            alerts.add_column(col)
        for a in self.alerts:
            about = a["labels"].get("feature") or ", ".join(
                f["feature"] for f in a.get("features", [])[:6]) or "-"
            alerts.add_row(a["status"], a["labels"]["severity"], a["labels"]["alertname"],
                           a["labels"]["model"], about,
                           (a.get("diagnosis") or {}).get("root_cause", ""))
        return Group(head, models, alerts)

    def line(self) -> str:
        return (f"{time.monotonic() - self.started:5.0f}s produced {self.traffic.sent} "
                f"counted {sum(self.sidecar.applied.values())} {self.rate:.0f} events/s "
                f"windows {self.windows} alerts {len(self.alerts)} {self._state()[0]}")


def _references(directory: Path) -> dict[str, Path]:
    from stream_monitor.core.reference import build_reference
    from stream_monitor.io import synthetic
    out = {}
    for i, model in enumerate(MODELS):
        train = synthetic.write_jsonl(directory / f"{model}-train.jsonl", 30_000, seed=10 + i,
                                      model=model)
        path = directory / f"{model}.json"
        build_reference(train, model, ProfileConfig()).save(path)
        train.unlink()  # ~19 MB each; only the reference is needed from here on
        out[model] = path
    return out


def _check_port(host: str, port: int) -> None:
    """Fail before starting anything when the chosen HTTP port is taken."""
    from stream_monitor.cli import UsageError
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            hint = (" (a stream-monitor `run`? leave --port out: the demo then picks a free "
                    "port)" if exc.errno == errno.EADDRINUSE else "")
            raise UsageError(f"--port {port}: cannot listen on {host}:{port}: "
                             f"{exc.strerror}{hint}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from stream_monitor.cli import UsageError
    from stream_monitor.kafka.runtime import KafkaSidecar, install_signal_handlers
    logging.basicConfig(level=logging.ERROR)
    for flag, value in (("--rate", args.rate), ("--window", args.window)):
        if value <= 0:
            raise UsageError(f"{flag}: must be positive (got {value})")
    for flag, value in (("--duration", args.duration), ("--drift-after", args.drift_after)):
        if value < 0:
            raise UsageError(f"{flag}: must be 0 or more (got {value})")
    if args.port:
        _check_port("127.0.0.1", args.port)
    console = Console(stderr=False)
    broker = None
    bootstrap = args.bootstrap_servers
    # everything the demo writes (references, the broker's log) goes here and is removed
    work_dir = tempfile.TemporaryDirectory(prefix="stream-monitor-demo-")
    if not bootstrap:
        from stream_monitor.kafka.broker import EmbeddedBroker
        broker = EmbeddedBroker(log_path=str(Path(work_dir.name) / "tansu.log"))
        console.print("starting the embedded Kafka-protocol broker (Tansu)...")
        try:
            broker.start()
        except RuntimeError as exc:
            work_dir.cleanup()
            raise UsageError(f"demo: {str(exc).splitlines()[0]}") from None
        bootstrap = broker.bootstrap_servers
    else:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        from stream_monitor.kafka.runtime import KafkaLogBridge
        try:
            AdminClient({"bootstrap.servers": bootstrap, "logger": KafkaLogBridge(
                logging.getLogger("stream_monitor.demo.probe"))}).list_topics(timeout=10)
        except KafkaException:
            work_dir.cleanup()
            raise UsageError(f"--bootstrap-servers {bootstrap}: no Kafka broker answers there "
                             "(within 10 s)") from None
    topics = {"inferences": "inferences", "alerts": "model-alerts",
              "dead_letter": "model-events-dlq"}
    try:
        if broker is not None:
            broker.create_topics({"inferences": 2, "model-alerts": 1, "model-events-dlq": 1})
        work = Path(work_dir.name)
        console.print(f"building references for {', '.join(MODELS)} in {work} ...")
        refs = _references(work)
        cfg = parse_config({
            # earliest: the traffic starts before the group has joined; nothing is skipped
            "kafka": {"bootstrap.servers": bootstrap, "group.id": "stream-monitor-demo",
                      "log.connection.close": False, "auto.offset.reset": "earliest"},
            "topics": {"inferences": [topics["inferences"]], "alerts": topics["alerts"],
                       "dead_letter": topics["dead_letter"]},
            "http": {"host": "127.0.0.1", "port": args.port},
            "defaults": {"window": {"events": args.window}},
            "models": {m: {"reference": str(p)} for m, p in refs.items()},
        })
        sidecar = KafkaSidecar(cfg)
        try:
            http = sidecar.serve_http()
        except OSError as exc:  # taken since _check_port: still one line
            sidecar.consumer.close()
            raise UsageError(f"--port {args.port}: cannot listen on 127.0.0.1:{args.port}: "
                             f"{exc.strerror}") from None
        url = f"http://127.0.0.1:{http.port}/metrics"
        traffic = Traffic(bootstrap, topics["inferences"], args.rate, args.drift_after)
        view = LiveView(sidecar, traffic, url)
        sidecar.on_batch, sidecar.on_alert = view.on_batch, view.on_alert
        console.print(f"Kafka at {bootstrap}; serving metrics at {url}")
        console.print(f"producing {args.rate:,.0f} events/s for {', '.join(MODELS)}; drift "
                      f"starts after {args.drift_after:.0f}s. Ctrl-C to stop.")
        install_signal_handlers(sidecar)
        sidecar.subscribe()
        traffic.start()
        deadline = time.monotonic() + args.duration if args.duration else float("inf")
        try:
            if console.is_terminal:
                from rich.live import Live
                with Live(view.render(), console=console, refresh_per_second=4) as live:
                    while not sidecar.stopping.is_set() and time.monotonic() < deadline:
                        sidecar.poll_once()
                        view.tick()
                        live.update(view.render())
            else:
                shown, last_line = 0, 0.0
                while not sidecar.stopping.is_set() and time.monotonic() < deadline:
                    sidecar.poll_once()
                    view.tick()
                    for a in list(view.alerts)[shown:]:
                        about = a["labels"].get("feature") or ",".join(
                            f["feature"] for f in a.get("features", []))
                        cause = (a.get("diagnosis") or {}).get("root_cause")
                        print(f"ALERT {a['status']} {a['labels']['severity']} "
                              f"{a['labels']['alertname']} model={a['labels']['model']} "
                              f"features={about}" + (f" cause={cause}" if cause else ""),
                              flush=True)
                    shown = len(view.alerts)
                    if time.monotonic() - last_line > 5:
                        print(view.line(), flush=True)
                        last_line = time.monotonic()
        finally:
            view.finish()
            traffic.stop.set()
            traffic.join(10)
            sidecar.close()
            http.stop()
        console.print(view.render() if console.is_terminal else view.line())
        console.print(f"done: {sum(sidecar.applied.values()):,} events counted, "
                      f"{view.windows} windows, {len(view.alerts)} alert events shown")
    finally:
        if broker is not None:
            broker.stop()
        work_dir.cleanup()
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="embedded broker + synthetic drifting traffic + live view")
    d.add_argument("--duration", type=float, default=0,
                   help="seconds to run (default: until Ctrl-C)")
    d.add_argument("--bootstrap-servers",
                   help="use this Kafka instead of the embedded broker (default: embedded)")
    d.add_argument("--rate", type=float, default=4000,
                   help="events/s produced, all models together (default: %(default)s)")
    d.add_argument("--drift-after", type=float, default=20,
                   help="seconds before drift starts (default: %(default)s)")
    d.add_argument("--window", type=int, default=2000,
                   help="events per window (default: %(default)s)")
    d.add_argument("--port", type=int, default=0,
                   help="HTTP port for /metrics (default: 0, any free port; it is printed)")
    d.set_defaults(func=_cmd_demo)
