"""Exactly-once `run` (issue 15): checkpoints committed in one transaction with the offsets
and the outputs, aborts rewound, state restored on start, SIGKILL at random points.

Reading outputs: every reader here uses `isolation.level=read_committed`. The embedded
broker (Tansu, see kafka/broker.py) still delivers records of *aborted* transactions to
such readers (Apache Kafka filters them client-side from the fetch response's aborted
transactions list, which Tansu does not send). `committed_only` drops them the way the
broker's abort markers would: every record the monitor produces carries its
transaction (`sm.txn`), every checkpoint names the committed checkpoint it descends from
(`sm.base`), so the committed transactions are the chain from the last checkpoint back.
On Apache Kafka the filter removes nothing.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from helpers import wait_until

from stream_monitor.cli import main as cli_main
from stream_monitor.config import ConfigError, changelog_topic, parse_config
from stream_monitor.io import synthetic
from stream_monitor.io.replay import replay
from stream_monitor.kafka.changelog import decode_offsets
from stream_monitor.kafka.runtime import KafkaSidecar

pytestmark = pytest.mark.integration


def _names(prefix: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"inferences": f"{prefix}-in-{tag}", "alerts": f"{prefix}-alerts-{tag}",
            "dead_letter": f"{prefix}-dlq-{tag}", "windows": f"{prefix}-win-{tag}",
            "group": f"{prefix}-group-{tag}"}


def _config(bootstrap: str, names: dict[str, str], reference: Path, window: int = 2000,
            every: int = 3000, seconds: float = 0.5) -> dict:
    return {
        "kafka": {"bootstrap.servers": bootstrap, "group.id": names["group"],
                  "session.timeout.ms": 6000, "log.connection.close": False,
                  "auto.offset.reset": "earliest"},
        "topics": {k: names[k] for k in ("inferences", "alerts", "dead_letter", "windows")},
        "http": {"host": "127.0.0.1", "port": 0},
        "checkpoint": {"interval": {"events": every, "seconds": seconds}},
        # Sequential detectors on (the default): `Monitor.process` judges detector blocks
        # and window closes in event order, so their alerts do not depend on where a run,
        # a restart or replay cuts the stream into batches; blocks of 500 events alarm
        # several times in the drift, on both sides of window ends.
        "defaults": {"window": {"events": window}, "block": 500},
        "models": {"churn": {"reference": str(reference)}},
    }


def _stream(n: int, seed: int, drift_at: int) -> list[bytes]:
    msgs = [m for chunk in synthetic.generate(n, seed=seed,
                                              drift=synthetic.default_drift(drift_at))
            for m in chunk]
    # rejects spread through the stream: each must be dead-lettered exactly once
    for i in range(7):
        msgs.insert(1000 + i * (n // 8), b"not json %d" % i)
    return msgs


def _produce(bootstrap: str, topic: str, messages: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    for m in messages:
        p.produce(topic, m)
        p.poll(0)
    assert p.flush(30) == 0


def read_all(bootstrap: str, topic: str, timeout: float = 30) -> list:
    """Every record of `topic` (all partitions) to its end, read_committed."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex}",
                  "isolation.level": "read_committed", "enable.partition.eof": True,
                  "enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            return []
        c.assign([TopicPartition(topic, p, -2) for p in meta.partitions])
        waiting, out = set(meta.partitions), []
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    out.append(m)
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    waiting.discard(m.partition())
        assert not waiting, f"{topic}: end not reached"
        return out
    finally:
        c.close()


def _header(m, name: str) -> str:
    return dict(m.headers() or []).get(name, b"").decode()


def committed_chain(changelog: list) -> set[str]:
    """The committed transactions: the last checkpoint and its `sm.base` ancestors."""
    if not changelog:
        return set()
    base = {_header(m, "sm.txn"): _header(m, "sm.base") for m in changelog}
    chain, txn = set(), _header(changelog[-1], "sm.txn")
    while txn and txn not in chain:
        chain.add(txn)
        txn = base.get(txn, "")
    return chain


def committed_only(records: list, chain: set[str]) -> list:
    return [m for m in records if _header(m, "sm.txn") in chain]


def _committed(bootstrap: str, group: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "isolation.level": "read_committed"})
    got = c.committed([TopicPartition(topic, 0)], timeout=10)
    c.close()
    return max(got[0].offset, 0)


def _outputs(bootstrap: str, names: dict[str, str], cfg: dict) -> dict:
    """What a run left on Kafka, committed records only, in comparable form."""
    changelog = read_all(bootstrap, changelog_topic(parse_config(cfg)))
    chain = committed_chain(changelog)
    out = {"chain": chain, "changelog": changelog}
    for kind in ("windows", "alerts", "dead_letter"):
        raw = read_all(bootstrap, names[kind])
        kept = committed_only(raw, chain)
        out[f"{kind}_aborted"] = len(raw) - len(kept)
        out[kind] = [m.value() if kind == "dead_letter" else _comparable(orjson.loads(m.value()))
                     for m in kept]
    return out


def _comparable(doc: dict) -> dict:
    """Drop what depends on the wall clock or on input line numbers."""
    doc.pop("startsAt", None)
    doc.pop("endsAt", None)
    win = doc.get("window") or {}
    win.pop("first_line", None)
    win.pop("last_line", None)
    return doc


def _replay(cfg: dict, msgs: list[bytes], tmp: Path) -> dict:
    (tmp / "in.jsonl").write_bytes(b"\n".join(msgs) + b"\n")
    replay(parse_config(cfg), tmp / "in.jsonl", tmp / "out", progress=False)
    read = lambda name: [orjson.loads(x) for x in  # noqa: E731
                         (tmp / "out" / name).read_bytes().splitlines()]
    windows = [_comparable(d) for d in read("windows.jsonl") if d["window"]["complete"]]
    # replay flushes the last open window at the end; `run` keeps it open
    last_end = windows[-1]["window"]["end"]
    alerts = [_comparable(a) for a in read("alerts.jsonl")
              if a["window"]["end"] <= last_end]
    return {"windows": windows, "alerts": alerts, "rejects": len(read("rejects.jsonl"))}


def _brief(alerts: list) -> list:
    return [(a["kind"], a["labels"].get("feature"), a["labels"]["severity"], a["status"],
             a["window"].get("end")) for a in alerts]


def _same_alerts(got: list, expected: list) -> None:
    assert _brief(got) == _brief(expected), "\n".join(
        map(str, ["got:", *_brief(got), "expected:", *_brief(expected)]))
    for a, b in zip(got, expected, strict=False):
        assert a == b, sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    assert len(got) == len(expected)


def _in_process(cfg: dict, n: int, **kw) -> KafkaSidecar:
    sidecar = KafkaSidecar(parse_config(cfg), **kw)
    thread = threading.Thread(target=sidecar.run, daemon=True)
    thread.start()
    sidecar._thread = thread
    return sidecar


def _finish(sidecar: KafkaSidecar) -> None:
    sidecar.stop()
    sidecar._thread.join(60)
    assert not sidecar._thread.is_alive()


# -- the Done-when test -------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing_and_counts_nothing_twice(
        kafka_broker, churn_reference_file, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    names = _names("eos-kill")
    kafka_broker.create_topics({names[k]: 1 for k in
                                ("inferences", "alerts", "dead_letter", "windows")})
    cfg = _config(bootstrap, names, churn_reference_file)
    # static membership: a restarted instance takes its partitions back at once
    cfg["kafka"]["group.instance.id"] = "kill-test-0"
    msgs = _stream(24_000, seed=11, drift_at=12_300)  # drift off the window grid
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))

    # events flow steadily while the monitor is killed and restarted
    def feed():
        p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        for i in range(0, len(msgs), 250):
            for m in msgs[i:i + 250]:
                p.produce(names["inferences"], m)
            p.poll(0)
            time.sleep(0.4)
        p.flush(30)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    rng = random.Random(int(os.environ.get("KILL_SEED", "15")))
    log_path = tmp_path / "run.log"
    log = open(log_path, "ab")
    tail = lambda: log_path.read_text()[-3000:]  # noqa: E731
    cmd = [sys.executable, "-m", "stream_monitor", "run", "--config", str(path),
           "--log-level", "info"]
    for kill in range(4):
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        # once it owns the partition (the killed member's session has to expire first)
        # and has restored, kill it at a random point of its work
        wait_until(lambda k=kill: log_path.read_text().count("INFO stream_monitor: restored ")
                   > k, 60, "the partition assigned", tail)
        time.sleep(rng.uniform(0.2, 3.0))
        assert proc.poll() is None, tail()
        assert feeder.is_alive(), "events still flow at every kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    feeder.join(120)
    # the last instance runs to the end of the input and stops cleanly
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        wait_until(lambda: _committed(bootstrap, names["group"], names["inferences"])
                   >= len(msgs), 120, "all input committed",
                   tail)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, tail()
    killed = _outputs(bootstrap, names, cfg)
    run_log = (tmp_path / "run.log").read_text()
    assert run_log.count("restored 1 model(s)") >= 4, run_log[-3000:]  # all but the first

    # the same input, uninterrupted, in another group with other output topics
    names2 = {**_names("eos-once"), "inferences": names["inferences"]}
    kafka_broker.create_topics({names2[k]: 1 for k in ("alerts", "dead_letter", "windows")})
    cfg2 = _config(bootstrap, names2, churn_reference_file)
    once = _in_process(cfg2, len(msgs))
    try:
        wait_until(lambda: sum(once.applied.values()) >= len(msgs) - 7, 120, "all applied")
    finally:
        _finish(once)
    uninterrupted = _outputs(bootstrap, names2, cfg2)
    expected = _replay(cfg, msgs, tmp_path)

    assert len(expected["windows"]) == 12 and expected["rejects"] == 7
    assert any(w["dataset"]["drifted_features"] for w in expected["windows"])
    assert expected["alerts"], "the drift raises alerts"
    detector = [a for a in expected["alerts"] if a["method"].startswith("cusum_")]
    assert detector and len(detector) < len(expected["alerts"]), \
        "detector alarms and window findings both page"
    for got in (killed, uninterrupted):
        assert [w["window"]["index"] for w in got["windows"]] == list(range(12))
        assert got["windows"] == expected["windows"]    # counts, scores: none lost or twice
        assert got["alerts"] == expected["alerts"]      # no alert dropped or duplicated
        assert len(got["dead_letter"]) == 7             # each reject dead-lettered once
        assert sorted(got["dead_letter"]) == sorted(b"not json %d" % i for i in range(7))
    # every event is in a closed window or in the open one of the final checkpoint
    final = killed["changelog"][-1]
    assert decode_offsets(dict(final.headers())["sm.offsets"]) == {
        (names["inferences"], 0): len(msgs)}
    from stream_monitor.kafka.state import decode
    state = decode(final.value())
    open_events = sum(a.events for a in state["windows"]["open"].values())
    # the detectors' state (CUSUM statistics, the open block's histogram) came through
    # four restores exactly: the final checkpoint equals the uninterrupted run's
    once_final = [m for m in uninterrupted["changelog"]
                  if decode_offsets(dict(m.headers())["sm.offsets"])
                  == {(names["inferences"], 0): len(msgs)}]
    assert once_final, "the uninterrupted run checkpointed at the end of the input"
    theirs = decode(once_final[-1].value())
    assert state["detectors"] == theirs["detectors"] and state["detectors"]["state"]["blocks"]
    assert state["policy"] == theirs["policy"]
    assert sum(w["window"]["events"] for w in killed["windows"]) + open_events \
        == len(msgs) - 7
    print(f"aborted records Tansu delivered and the chain filtered: windows "
          f"{killed['windows_aborted']}, alerts {killed['alerts_aborted']}, dead letters "
          f"{killed['dead_letter_aborted']}")


# -- unit-ish: abort and rewind, restore on start, inspect, config ---------------------

class _FailingCommit:
    """The real producer, except that its `fail`-th commit_transaction raises an
    abortable error (what a broker timeout or a fenced epoch looks like)."""

    def __init__(self, producer, fail: int):
        self._p, self._fail, self.commits = producer, fail, 0

    def commit_transaction(self, *a):
        self.commits += 1
        if self.commits == self._fail:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "injected commit failure",
                                            txn_requires_abort=True))
        return self._p.commit_transaction(*a)

    def __getattr__(self, name):
        return getattr(self._p, name)


def test_an_aborted_transaction_is_rewound_and_redone_once(kafka_broker, churn_reference_file,
                                                           tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    names = _names("eos-abort")
    kafka_broker.create_topics({names[k]: 1 for k in
                                ("inferences", "alerts", "dead_letter", "windows")})
    msgs = _stream(9_000, seed=3, drift_at=4_100)
    _produce(bootstrap, names["inferences"], msgs)
    cfg = _config(bootstrap, names, churn_reference_file, window=1000, every=1500,
                  seconds=30)
    cfg["consumer"] = {"batch_size": 500}
    sidecar = KafkaSidecar(parse_config(cfg))
    sidecar.producer = _FailingCommit(sidecar.producer, fail=3)
    sidecar._thread = threading.Thread(target=sidecar.run, daemon=True)
    sidecar._thread.start()
    try:
        wait_until(lambda: _committed(bootstrap, names["group"], names["inferences"])
                   >= len(msgs), 90, "all input committed")
    finally:
        _finish(sidecar)
    assert sidecar.metrics.txn_aborts._value.get() == 1
    assert sidecar.metrics.checkpoints._value.get() >= 5
    got = _outputs(bootstrap, names, cfg)
    expected = _replay(cfg, msgs, tmp_path)
    assert got["windows"] == expected["windows"] and len(got["windows"]) == 9
    _same_alerts(got["alerts"], expected["alerts"])
    assert len(got["dead_letter"]) == 7
    # the aborted transaction's records are what Tansu leaks: the filter found them
    assert got["windows_aborted"] >= 1


def test_restore_on_start_continues_the_open_window(kafka_broker, churn_reference_file,
                                                    tmp_path, capsys):
    bootstrap = kafka_broker.bootstrap_servers
    names = _names("eos-restore")
    kafka_broker.create_topics({names[k]: 1 for k in
                                ("inferences", "alerts", "dead_letter", "windows")})
    msgs = _stream(8_000, seed=5, drift_at=3_700)
    cfg = _config(bootstrap, names, churn_reference_file, window=1500)
    _produce(bootstrap, names["inferences"], msgs[:4_700])   # mid-window
    first = _in_process(cfg, 0)
    try:
        wait_until(lambda: sum(first.applied.values()) >= 4_700 - 4, 60, "first part")
    finally:
        _finish(first)
    open_events = first.monitor.models["churn"].windows.open_events
    assert 0 < open_events < 1500
    # `state inspect` shows the checkpoint at the committed offsets
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["state", "inspect", "--config", str(path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("churn: checkpoint ") and "not at the committed" not in line
    assert f"windows open 1 with {open_events:,} events" in line, line
    det = first.monitor.models["churn"].detectors
    assert f"detectors {det.blocks:,} blocks, {det.alarms:,} alarms, open block " \
        f"{det.filled:,} events" in line, line

    _produce(bootstrap, names["inferences"], msgs[4_700:])
    second = _in_process(cfg, 0)
    try:
        wait_until(lambda: sum(second.applied.values()) >= len(msgs) - 4_700 - 3, 60, "rest")
    finally:
        _finish(second)
    assert second.metrics.restore_seconds._value.get() > 0
    got = _outputs(bootstrap, names, cfg)
    expected = _replay(cfg, msgs, tmp_path)
    assert got["windows"] == expected["windows"] and len(got["windows"]) == 5
    _same_alerts(got["alerts"], expected["alerts"])


def test_state_inspect_user_errors_are_one_line_exit_2(tmp_path, churn_reference_file, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap.servers": "127.0.0.1:1", "socket.connection.setup.timeout.ms": 1000},
        "models": {"churn": {"reference": str(churn_reference_file)}}}))
    assert cli_main(["state", "inspect", "--config", str(path), "--timeout", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot read the changelog stream-monitor-changelog" in err
    assert cli_main(["state", "inspect", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_large_snapshots_are_cut_into_parts_and_joined_from_one_transaction():
    from stream_monitor.kafka.changelog import PART_BYTES, ChangelogRecord, choose, parts

    def records(model, data, txn, offsets):
        return [ChangelogRecord(model, value, offsets, txn, part=int(dict(h)["sm.part"]),
                                parts=int(dict(h)["sm.parts"]))
                for _, value, h in parts(model, data)]

    big_old, big_new = b"a" * (2 * PART_BYTES + 7), b"b" * (3 * PART_BYTES)
    assert len(parts("m", big_old)) == 3 and all(len(v) <= PART_BYTES
                                                 for _, v, _ in parts("m", big_old))
    committed = {("in", 0): 10}
    log = (records("m", big_old, "r:1", committed)
           + records("m", big_new, "r:2", {("in", 0): 20})     # not committed (aborted)
           + records("small", b"s", "r:1", committed))
    got = choose(log, committed)
    assert got.states == {"m": big_old, "small": b"s"} and not got.mismatched
    # a part missing: that checkpoint cannot be used, an earlier complete one is
    later = records("m", big_new, "r:3", committed)
    got = choose(log + later[:2], committed)
    assert got.states["m"] == big_old
    assert choose(log + later, committed).states["m"] == big_new


def test_guarantee_and_checkpoint_config_errors_name_the_key():
    base = {"models": {"m": {"baseline": {"events": 100}}}}
    cases = {
        "processing.guarantee": {"processing": {"guarantee": "exactly-once"}},
        "checkpoint.interval.events": {"checkpoint": {"interval": {"events": 0}}},
        "checkpoint.interval.seconds": {"checkpoint": {"interval": {"seconds": -1}}},
        "checkpoint.interval.minutes": {"checkpoint": {"interval": {"minutes": 1}}},
        "kafka.transactional.id": {"kafka": {"transactional.id": "mine"}},
        "kafka.isolation.level": {"kafka": {"isolation.level": "read_uncommitted"}},
        "topics.changelog": {"topics": {"changelog": 5}},
    }
    for key, extra in cases.items():
        with pytest.raises(ConfigError) as exc:
            parse_config({**base, **extra}, "c.yaml")
        assert len(exc.value.lines) == 1 and exc.value.lines[0].startswith(f"c.yaml: {key}: "), \
            exc.value.lines
    # at-least-once leaves the client settings to the user
    cfg = parse_config({**base, "processing": {"guarantee": "at_least_once"},
                        "kafka": {"isolation.level": "read_uncommitted"}})
    assert cfg.processing.guarantee == "at_least_once"
    # defaults: exactly-once, a changelog named from the group
    cfg = parse_config({**base, "kafka": {"group.id": "g1"}})
    assert cfg.processing.guarantee == "exactly_once"
    assert changelog_topic(cfg) == "g1-changelog"
