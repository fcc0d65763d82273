"""Alerts reach people: monitor -> real Prometheus -> rules -> real Alertmanager -> webhook.

Also the optional direct push of alert events to Alertmanager's v2 API.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from helpers import wait_until

from stream_monitor.config import parse_config
from stream_monitor.io import synthetic
from stream_monitor.kafka.runtime import KafkaSidecar

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "rules" / "stream-monitor.rules.yml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"none of {names} on PATH: run `bash .ci/install-system-deps.sh` "
                "(Debian packages prometheus and prometheus-alertmanager)")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except OSError as exc:
        return getattr(exc, "code", 0) or 0, str(exc)




class Webhook:
    """An Alertmanager webhook receiver that records every notification."""

    def __init__(self):
        self.notifications: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, status: str) -> list[dict]:
        return [a for n in self.notifications for a in n["alerts"] if a["status"] == status]

    def close(self) -> None:
        self.server.shutdown()


class Service:
    """A real server process on a loopback port, waited for on /-/ready."""

    def __init__(self, cmd: list[str], port: int, log: Path):
        self.port, self.log = port, log
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        wait_until(lambda: _get(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 60,
              f"{cmd[0]} ready", lambda: log.read_text()[-3000:])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def alertmanager(tmp_path, webhook):
    binary = _binary("alertmanager", "prometheus-alertmanager")
    port = _free_port()
    cfg = {
        "route": {"receiver": "hook", "group_by": ["alertname", "model", "feature"],
                  "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [
            {"url": f"http://127.0.0.1:{webhook.port}/", "send_resolved": True}]}],
    }
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(cfg))
    svc = Service([binary, f"--config.file={path}", f"--storage.path={tmp_path / 'am-data'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                  port, tmp_path / "alertmanager.log")
    yield svc
    svc.stop()


def _prometheus(tmp_path: Path, monitor_port: int, am_port: int) -> Service:
    binary = _binary("prometheus")
    port = _free_port()
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "alerting": {"alertmanagers": [{"static_configs": [
            {"targets": [f"127.0.0.1:{am_port}"]}]}]},
        "scrape_configs": [{"job_name": "stream-monitor", "static_configs": [
            {"targets": [f"127.0.0.1:{monitor_port}"]}]}],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return Service([binary, f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{port}"], port, tmp_path / "prom.log")


def _sidecar(broker, reference: Path, extra: dict | None = None):
    tag = uuid.uuid4().hex[:8]
    topic = f"routing-in-{tag}"
    broker.create_topics({topic: 1, f"routing-alerts-{tag}": 1, f"routing-dlq-{tag}": 1})
    cfg = parse_config({
        "kafka": {"bootstrap.servers": broker.bootstrap_servers, "group.id": f"routing-{tag}",
                  "session.timeout.ms": 6000, "log.connection.close": False,
                  "auto.offset.reset": "earliest"},  # topics are filled before the join
        "topics": {"inferences": topic, "alerts": f"routing-alerts-{tag}",
                   "dead_letter": f"routing-dlq-{tag}"},
        "http": {"host": "127.0.0.1", "port": 0},
        "defaults": {"window": {"events": 2000}, "alerting": {"resolve_after": 2}},
        "models": {"churn": {"reference": str(reference)}},
        **(extra or {}),
    })
    sidecar = KafkaSidecar(cfg)
    http = sidecar.serve_http()
    thread = threading.Thread(target=sidecar.run, daemon=True)
    thread.start()
    return sidecar, http, thread, topic


def _produce(broker, topic: str, messages: list[bytes]) -> None:
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 10})
    for m in messages:
        p.produce(topic, m)
    assert p.flush(30) == 0


def _drifting_then_normal(now: float) -> tuple[list[bytes], list[bytes]]:
    drift = synthetic.Drift(at=4000, mean_shift={"f01": 1.0})
    first = [m for c in synthetic.generate(10_000, seed=31, drift=drift, start_ts=now,
                                           rate=1000) for m in c]
    back = [m for c in synthetic.generate(10_000, seed=32, start_index=10_000, start_ts=now,
                                          rate=1000) for m in c]
    return first, back


def test_drift_alert_routed_through_prometheus_and_alertmanager(
        kafka_broker, churn_reference_file, tmp_path, alertmanager, webhook):
    sidecar, http, thread, topic = _sidecar(kafka_broker, churn_reference_file)
    prom = _prometheus(tmp_path, http.port, alertmanager.port)

    def diagnostics() -> str:
        metrics = _get(f"http://127.0.0.1:{http.port}/metrics")[1]
        sev = [x for x in metrics.splitlines() if "feature_drift_severity{" in x and "f01" in x]
        return (f"prometheus alerts: {_get(prom.url('/api/v1/alerts'))[1][:2000]}\n"
                f"monitor: {sev}\nwebhook: {json.dumps(webhook.notifications)[:3000]}")

    def f01(status: str) -> list[dict]:
        return [a for a in webhook.alerts(status) if a["labels"].get("alertname") ==
                "FeatureDrift" and a["labels"].get("feature") == "f01"]

    try:
        drifting, normal = _drifting_then_normal(time.time())
        _produce(kafka_broker, topic, drifting)
        wait_until(lambda: f01("firing"), 90, "the firing FeatureDrift notification", diagnostics)
        alert = f01("firing")[0]
        assert alert["labels"]["model"] == "churn"
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["labels"]["job"] == "stream-monitor"
        assert "f01" in alert["annotations"]["summary"]
        # only the drifted feature alerts
        assert {a["labels"].get("feature") for a in webhook.alerts("firing")
                if a["labels"]["alertname"] == "FeatureDrift"} == {"f01"}
        _produce(kafka_broker, topic, normal)
        wait_until(lambda: f01("resolved"), 90, "the resolved notification", diagnostics)
        assert f01("resolved")[0]["labels"]["model"] == "churn"
    finally:
        prom.stop()
        sidecar.stop()
        thread.join(30)
        http.stop()


def test_direct_push_to_alertmanager(kafka_broker, churn_reference_file, alertmanager,
                                     webhook):
    sidecar, http, thread, topic = _sidecar(
        kafka_broker, churn_reference_file, {"alertmanager": {"url": alertmanager.url("")}})

    def active() -> list[dict]:
        body = _get(alertmanager.url("/api/v2/alerts?active=true&silenced=false"))[1]
        try:
            return [a for a in json.loads(body) if a["labels"].get("feature") == "f01"]
        except ValueError:
            return []

    try:
        drifting, normal = _drifting_then_normal(time.time())
        _produce(kafka_broker, topic, drifting)
        wait_until(lambda: active(), 60, "the pushed alert in Alertmanager",
              lambda: _get(alertmanager.url("/api/v2/alerts"))[1][:2000])
        labels = active()[0]["labels"]
        assert labels["alertname"] == "FeatureDrift" and labels["model"] == "churn"
        assert labels["severity"] in ("warning", "critical")
        wait_until(lambda: any(a["labels"].get("feature") == "f01"
                          for a in webhook.alerts("firing")), 30, "the firing notification")
        _produce(kafka_broker, topic, normal)
        wait_until(lambda: not active(), 60, "the alert resolved in Alertmanager",
              lambda: _get(alertmanager.url("/api/v2/alerts"))[1][:2000])
        wait_until(lambda: any(a["labels"].get("feature") == "f01"
                          for a in webhook.alerts("resolved")), 30, "the resolved notification")
    finally:
        sidecar.stop()
        thread.join(30)
        http.stop()
