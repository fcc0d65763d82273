"""`consumer.prefetch: process` and `none` through the paths that were only ever run with
the default `thread`: the scale-out merge (`kafka/scale_out.py`) and the demo.

The scale-out test is `tests/test_scale_out.py`'s (its stream, setup and checks, reused):
`run` instances over a 6-partition topic, partial windows merged through Kafka, the
window reports and alerts read back with `read_committed` equal one `replay`'s, none
missing, none twice, every event applied once. With `process` each instance's consumer
lives in a child process (`kafka/fetch_process.py`), so the partials topic, the
rebalance callbacks that restore the merger's state and the checkpoints' group metadata
all cross the process boundary; with `none` there is no batch read ahead.

The demo runs as the CLI runs it, in a subprocess, with `consumer.prefetch: process`
added to the config it builds (the demo has no flag for it): it must count events,
close windows, find the injected drift of both models and leave no child behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from helpers import wait_until
from test_partials import MAKERS, PARTITIONS, build_references
from test_scale_out import Setup, _stream, apply_the_rest

from stream_monitor.kafka.fetch_process import FetchProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, str]:
    return build_references(tmp_path_factory.mktemp("prefetch-refs"), 4000)


def _read(bootstrap: str, topic: str, expect: int, timeout: float, grace: float) -> list:
    """The committed messages of a one-partition topic from its start: until `expect` are
    read, then `grace` seconds more, so that a duplicate shows (tests/test_scale_out.py
    asks for one more than expected and always waits its whole timeout: 33 s a test)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list = []
    deadline, settled = time.monotonic() + timeout, None
    try:
        while time.monotonic() < (settled or deadline):
            out += [m for m in c.consume(500, 0.2) if m.error() is None]
            if settled is None and len(out) >= expect:
                settled = time.monotonic() + grace
    finally:
        c.close()
    return out


def _check(setup: Setup, lines, tail_ts, applied: dict) -> None:
    """tests/test_scale_out.py's `_check`, reading with `_read`: the reports on
    `topics.windows` and the alerts equal `replay`'s, in order per model, none missing,
    none twice; every event applied once."""
    exp_reports, exp_alerts, exp_events = setup.expected(lines, tail_ts)
    n_reports = sum(map(len, exp_reports.values()))
    n_alerts = sum(map(len, exp_alerts.values()))
    assert n_reports >= 15 and n_alerts >= 2
    bootstrap = setup.broker.bootstrap_servers
    got_reports: dict = {}
    got_alerts: dict = {}
    # the alerts are committed in the transactions of the reports they came with
    for m in _read(bootstrap, setup.names["windows"], n_reports, 25, 3):
        doc = orjson.loads(m.value())
        got_reports.setdefault(doc["model"], []).append(doc)
    for m in _read(bootstrap, setup.names["alerts"], n_alerts, 8, 2):
        doc = orjson.loads(m.value())
        got_alerts.setdefault(doc["labels"]["model"], []).append(doc)
    for model in exp_reports:
        assert got_reports.get(model) == exp_reports[model], model
    assert sorted(got_reports) == sorted(exp_reports)
    assert got_alerts == exp_alerts
    assert sum(applied.values()) == sum(exp_events.values())


@pytest.mark.parametrize(("mode", "n_instances"), [("process", 2), ("none", 1)])
def test_scale_out_gives_the_windows_and_alerts_of_one_replay_with_prefetch(
        kafka_broker, references, tmp_path, mode, n_instances):
    setup = Setup(kafka_broker, references, tmp_path)
    setup.raw["consumer"] = {**setup.raw["consumer"], "prefetch": mode}
    lines, parts, tail_ts = _stream(47)
    tail = len(lines) - len(MAKERS) * PARTITIONS
    setup.produce(lines, parts, 0, tail)
    sidecars = [setup.start(f"{mode}{k}") for k in range(n_instances)]
    children = [s.fetch_process for s in sidecars]
    if mode == "process":   # the consumer really is in a child process
        assert all(isinstance(c, FetchProcess) for c in children)
        assert all(isinstance(s.consumer, FetchProcess) for s in sidecars)
    else:                   # in the process, nothing read ahead
        assert children == [None] * n_instances
        assert not any(s.prefetch for s in sidecars)
    try:
        applied = apply_the_rest(setup, sidecars, lines, parts, tail)
        _check(setup, lines, tail_ts, applied)
    finally:
        setup.stop_all()
    for child in children:   # each child ended with its instance
        if child is not None:
            assert child.process.poll() is not None


# The demo's config, with the consumer in a child process; the child's pid is printed so
# that the test can check it is gone afterwards.
DEMO_WITH_PROCESS = """
import sys
from stream_monitor import demo
from stream_monitor.cli import main
from stream_monitor.kafka import runtime

parse = demo.parse_config
demo.parse_config = lambda data, *a, **k: parse(
    {**data, "consumer": {"prefetch": "process"}}, *a, **k)
init = runtime.KafkaSidecar.__init__

def traced(self, *a, **k):
    init(self, *a, **k)
    print("fetch process pid", self.fetch_process.pid, flush=True)

runtime.KafkaSidecar.__init__ = traced
sys.exit(main(sys.argv[1:]))
"""


def test_demo_with_the_consumer_in_a_child_process(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", DEMO_WITH_PROCESS, "demo", "--duration", "26",
                           "--drift-after", "6", "--port", "0"], capture_output=True,
                          text=True, timeout=180, env=env, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (pid,) = (int(p) for p in re.findall(r"fetch process pid (\d+)", out))
    done = re.search(r"done: ([\d,]+) events counted, (\d+) windows", out)
    assert done, out
    assert int(done.group(1).replace(",", "")) > 20_000 and int(done.group(2)) >= 5, out
    assert "ALERT firing" in out and "FeatureDrift model=churn" in out, out
    assert "DataQuality model=fraud features=f07" in out, out
    # the child ended with the demo (it was waited for; /proc of a reaped pid is gone)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the fetch process gone")
