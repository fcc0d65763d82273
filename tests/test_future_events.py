"""One event from the future must not freeze a model's event-time windows (issue 9.6)."""

from __future__ import annotations

import time

import orjson
import pytest

from stream_monitor.config import parse_config
from stream_monitor.core.engine import FUTURE_SPAN
from stream_monitor.io import synthetic
from stream_monitor.pipeline import Monitor


def _events(n: int, seed: int, start_ts: float) -> list[bytes]:
    return [m for chunk in synthetic.generate(n, seed=seed, start_ts=start_ts, rate=100.0)
            for m in chunk]


def _monitor(ref, max_future: float | None = None) -> Monitor:
    window = {"seconds": 60, "allowed_lateness": 5}
    if max_future is not None:
        window["max_future"] = max_future
    cfg = parse_config({"defaults": {"window": window},
                        "models": {"churn": {"reference": str(ref)}}})
    return Monitor(cfg)


def _run(mon: Monitor, batches: list[list[bytes]]):
    results, pos = [], 0
    for b in batches:
        results.append(mon.process(b, range(pos, pos + len(b))))
        pos += len(b)
    return results


@pytest.mark.parametrize("alone", [False, True], ids=["inside-a-batch", "alone-in-a-batch"])
def test_far_future_event_is_rejected_and_later_events_count(churn_reference_file, alone):
    mon = _monitor(churn_reference_file)
    t0 = 1_790_000_000.0
    first, later = _events(2000, 1, t0), _events(25_000, 2, t0 + 20)
    future = orjson.dumps({**orjson.loads(first[0]), "ts": "2099-01-01T00:00:00Z"})
    batches = [first, [future], later] if alone else [first[:1000] + [future] + first[1000:],
                                                     later]
    results = _run(mon, batches)
    rejects = [r for res in results for r in res.rejects]
    assert [(r.reason, r.raw) for r in rejects] == [("future_event", future)]
    assert sum(res.events["churn"] for res in results) == 27_000
    assert mon.models["churn"].windows.late_events == 1
    assert mon.newest_event["churn"] < time.time()  # the event lag is not fooled either


def test_ahead_of_the_stream_but_not_of_the_clock(churn_reference_file):
    """Historical replay: an event a day ahead of its batch is rejected, the rest kept."""
    mon = _monitor(churn_reference_file, max_future=600)
    t0 = 1_700_000_000.0  # 2023: far behind the wall clock
    batch = _events(3000, 3, t0)
    odd = orjson.dumps({**orjson.loads(batch[0]), "ts": t0 + 86_400})
    (res,) = _run(mon, [batch[:10] + [odd] + batch[10:]])
    assert [r.reason for r in res.rejects] == ["future_event"]
    assert res.events["churn"] == 3000


def test_a_whole_batch_after_a_gap_moves_the_stream_on(churn_reference_file):
    mon = _monitor(churn_reference_file, max_future=600)
    t0 = 1_700_000_000.0
    after = _events(2000, 5, t0 + 2 * 86_400)
    results = _run(mon, [_events(2000, 4, t0), after])
    # the stream moves on once most of the last FUTURE_SPAN events are past the gap: the
    # first FUTURE_SPAN // 2 after it are judged ahead of the stream, wherever batches end
    rejects = [r for res in results for r in res.rejects]
    assert [(r.reason, r.raw) for r in rejects] == [("future_event", m)
                                                    for m in after[:FUTURE_SPAN // 2]]
    cut = _run(_monitor(churn_reference_file, max_future=600),
               [[m] for m in _events(2000, 4, t0)[-20:] + after[:20]])
    assert [r.raw for res in cut for r in res.rejects] == after[:FUTURE_SPAN // 2]
    assert sum(len(res.reports) for res in results) >= 1  # the gap closed the old windows


def test_max_future_is_validated():
    from stream_monitor.config import ConfigError
    with pytest.raises(ConfigError, match="defaults.window.max_future"):
        parse_config({"defaults": {"window": {"seconds": 60, "max_future": 0}},
                      "models": {"m": {"baseline": {"events": 10}}}})
