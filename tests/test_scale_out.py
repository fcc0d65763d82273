"""Scale-out on the embedded broker: 1, 2 or 3 `run` instances over a 6-partition topic
give the window reports and alerts of one `replay`; instances joining and leaving
mid-stream lose and duplicate nothing.

The instances are `KafkaSidecar` objects in threads of this process (real consumer
group, real transactions, read_committed readers). The stream is `test_partials`'s:
three models interleaved, sparse keys, nulls, booleans, Cauchy tails, 5,000 categories,
a drift off the window grid. A tail of events 2,000 s later on every partition moves
every watermark past the stream, so all of its windows close (the tail's own windows
stay open, here and, flushed, in `replay`, and are not compared). The tail is produced
once the stream is applied: an instance's watermark is the newest event time of all
its partitions, so a tail read early on one partition would make the others' events
late (the allowed lateness, 600 s, covers the stream's 7 minutes, and so any skew).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml
from confluent_kafka import Producer
from helpers import read_topic, wait_until
from test_partials import MAKERS, PARTITIONS, build_references, make_stream

from stream_monitor.cli import main as cli_main
from stream_monitor.config import parse_config
from stream_monitor.io.replay import replay
from stream_monitor.kafka.runtime import KafkaSidecar
from stream_monitor.pipeline import Monitor

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 6_000
TAIL_AFTER = 2_000.0


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, str]:
    return build_references(tmp_path_factory.mktemp("scale-refs"), 4000)


def _stream(seed: int) -> tuple[list[bytes], np.ndarray, float]:
    lines, parts = make_stream(seed, N_EVENTS, gap=0.07)     # 7 minutes of event time
    last = max(orjson.loads(x)["ts"] for x in lines if x.startswith(b"{\""))
    tail_ts = last + TAIL_AFTER
    for p in range(PARTITIONS):          # every model on every partition, far ahead
        for maker in MAKERS.values():
            ev = maker(np.random.default_rng(p), False)
            ev["ts"] = tail_ts
            lines.append(orjson.dumps(ev))
            parts = np.append(parts, p)
    return lines, parts, tail_ts


class Setup:
    def __init__(self, broker, references, tmp_path: Path):
        tag = uuid.uuid4().hex[:8]
        self.broker = broker
        self.names = {"inferences": f"so-in-{tag}", "alerts": f"so-alerts-{tag}",
                      "dead_letter": f"so-dlq-{tag}", "windows": f"so-windows-{tag}",
                      "partials": f"so-partials-{tag}", "changelog": f"so-changelog-{tag}"}
        broker.create_topics({self.names["inferences"]: PARTITIONS,
                              self.names["partials"]: 3,
                              self.names["alerts"]: 1, self.names["dead_letter"]: 1,
                              self.names["windows"]: 1})
        self.raw = {
            "kafka": {"bootstrap.servers": broker.bootstrap_servers,
                      "group.id": f"so-group-{tag}", "session.timeout.ms": 6000,
                      "log.connection.close": False, "auto.offset.reset": "earliest",
                      "max.partition.fetch.bytes": 32768},
            "topics": self.names,
            "http": {"host": "127.0.0.1", "port": 0},
            "consumer": {"batch_size": 500, "poll_timeout": 0.2},
            "checkpoint": {"interval": {"events": 2000, "seconds": 0.5}},
            "defaults": {"window": {"seconds": 60, "allowed_lateness": 600},
                         "detector": "none", "min_events": 100},
            "models": {m: {"reference": r} for m, r in references.items()},
            "scale_out": {"enabled": True, "idle_timeout": 30, "partitions": 3},
        }
        self.tmp = tmp_path
        self.instances: dict[str, tuple[KafkaSidecar, threading.Thread]] = {}

    def config(self, name: str):
        raw = {**self.raw, "processing": {**self.raw.get("processing", {}),
                                          "transactional_id": f"so-{name}"}}
        return parse_config(raw, str(self.tmp / "config.yaml"))

    def start(self, name: str) -> KafkaSidecar:
        sidecar = KafkaSidecar(self.config(name))
        thread = threading.Thread(target=sidecar.run, daemon=True, name=name)
        thread.start()
        self.instances[name] = (sidecar, thread)
        return sidecar

    def stop(self, name: str) -> None:
        sidecar, thread = self.instances.pop(name)
        sidecar.stop()
        thread.join(60)
        assert not thread.is_alive()

    def stop_all(self) -> None:
        for name in list(self.instances):
            self.stop(name)

    def produce(self, lines: list[bytes], parts: np.ndarray, lo: int, hi: int) -> None:
        p = Producer({"bootstrap.servers": self.broker.bootstrap_servers, "linger.ms": 5})
        for i in range(lo, hi):
            p.produce(self.names["inferences"], lines[i], partition=int(parts[i]))
            if i % 2000 == 0:
                p.poll(0)
        assert p.flush(30) == 0

    def expected(self, lines: list[bytes], tail_ts: float):
        """`replay` over the same events: reports and alerts of the windows before the
        tail, per model, without input line numbers."""
        path = self.tmp / "in.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        cfg = parse_config({**self.raw, "scale_out": {"enabled": False}},
                           str(self.tmp / "config.yaml"))
        summary = replay(cfg, path, self.tmp / "out", progress=False,
                         monitor=Monitor(cfg))
        reports, alerts = {}, {}
        for line in (self.tmp / "out" / "windows.jsonl").read_bytes().splitlines():
            doc = _no_lines(orjson.loads(line))
            if _ts(doc["window"]["start"]) < tail_ts - 60:
                reports.setdefault(doc["model"], []).append(doc)
        for line in (self.tmp / "out" / "alerts.jsonl").read_bytes().splitlines():
            doc = _no_lines(orjson.loads(line))
            if _ts(doc["window"]["start"]) < tail_ts - 60:
                alerts.setdefault(doc["labels"]["model"], []).append(doc)
        return reports, alerts, summary.events

    def got(self, n_reports: int, n_alerts: int):
        """What the instances published, read_committed, per model in order (asked for
        one more than expected: a duplicate would show)."""
        got_r = read_topic(self.broker.bootstrap_servers, self.names["windows"], n_reports,
                           timeout=25)
        got_a = read_topic(self.broker.bootstrap_servers, self.names["alerts"], n_alerts,
                           timeout=8)
        reports, alerts = {}, {}
        for m in got_r:
            doc = orjson.loads(m.value())
            reports.setdefault(doc["model"], []).append(doc)
        for m in got_a:
            doc = orjson.loads(m.value())
            alerts.setdefault(doc["labels"]["model"], []).append(doc)
        return reports, alerts


def _ts(iso: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _no_lines(doc: dict) -> dict:
    doc["window"].pop("first_line", None)
    doc["window"].pop("last_line", None)
    return doc


def _check(setup: Setup, lines, tail_ts, applied: dict) -> None:
    exp_reports, exp_alerts, exp_events = setup.expected(lines, tail_ts)
    n_reports = sum(map(len, exp_reports.values()))
    n_alerts = sum(map(len, exp_alerts.values()))
    assert n_reports >= 15 and n_alerts >= 2
    got_reports, got_alerts = setup.got(n_reports + 1, n_alerts + 1)
    for model in exp_reports:   # identical reports, in order, none twice
        assert got_reports.get(model) == exp_reports[model], model
    assert sorted(got_reports) == sorted(exp_reports)
    assert got_alerts == exp_alerts
    assert sum(applied.values()) == sum(exp_events.values())


def apply_the_rest(setup: Setup, sidecars: list, lines, parts, tail: int) -> dict:
    """Wait until the instances applied the stream's head, produce its tail, wait until
    they applied every event; checks that several instances shared the work and returns
    the events applied per model, summed over the instances."""
    def total() -> int:
        return sum(sum(s.applied.values()) for s in sidecars)

    def progress() -> str:
        return str([dict(s.applied) for s in sidecars])

    wait_until(lambda: total() >= N_EVENTS, 60, "the stream applied", progress)
    setup.produce(lines, parts, tail, len(lines))
    wait_until(lambda: total() >= N_EVENTS + len(MAKERS) * PARTITIONS, 60,
               "every event applied", progress)
    if len(sidecars) > 1:   # the work was shared
        assert sum(1 for s in sidecars if sum(s.applied.values())) >= 2
    applied: dict = {}
    for s in sidecars:
        for k, v in s.applied.items():
            applied[k] = applied.get(k, 0) + v
    return applied


@pytest.mark.parametrize("n_instances", [1, 2, 3])
def test_instances_give_the_windows_and_alerts_of_one_replay(
        kafka_broker, references, tmp_path, n_instances, capsys):
    setup = Setup(kafka_broker, references, tmp_path)
    lines, parts, tail_ts = _stream(41)
    tail = len(lines) - len(MAKERS) * PARTITIONS
    setup.produce(lines, parts, 0, tail)
    sidecars = [setup.start(f"i{k}") for k in range(n_instances)]
    try:
        applied = apply_the_rest(setup, sidecars, lines, parts, tail)
        _check(setup, lines, tail_ts, applied)
        if n_instances == 2:  # `state inspect` shows the merger's committed state too
            path = tmp_path / "config.yaml"
            path.write_text(yaml.safe_dump(setup.raw))
            capsys.readouterr()
            assert cli_main(["state", "inspect", "--config", str(path)]) == 0
            out = capsys.readouterr().out.splitlines()
            merger = [line for line in out if " (merger): state " in line]
            assert sorted(line.split()[0] for line in merger) == sorted(MAKERS), out
            for line in merger:
                assert "not at the committed" not in line and "unreadable" not in line, line
                assert " age ?" not in line, line
                assert f"partitions reporting {PARTITIONS} " in line, line
                assert "late partial events 0 in 0 record(s)" in line, line
    finally:
        setup.stop_all()


def test_instances_joining_and_leaving_lose_and_duplicate_nothing(
        kafka_broker, references, tmp_path):
    setup = Setup(kafka_broker, references, tmp_path)
    lines, parts, tail_ts = _stream(43)
    n = N_EVENTS + 1
    applied: dict = {}

    def collect(sidecar: KafkaSidecar) -> None:
        for k, v in sidecar.applied.items():
            applied[k] = applied.get(k, 0) + v

    def total() -> int:
        return sum(applied.values()) + sum(sum(s.applied.values())
                                           for s, _ in setup.instances.values())

    def settled(*names: str) -> bool:
        """The group's members hold every input partition between them."""
        held = [tp for name in names for tp in setup.instances[name][0].assigned
                if tp[0] == setup.names["inferences"]]
        return all(setup.instances[name][0].assigned for name in names) and \
            len(held) == PARTITIONS

    a = setup.start("a")
    setup.produce(lines, parts, 0, n // 3)
    wait_until(lambda: total() >= n // 4, 60, "a started")
    setup.start("b")                                   # joins mid-stream, mid-window
    wait_until(lambda: settled("a", "b"), 60, "b joined")
    setup.produce(lines, parts, n // 3, 2 * n // 3)
    wait_until(lambda: total() >= n // 2, 60, "half applied")
    setup.start("c")                                   # another joins
    wait_until(lambda: settled("a", "b", "c"), 60, "c joined")
    wait_until(lambda: total() >= 7 * n // 12, 60, "more applied")
    setup.stop("a")                                    # a leaves (clean hand-over)
    collect(a)
    wait_until(lambda: settled("b", "c"), 60, "a's partitions taken over")
    tail = len(lines) - len(MAKERS) * PARTITIONS
    setup.produce(lines, parts, 2 * n // 3, tail)
    try:
        wait_until(lambda: total() >= N_EVENTS, 60, "the stream applied",
                   lambda: f"{applied} + {[dict(s.applied) for s, _ in setup.instances.values()]}")
        setup.produce(lines, parts, tail, len(lines))
        wait_until(lambda: total() >= len(lines) - 1, 120, "every event applied",
                   lambda: f"{applied} + {[dict(s.applied) for s, _ in setup.instances.values()]}")
        for s, _ in setup.instances.values():
            collect(s)
        _check(setup, lines, tail_ts, applied)
    finally:
        setup.stop_all()
