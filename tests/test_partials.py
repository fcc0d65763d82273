"""Scale-out in memory: partial windows of 1, 2 or 3 instances merged = one `replay`.

The stream is unlike the repo generator: three models interleaved, sparse features
(absent keys), nulls, booleans, integer ties, Cauchy tails, a 5,000-category feature, a
model version, a drift at an event time off the 60 s window grid, event times out of
order by up to 2 s (within the allowed lateness). It is split over 6 "partitions" (per
partition order kept); each instance is a `Monitor` in scale-out mode over the
partitions it owns, processing them in chunks of the global order as a consumer does,
publishing its deltas and watermarks at random points (a checkpoint), and one merger
closes and judges the windows. Window reports and alert events, compared as JSON, must
equal those of `replay` over the same file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_monitor.config import ConfigError, ProfileConfig, parse_config, partials_topic
from stream_monitor.core.reference import ReferenceBuilder
from stream_monitor.io.replay import replay
from stream_monitor.kafka.partials import PartialMerger, PartialPublisher, PartialRecord
from stream_monitor.kafka.state import StateError
from stream_monitor.pipeline import Monitor

T0 = 1_760_000_040.0
PARTITIONS = 6
SOURCES = [f"inferences:{p}" for p in range(PARTITIONS)]


def _pay(rng: np.random.Generator, drift: bool) -> dict:
    feats: dict = {}
    for name, value in (
            ("amount", float(np.abs(rng.standard_cauchy()) * 20 + (40 if drift else 0))),
            ("items", int(rng.poisson(3 if not drift else 6))),        # integer ties
            ("score", float(rng.normal(0.8 if drift else 0.0, 1.0))),
            ("age", None if rng.random() < 0.1 else float(rng.gamma(2.0, 10.0))),
            ("card_present", bool(rng.random() < 0.7)),
            ("merchant", f"m{int(rng.zipf(1.3)) % 5000}"),              # 5,000 categories
            ("country", str(rng.choice(["de", "fr", "us", "br"], p=[.3, .3, .3, .1]))),
    ):
        if rng.random() < 0.05:
            continue  # an absent key
        feats[name] = value
    return {"model": "pay", "model_version": "v3", "features": feats,
            "prediction": float(rng.random())}


def _ads(rng: np.random.Generator, drift: bool) -> dict:
    feats = {"ctr": float(rng.beta(2, 50 if not drift else 15)),
             "slot": int(rng.integers(0, 4)),
             "format": str(rng.choice(["banner", "video", "native"],
                                      p=[.2, .2, .6] if drift else [.4, .3, .3])),
             "bid": None if rng.random() < 0.1 else float(rng.lognormal(0, 1))}
    if rng.random() < 0.2:
        del feats["bid"]
    return {"model": "ads", "features": feats}


def _iot(rng: np.random.Generator, drift: bool) -> dict:
    return {"model": "iot", "features": {"temp": float(rng.normal(20 + 3 * drift, 2)),
                                         "ok": bool(rng.random() < 0.9)}}


MAKERS = {"pay": _pay, "ads": _ads, "iot": _iot}


def make_stream(seed: int, n: int = 21_000, iot_partitions: tuple[int, ...] | None = None,
                gap: float = 0.02) -> tuple[list[bytes], np.ndarray]:
    """(lines, partition of each line): `n * gap` seconds of event time (7 minutes by
    default), drift at T0 + 217.3 s."""
    rng = np.random.default_rng(seed)
    base = T0 + np.cumsum(rng.exponential(gap, n))
    ts = base - rng.uniform(0, 2.0, n)                      # out of order by up to 2 s
    drift_at = T0 + 217.3
    which = rng.choice(["pay", "ads", "iot"], n, p=[.45, .35, .2])
    parts = rng.integers(0, PARTITIONS, n)
    lines = []
    for i in range(n):
        ev = MAKERS[which[i]](rng, bool(ts[i] >= drift_at))
        ev["ts"] = round(float(ts[i]), 3)
        if iot_partitions is not None and which[i] == "iot":
            parts[i] = iot_partitions[i % len(iot_partitions)]
        lines.append(orjson.dumps(ev))
    lines[700:700] = [b"{not json"]                        # a reject, counted by its instance
    parts = np.insert(parts, 700, 3)
    return lines, parts


def build_references(tmp: Path, events: int) -> dict[str, str]:
    """A reference file per model of MAKERS, from `events` stationary events each."""
    rng = np.random.default_rng(99)
    out = {}
    for name, maker in MAKERS.items():
        builder = ReferenceBuilder(name, ProfileConfig())
        for _ in range(events):
            ev = maker(rng, False)
            builder.add(ev["features"], ev.get("prediction"), None)
        builder.build().save(tmp / f"{name}.json")
        out[name] = str(tmp / f"{name}.json")
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("partials")
    paths = build_references(tmp, 6000)
    models = {name: {"reference": path} for name, path in paths.items()}
    return parse_config({
        "defaults": {"window": {"seconds": 60, "allowed_lateness": 30}, "detector": "none",
                     "min_events": 100},
        "models": models,
        "scale_out": {"enabled": True, "idle_timeout": 5},
    }, str(tmp / "config.yaml"))


def _dumps(doc: dict) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_SORT_KEYS)


def replayed(config, lines: list[bytes], tmp_path) -> tuple[dict, dict, Counter]:
    """Per model: `replay`'s window reports and alert events as JSON lines."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    summary = replay(config, path, tmp_path / "out", progress=False,
                     monitor=Monitor(config, scale_out=False))
    reports: dict = {}
    alerts: dict = {}
    for line in (tmp_path / "out" / "windows.jsonl").read_bytes().splitlines():
        doc = orjson.loads(line)
        reports.setdefault(doc["model"], []).append(_dumps(doc))
    for line in (tmp_path / "out" / "alerts.jsonl").read_bytes().splitlines():
        doc = orjson.loads(line)
        alerts.setdefault(doc["labels"]["model"], []).append(_dumps(doc))
    return reports, alerts, summary.events


class Cluster:
    """Instances (Monitors in scale-out mode) and one merger, moved by hand."""

    def __init__(self, config, seed: int, clock=lambda: 0.0):
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.clock = clock
        self.instances: dict[str, tuple[Monitor, PartialPublisher]] = {}
        self.owner: dict[int, str] = {}
        self.judge = Monitor(config)
        self.merger = PartialMerger.for_monitor(self.judge)
        self.merger.expected = frozenset(SOURCES)
        self.reports: dict = {}
        self.alerts: dict = {}
        self.events: Counter = Counter()
        self.rejects = 0
        self.closed_before_flush: Counter = Counter()

    def add_instance(self, name: str, partitions: list[int]) -> None:
        self.instances[name] = (Monitor(self.config), PartialPublisher(
            self.config.scale_out.idle_timeout, name, self.clock))
        self.assign(name, partitions)

    def assign(self, name: str, partitions: list[int]) -> None:
        """Move `partitions` to `name`; their previous owners publish first (on revoke)."""
        for prev in {self.owner[p] for p in partitions if p in self.owner} - {name}:
            self.publish(prev)
        for p in partitions:
            self.owner[p] = name
        self.instances[name][1].assigned()

    def remove_instance(self, name: str, heir: str) -> None:
        self.assign(heir, [p for p, o in self.owner.items() if o == name])
        del self.instances[name]

    def publish(self, name: str) -> None:
        monitor, publisher = self.instances[name]
        owned = [SOURCES[p] for p, o in self.owner.items() if o == name]
        for record in publisher.records(monitor, owned):
            record = PartialRecord.decode(record.encode())      # through the bytes
            self.merger.add(record)
            if record.alarms:
                alerts = self.judge.judge_alarms(record.model, [
                    (record.model, found, window) for found, window in record.alarms]).alerts
                self.alerts.setdefault(record.model, []).extend(alerts)
        self.close(self.merger.ready(), counted=True)

    def close(self, ready: dict, counted: bool = False) -> None:
        for model, windows in ready.items():
            if counted:
                self.closed_before_flush[model] += len(windows)
            result = self.judge.close_windows(model, windows)
            self.reports.setdefault(model, []).extend(result.reports)
            self.alerts.setdefault(model, []).extend(result.alerts)

    def feed(self, lines: list[bytes], parts: np.ndarray, positions: np.ndarray) -> None:
        """One chunk of the global order: each instance applies its partitions' part."""
        for name, (monitor, publisher) in list(self.instances.items()):
            mine = np.flatnonzero(np.isin(parts, [p for p, o in self.owner.items()
                                                  if o == name]))
            if mine.size:
                result = monitor.process([lines[i] for i in mine], positions[mine].tolist())
                self.events.update(result.events)
                self.rejects += len(result.rejects)
                assert not result.reports and not result.alerts  # nothing judged here
                publisher.note(result.events, result.alarms)
            if self.rng.random() < 0.3:           # a checkpoint at a random point
                self.publish(name)

    def finish(self) -> None:
        for name in list(self.instances):
            self.publish(name)
        self.close(self.merger.flush())

    def restart_merger(self) -> None:
        """The merging instance crashes and a new one restores its checkpoint."""
        merger_state = self.merger.snapshot()
        judge_state = {m: self.judge.snapshot(m) for m in self.config.models}
        self.judge = Monitor(self.config)
        for m, data in judge_state.items():
            self.judge.restore(m, data)
        self.merger = PartialMerger.for_monitor(self.judge)
        self.merger.expected = frozenset(SOURCES)
        self.merger.restore(merger_state)


def chunks(rng: np.random.Generator, n: int):
    pos = 0
    while pos < n:
        k = int(rng.integers(50, 800))
        yield np.arange(pos, min(n, pos + k))
        pos += k


def _as_lines(docs: dict) -> dict:
    """Per model, JSON lines as `replay` writes them (numpy values as JSON, keys sorted)."""
    return {m: [_dumps(orjson.loads(_dumps(d))) for d in v] for m, v in docs.items() if v}


def check_equal(cluster: Cluster, expected) -> None:
    """Every report and alert line equal to replay's (positions are line numbers, so
    `first_line`/`last_line` are compared too), per model in order; events counted once."""
    reports, alerts, events = expected
    got_reports = _as_lines(cluster.reports)
    assert sorted(got_reports) == sorted(reports)
    for model in reports:
        assert len(got_reports[model]) == len(reports[model]), model
        assert got_reports[model] == reports[model], model
    assert _as_lines(cluster.alerts) == alerts
    assert cluster.events == events
    assert sum(len(v) for v in alerts.values()) >= 2      # the drift pages: a real check
    assert sum(cluster.merger.late_events.values()) == 0


@pytest.mark.parametrize("n_instances", [1, 2, 3])
def test_instances_merged_equal_replay(config, tmp_path, n_instances):
    lines, parts = make_stream(7)
    expected = replayed(config, lines, tmp_path)
    cluster = Cluster(config, seed=n_instances)
    for k in range(n_instances):
        cluster.add_instance(f"i{k}", [p for p in range(PARTITIONS) if p % n_instances == k])
    positions = np.arange(1, len(lines) + 1)
    rng = np.random.default_rng(100 + n_instances)
    for i, idx in enumerate(chunks(rng, len(lines))):
        cluster.feed([lines[j] for j in idx], parts[idx], positions[idx])
        if i == 11:
            cluster.restart_merger()      # the merging instance's checkpoint loses nothing
    cluster.finish()
    assert cluster.rejects == 1
    assert sum(cluster.closed_before_flush.values()) >= 12  # closed by watermarks, live
    check_equal(cluster, expected)


def test_partitions_reassigned_mid_window_lose_and_duplicate_nothing(config, tmp_path):
    lines, parts = make_stream(11)
    expected = replayed(config, lines, tmp_path)
    cluster = Cluster(config, seed=5)
    cluster.add_instance("a", [0, 1, 2, 3, 4, 5])
    positions = np.arange(1, len(lines) + 1)
    rng = np.random.default_rng(17)
    for i, idx in enumerate(chunks(rng, len(lines))):
        if i == 5:
            cluster.add_instance("b", [3, 4, 5])          # joins: a revokes 3-5 mid-window
        if i == 13:
            cluster.add_instance("c", [1])                # another joins
        if i == 20:
            cluster.remove_instance("a", heir="c")        # a leaves: c takes 0 and 2
        if i == 27:
            cluster.assign("b", [1])                      # one partition moves again
        cluster.feed([lines[j] for j in idx], parts[idx], positions[idx])
    cluster.finish()
    check_equal(cluster, expected)


def test_idle_partition_does_not_stall_windows(config, tmp_path):
    """`iot` events only on partitions 0 and 1 (instance a): instance b never sees one.
    Without the idle timeout iot's windows would wait for b forever; with it they close
    as the stream goes, and the result is still exactly `replay`'s."""
    lines, parts = make_stream(23, iot_partitions=(0, 1))
    expected = replayed(config, lines, tmp_path)
    positions = np.arange(1, len(lines) + 1)
    for advance in (0.0, 1.0):        # seconds of wall clock per chunk
        now = [0.0]
        cluster = Cluster(config, seed=3, clock=lambda now=now: now[0])
        cluster.add_instance("a", [0, 1, 2])
        cluster.add_instance("b", [3, 4, 5])
        rng = np.random.default_rng(29)
        for idx in chunks(rng, len(lines)):
            cluster.feed([lines[j] for j in idx], parts[idx], positions[idx])
            now[0] += advance
        closed_live = cluster.closed_before_flush["iot"]
        cluster.finish()
        if advance == 0:      # b never idle: iot's windows wait (until the end of input)
            assert closed_live == 0
            assert cluster.closed_before_flush["pay"] >= 4
            continue
        assert closed_live >= 4     # of 8: closed by a's watermark once b counts as idle
        check_equal(cluster, expected)


def test_idle_partition_that_wakes_up_behind_is_counted_late_not_merged(config):
    judge = Monitor(config)
    merger = PartialMerger.for_monitor(judge)
    a, b = Monitor(config), Monitor(config)
    ev = {"model": "iot", "features": {"temp": 20.0, "ok": True}}
    a.process([orjson.dumps({**ev, "ts": T0 + t}) for t in range(0, 200, 2)], list(range(100)))
    for rec in PartialPublisher(5, "a").records(a, ["t:0"]):
        merger.add(rec)
    idle_b = PartialPublisher(5, "b", clock=iter([0.0, 100.0, 100.0, 100.0]).__next__)
    for rec in idle_b.records(b, ["t:1"]):               # b: no iot event, idle
        merger.add(rec)
    closed = merger.ready()["iot"]
    assert [w.index for w in closed] == [int(T0 // 60), int(T0 // 60) + 1]
    b.process([orjson.dumps({**ev, "ts": T0 + 5})], [500])  # b wakes up in window 0
    for rec in PartialPublisher(5, "b").records(b, ["t:1"]):
        merger.add(rec)
    assert merger.late_events["iot"] == 1 and merger.late_records["iot"] == 1
    assert merger.watermark("iot") == T0 + 5              # b is active again: the minimum
    assert "iot" not in merger.ready()                    # nothing reopens, nothing closes


def test_record_roundtrip_and_corrupt_records(config):
    monitor = Monitor(config)
    monitor.process([orjson.dumps({"model": "ads", "ts": T0 + 1, "features": {
        "ctr": 0.1, "slot": 2, "format": "video", "bid": None}})], [1])
    (record,) = [r for r in PartialPublisher(5, "x").records(monitor, ["t:0"])
                 if r.model == "ads"]
    data = record.encode()
    back = PartialRecord.decode(data)
    assert back.marks == [("t:0", T0 + 1, False)] and back.instance == "x"
    (w,) = back.windows
    assert w.accumulator.events == 1 and w.start == int(T0 // 60) * 60
    assert np.array_equal(w.accumulator.numeric.counts, record.windows[0].accumulator
                          .numeric.counts)
    assert monitor.take_partials() == {}                  # taken: the next delta is empty
    for bad in (b"", b"SMPW\x00\x09" + data[6:], data[:-7], b"XXXX" + data[4:]):
        with pytest.raises(StateError):
            PartialRecord.decode(bad)


def test_scale_out_refuses_count_windows_and_baselines(config, tmp_path):
    ref = config.models["pay"].reference
    bad = parse_config({"models": {"pay": {"reference": str(ref), "window": {"events": 100}},
                                   "ads": {"baseline": {"events": 100}}},
                        "scale_out": {"enabled": True}}, str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError) as err:
        Monitor(bad)
    text = "\n".join(err.value.lines)
    assert "models.pay.window" in text and "models.ads.reference" in text
    Monitor(bad, scale_out=False)                         # fine without scale-out


def test_a_partition_that_never_reported_holds_windows(config):
    """Until every input partition has reported, no window closes: an instance that has
    not published its first marks yet is not left out as if it did not exist."""
    merger = PartialMerger.for_monitor(Monitor(config))
    merger.expected = frozenset(["t:0", "t:1"])
    a = Monitor(config)
    ev = {"model": "iot", "features": {"temp": 20.0, "ok": True}}
    a.process([orjson.dumps({**ev, "ts": T0 + t}) for t in range(0, 300, 3)], list(range(100)))
    for rec in PartialPublisher(5, "a").records(a, ["t:0"]):
        merger.add(rec)
    assert merger.ready() == {} and merger.watermark("iot") == float("-inf")
    b = Monitor(config)
    b.process([orjson.dumps({**ev, "ts": T0 + 250})], [500])
    for rec in PartialPublisher(5, "b").records(b, ["t:1"]):
        merger.add(rec)
    assert [w.accumulator.events for w in merger.ready()["iot"]] == [20, 20, 20]


def test_detector_alarms_are_judged_once_by_the_merger(config, tmp_path):
    """Sequential detectors run per instance (each over its share of the events, in its
    own blocks); their alarms travel in the partial records and the merger's alert
    policy pages them with the merged windows: a feature two instances both flag pages
    once, and the instances page nothing themselves."""
    from stream_monitor.config import parse_config as parse
    raw = {"defaults": {"window": {"seconds": 60, "allowed_lateness": 30}, "block": 200,
                        "min_events": 100},
           "models": {m: {"reference": str(config.models[m].reference)} for m in MAKERS},
           "scale_out": {"enabled": True}}
    cfg = parse(raw, str(tmp_path / "c.yaml"))
    lines, parts = make_stream(31)
    cluster = Cluster(cfg, seed=8)
    cluster.add_instance("a", [0, 1, 2])
    cluster.add_instance("b", [3, 4, 5])
    positions = np.arange(1, len(lines) + 1)
    for idx in chunks(np.random.default_rng(3), len(lines)):
        cluster.feed([lines[j] for j in idx], parts[idx], positions[idx])
    cluster.finish()
    alerts = [a for v in cluster.alerts.values() for a in v]
    detector_pages = [a for a in alerts if a["status"] == "firing"
                      and str(a["method"]).startswith(("cusum", "page_hinkley"))]
    assert detector_pages, "the drift is flagged by the detectors between windows"
    assert {a["labels"].get("feature") for a in detector_pages} >= {"ctr", "temp"}
    paged: dict = {}
    for a in alerts:      # a feature never paged twice at one severity without a change
        if "feature" not in a["labels"]:
            continue      # (a grouped alert is updated as features join or leave it)
        fp, severity = a["fingerprint"], a["labels"]["severity"]
        if a["status"] == "firing":
            assert paged.get(fp) != severity, a["labels"]
            paged[fp] = severity
        else:
            paged.pop(fp, None)


def test_scale_out_needs_exactly_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config({"models": {"m": {"reference": "r.json"}},
                      "processing": {"guarantee": "at_least_once"},
                      "scale_out": {"enabled": True}}, str(tmp_path / "c.yaml"))
    assert any("scale_out.enabled" in line and "exactly_once" in line
               for line in err.value.lines)


class _Msg:
    """A consumed record of the partials topic (what `ScaleOut.apply` reads of one)."""

    def __init__(self, topic: str, partition: int, offset: int, value: bytes):
        self._t, self._p, self._o, self._v = topic, partition, offset, value

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return self._v


class _Loop:
    """The parts of `KafkaSidecar` that `ScaleOut` uses, with transactions by hand: the
    in-memory merging side, without a broker (the broker is tests/test_scale_out.py)."""

    def __init__(self, config):
        self.config = config
        self.monitor = Monitor(config)
        self.transactional_id = "t"
        self.assigned = {(partials_topic(config), 0), ("inferences", 0)}
        self.checkpoint_records: list = []
        self.on_rewind: list = []
        self.seq, self._base_txn = 0, ""

    def _txn_name(self) -> str:
        return f"run:{self.seq}"

    def request_checkpoint(self) -> None:
        pass

    def commit(self, scale_out) -> None:
        scale_out.records()
        self._base_txn = self._txn_name()
        self.seq += 1

    def abort(self, scale_out, in_checkpoint: bool) -> None:
        if in_checkpoint:
            scale_out.records()
        self.seq += 1
        scale_out.rewind()


def test_merger_goes_back_to_its_last_committed_checkpoint_on_abort(config):
    """An abort rewinds the input to the last committed offsets; the merger must go back
    to the state committed with them: not to an older one (an abort before the
    checkpoint's records were taken, e.g. a failed delivery) nor keep a newer one."""
    from stream_monitor.kafka.scale_out import ScaleOut
    loop = _Loop(config)
    so = ScaleOut(loop)
    so._owned = frozenset({0})                  # partitions known: nothing to read
    topic = partials_topic(config)
    ev = {"model": "iot", "features": {"temp": 20.0, "ok": True}}
    inst = Monitor(config)
    offset = 0

    def partials(n: int) -> list:
        nonlocal offset
        inst.process([orjson.dumps({**ev, "ts": T0 + 1 + i * 0.01}) for i in range(n)],
                     list(range(n)))
        out = []
        for rec in PartialPublisher(60, "i").records(inst, ["inferences:0"]):
            out.append(_Msg(topic, 0, offset, rec.encode()))
            offset += 1
        return out

    def pending() -> int:
        return so.merger.pending_events().get("iot", 0)

    so.apply(partials(5))
    loop.commit(so)                              # checkpoint 1: 5 events pending
    so.apply(partials(7))
    loop.commit(so)                              # checkpoint 2: 12
    assert pending() == 12
    so.apply(partials(11))
    loop.abort(so, in_checkpoint=False)          # a delivery failed before checkpoint 3
    assert pending() == 12 and so.next_offset == {0: 6}
    so.apply(partials(2))
    loop.abort(so, in_checkpoint=True)           # checkpoint 3 itself aborted
    assert pending() == 12
    so.apply(partials(3))
    loop.commit(so)
    assert pending() == 15 and so.judge.models["iot"].windows.window.seconds == 60


def test_late_partials_are_counted_in_a_metric(config):
    """Events of a partial that reaches the merger after its window was merged are
    dropped and counted: `stream_monitor_late_partial_events_total{model}`."""
    from prometheus_client import generate_latest

    from stream_monitor.io.metrics import MonitorMetrics
    from stream_monitor.kafka.scale_out import ScaleOut
    loop = _Loop(config)
    loop.metrics = MonitorMetrics()
    so = ScaleOut(loop)
    so._owned = frozenset({0})
    so.merger.expected = frozenset({"t:0", "t:1"})    # the input topic's partitions
    topic = partials_topic(config)
    ev = {"model": "iot", "features": {"temp": 20.0, "ok": True}}
    msgs: list = []

    def publish(mon: Monitor, publisher: PartialPublisher, source: str) -> list:
        out = [_Msg(topic, 0, len(msgs) + i, rec.encode())
               for i, rec in enumerate(publisher.records(mon, [source]))]
        msgs.extend(out)
        return out

    def scraped() -> float:
        for line in generate_latest(loop.metrics.registry).decode().splitlines():
            if line.startswith('stream_monitor_late_partial_events_total{model="iot"}'):
                return float(line.split()[-1])
        return 0.0

    a, b = Monitor(config), Monitor(config)
    a.process([orjson.dumps({**ev, "ts": T0 + t}) for t in range(0, 200, 2)], list(range(100)))
    assert so.apply(publish(a, PartialPublisher(5, "a"), "t:0")).reports == []
    idle_b = PartialPublisher(5, "b", clock=iter([0.0, 100.0, 100.0, 100.0]).__next__)
    result = so.apply(publish(b, idle_b, "t:1"))      # b idle: a's watermark closes windows
    assert len(result.reports) == 2 and scraped() == 0.0
    b.process([orjson.dumps({**ev, "ts": T0 + t}) for t in (5, 6, 7)], [500, 501, 502])
    so.apply(publish(b, PartialPublisher(5, "b"), "t:1"))   # b wakes up in window 0
    assert so.merger.late_events["iot"] == 3 and scraped() == 3.0
