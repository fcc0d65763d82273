"""`run` operated as a sidecar, against the real embedded broker (issue 10): a fresh start
is ready within 5 s, starts at the end of the topic, says what it does in one line per
window and alert, and stays quiet (one line per state change) while the broker is away."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from confluent_kafka import KafkaError, Producer
from helpers import wait_until

from stream_monitor.io import synthetic
from stream_monitor.kafka.broker import EmbeddedBroker, _free_port
from stream_monitor.kafka.runtime import KafkaLogBridge

pytestmark = pytest.mark.integration

# The bound for a fresh `run` against the embedded broker, measured from process
# start (interpreter start and imports included) to /readyz answering 200.
READY_BOUND_SECONDS = 5.0


class _Run:
    """`stream-monitor run` as a child process, its stderr collected line by line."""

    def __init__(self, config: Path, log_level: str = "info"):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_monitor", "run", "--config", str(config),
             "--log-level", log_level], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def port(self) -> int:
        wait_until(lambda: "serving /metrics" in self.text(), 30, "the HTTP line", self.text)
        line = next(ln for _, ln in self.lines if "serving /metrics" in ln)
        return int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reader.join(5)


def _status(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _config(path: Path, kafka: dict, reference: Path, topic: str, **extra) -> Path:
    doc = {"kafka": kafka, "topics": {"inferences": topic, "alerts": f"{topic}-alerts",
                                      "dead_letter": f"{topic}-dlq"},
           "http": {"host": "127.0.0.1", "port": 0},
           "models": {"churn": {"reference": str(reference)}}, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def _produce(bootstrap: str, topic: str, messages: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    for m in messages:
        p.produce(topic, m)
    assert p.flush(30) == 0


# A raw librdkafka line on stderr looks like "%3|1700000000.123|FAIL|rdkafka#consumer-1|..."
RAW_LIBRDKAFKA = re.compile(r"^%\d\|")


def test_fresh_run_is_ready_within_5s_starts_at_the_end_and_logs_windows_and_alerts(
        kafka_broker, churn_reference_file, tmp_path):
    topic = f"ops-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topics({topic: 1, f"{topic}-alerts": 1, f"{topic}-dlq": 1})
    # history already on the topic: a fresh monitor must not judge it (issue 10.7)
    history = [m for chunk in synthetic.generate(3000, seed=41) for m in chunk]
    _produce(kafka_broker.bootstrap_servers, topic, history[:-1])
    # alone in its batch: Tansu answers ListOffsets(latest) with the last batch's base
    # offset + 1 (broker.py), which is the true end only for a one-record batch
    _produce(kafka_broker.bootstrap_servers, topic, history[-1:])
    # the README's config: brokers and group only; everything else from the defaults
    cfg = _config(tmp_path / "c.yaml", {"bootstrap.servers": kafka_broker.bootstrap_servers,
                                        "group.id": f"ops-{uuid.uuid4().hex[:8]}"},
                  churn_reference_file, topic, defaults={"window": {"events": 2000}})
    run = _Run(cfg)
    try:
        port = run.port()
        wait_until(lambda: _status(port, "/readyz")[0] == 200, 60, "ready", run.text)
        ready_after = time.monotonic() - run.started
        assert ready_after < READY_BOUND_SECONDS, (ready_after, run.text())

        live = [m for chunk in synthetic.generate(
            6000, seed=42, drift=synthetic.default_drift(2000)) for m in chunk]
        _produce(kafka_broker.bootstrap_servers, topic, live)
        wait_until(lambda: "alert firing" in run.text(), 60, "an alert line", run.text)
        wait_until(lambda: run.text().count("window closed: model=churn") >= 3, 30,
                   "three window lines", run.text)
        status, metrics = _status(port, "/metrics")
    finally:
        run.stop()
    assert run.proc.returncode == 0, run.text()
    # only the 6,000 events produced after the start were counted, not the history
    counted = [ln for ln in metrics.splitlines() if ln.startswith("stream_monitor_events_total")]
    assert counted == ['stream_monitor_events_total{model="churn"} 6000.0'], (status, counted)
    lines = [line for _, line in run.lines]
    windows = [ln for ln in lines if "window closed: model=churn" in ln]
    assert len(windows) == 3, windows
    assert " INFO " in windows[0] and "events=2000" in windows[0]
    assert "drifting=0" in windows[0] and "severity=ok" in windows[0]
    drifted = windows[1]
    assert "drifting=5" in drifted and "severity=critical" in drifted
    for feature in ("f01", "f04", "f09", "f12", "plan"):
        assert feature in drifted
    alerts = [ln for ln in lines if " alert " in ln]
    assert alerts and " INFO " in alerts[0] and "FeatureDrift model=churn" in alerts[0]
    assert re.search(r"fingerprint=[0-9a-f]{16}", alerts[0])
    assert not any(RAW_LIBRDKAFKA.match(ln) for ln in lines), run.text()


def test_broker_outage_is_one_line_per_state_change(churn_reference_file, tmp_path):
    port = _free_port()  # nothing listens here yet: the broker is "down" from the start
    bootstrap = f"127.0.0.1:{port}"
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    kafka = {"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}"}
    info = _Run(_config(tmp_path / "info.yaml", kafka, churn_reference_file, topic))
    quiet = _Run(_config(tmp_path / "quiet.yaml", kafka, churn_reference_file, topic),
                 log_level="error")
    broker = EmbeddedBroker(port=port)
    try:
        wait_until(lambda: "unreachable" in info.text(), 60, "the unreachable line", info.text)
        time.sleep(4.0)  # librdkafka retries many times a second meanwhile
        down = info.text().splitlines()
        quiet_down = quiet.text().splitlines()
        broker.start()
        broker.create_topics({topic: 1, f"{topic}-alerts": 1, f"{topic}-dlq": 1})
        wait_until(lambda: "reachable again" in info.text(), 120, "the back line", info.text)
    finally:
        info.stop()
        quiet.stop()
        broker.stop()
    # while down: the HTTP line and exactly one warning (before: ~40 lines a second)
    assert len(down) == 2, down
    assert "serving /metrics" in down[0]
    assert "WARNING" in down[1] and "broker unreachable" in down[1] and "retrying" in down[1]
    # with --log-level error nothing at all (before: ~19 raw librdkafka lines a second)
    assert quiet_down == [], quiet_down
    lines = info.text().splitlines()
    assert sum("broker unreachable" in ln for ln in lines) == 1, "\n".join(lines)
    assert sum("reachable again" in ln for ln in lines) == 1, "\n".join(lines)
    assert not any(RAW_LIBRDKAFKA.match(ln) for ln in lines + quiet.text().splitlines())


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_bridge_reminds_periodically_and_rate_limits_repeats(caplog):
    clock = _Clock()
    bridge = KafkaLogBridge(logging.getLogger("test.kafka"), reminder=60.0, clock=clock)
    caplog.set_level(logging.INFO, logger="test.kafka")
    fail = "[thrd:x]: 127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: refused"
    down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
    for _ in range(50):  # librdkafka's retries within the first minute
        bridge.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", fail)
        bridge.error(KafkaError(KafkaError._TRANSPORT, "Disconnected"))
        bridge.error(down)
        clock.now += 1.0
    assert [r.getMessage() for r in caplog.records] == [
        "kafka: broker unreachable (1/1 brokers are down); retrying"]
    clock.now += 15.0  # 65 s after the first failure: one reminder
    bridge.error(down)
    bridge.unreachable("Failed to get metadata", confirmed=True)
    assert len(caplog.records) == 2
    assert "still unreachable after 65 s" in caplog.records[1].getMessage()
    bridge.reachable()
    bridge.reachable()
    assert len(caplog.records) == 3
    assert caplog.records[2].levelno == logging.INFO
    assert "reachable again after 65 s" in caplog.records[2].getMessage()
    # a late "all brokers down" right after that (librdkafka queues its errors until the
    # next poll) is not a new outage; a failed request of our own is
    clock.now += 1.0
    bridge.error(down)
    assert len(caplog.records) == 3
    bridge.unreachable("Failed to get metadata", confirmed=True)
    assert len(caplog.records) == 4 and "broker unreachable" in caplog.records[3].getMessage()
    bridge.reachable()
    # one broker of a cluster refusing connections is not an outage (debug only)
    caplog.clear()
    clock.now += 10.0
    for _ in range(20):
        bridge.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", fail)
    assert caplog.records == []
    # any other line: at its level, once per minute per kind, with the count of repeats
    caplog.clear()
    caplog.set_level(logging.INFO, logger="test.kafka")
    for offset in range(10):
        bridge.log(logging.WARNING, "%s [%s] %s", "COMMITFAIL", "c",
                   f"Offset commit failed for offset {offset}")
    clock.now += 61.0
    bridge.log(logging.WARNING, "%s [%s] %s", "COMMITFAIL", "c", "Offset commit failed for 11")
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert msgs == [
        (logging.WARNING, "kafka COMMITFAIL: Offset commit failed for offset 0"),
        (logging.WARNING, "kafka COMMITFAIL: Offset commit failed for 11")], msgs
    clock.now += 61.0
    bridge.log(logging.WARNING, "%s [%s] %s", "COMMITFAIL", "c", "Offset commit failed for 12")
    assert caplog.records[-1].getMessage().endswith("for 12")
    bridge.log(logging.WARNING, "%s [%s] %s", "COMMITFAIL", "c", "Offset commit failed for 13")
    clock.now += 61.0
    bridge.log(logging.WARNING, "%s [%s] %s", "COMMITFAIL", "c", "Offset commit failed for 14")
    assert caplog.records[-1].getMessage().endswith("for 14 (1 more like it since)")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.slow
def test_demo_live_view_ends_ready_with_a_rate_and_leaves_no_files(tmp_path):
    """The live view as a terminal shows it (rich's TTY_COMPATIBLE), default port."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "200", "TMPDIR": str(tmp),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "stream_monitor", "demo", "--duration", "14",
                           "--drift-after", "5", "--rate", "3000"], capture_output=True,
                          text=True, timeout=180, env=env, cwd=tmp_path)
    out = ANSI.sub("", proc.stdout)
    assert proc.returncode == 0, out + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # a free port was picked and printed
    assert re.search(r"serving metrics at http://127\.0\.0\.1:\d+/metrics", out), out
    heads = re.findall(r"stream-monitor demo +\d+s +produced ([\d,]+) +counted ([\d,]+) +"
                       r"([\d,]+) events/s( on average)? +windows \d+ +(.*)", out)
    assert heads, out
    *running, final = heads
    # the final frame: the run was ready (not "no partitions assigned yet" after close)
    assert final[3] == " on average" and final[4].startswith("finished (was ready"), final
    counted, rate = (int(final[i].replace(",", "")) for i in (1, 2))
    assert counted > 10_000 and rate > 0, final
    # while events were counted, the live rate never read 0
    assert all(int(r.replace(",", "")) > 0 for _, c, r, _, _ in running[-5:]
               if int(c.replace(",", "")) > 5000), running[-5:]
    assert "FeatureDrift" in out and "DataQuality" in out
    # everything the demo wrote is gone (references, training files, the broker's log)
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())
