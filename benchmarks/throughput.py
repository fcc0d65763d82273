"""Engine throughput against bare orjson.loads on the same messages, one core.

Prints, measured side by side in one run (best of --rounds, interleaved):
  * orjson.loads with each result thrown away,
  * orjson.loads of batches of 10,000 whose results are kept for the batch (the
    baseline any consumer that decodes a batch pays),
  * the engine: decode + update + evaluate, the code path of `replay` and `run`
    (windows of 10,000 events, so every batch also closes and evaluates a window),
  * the same engine with the sequential detectors switched off, their cost as the drop
    in rate and as their share of the engine's CPU time (the budget: 10%),
and on the last line the ratio of the engine to the batch baseline.

    python benchmarks/throughput.py [--events 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import time

import orjson
from common import monitor, workload

BATCH = 10_000


def parse_discard(msgs: list[bytes]) -> float:
    loads = orjson.loads
    t = time.perf_counter()
    for m in msgs:
        loads(m)
    return time.perf_counter() - t


def parse_batches(msgs: list[bytes]) -> float:
    loads = orjson.loads
    t = time.perf_counter()
    for i in range(0, len(msgs), BATCH):
        kept = [loads(m) for m in msgs[i:i + BATCH]]
        del kept
    return time.perf_counter() - t


def engine(msgs: list[bytes]) -> float:
    mon = monitor_factory()
    t = time.perf_counter()
    for i in range(0, len(msgs), BATCH):
        mon.process(msgs[i:i + BATCH], range(i, i + BATCH))
    return time.perf_counter() - t


def engine_no_detectors(msgs: list[bytes]) -> float:
    """The same engine with the sequential detectors switched off (their cost, issue 12)."""
    global monitor_factory
    keep = monitor_factory
    monitor_factory = no_detectors_factory
    try:
        return engine(msgs)
    finally:
        monitor_factory = keep


def detector_share(msgs: list[bytes]) -> float:
    """Share of the engine's CPU time spent in the detectors, measured inside one run
    (robust when other processes make the with/without rates noisy)."""
    from stream_monitor.pipeline import Monitor
    spent = [0.0]
    original = Monitor._detect

    def timed(self, *args):
        t = time.process_time()
        original(self, *args)
        spent[0] += time.process_time() - t

    Monitor._detect = timed
    try:
        mon = monitor_factory()
        t = time.process_time()
        for i in range(0, len(msgs), BATCH):
            mon.process(msgs[i:i + BATCH], range(i, i + BATCH))
        return spent[0] / (time.process_time() - t)
    finally:
        Monitor._detect = original


def main() -> None:
    global monitor_factory, no_detectors_factory
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    msgs = workload(args.events)
    size = sum(map(len, msgs)) / len(msgs)
    base = monitor()
    monitor_factory = lambda: monitor_from(base)  # noqa: E731
    no_detectors_factory = lambda: monitor_from(base, detectors=False)  # noqa: E731
    print(f"workload: {len(msgs)} events, {size:.0f} bytes/event, 20 numeric + 5 categorical")
    best = {"discard": float("inf"), "batch": float("inf"), "engine": float("inf"),
            "no_detectors": float("inf")}
    for _ in range(args.rounds):
        for name, fn in (("discard", parse_discard), ("batch", parse_batches),
                         ("engine", engine), ("no_detectors", engine_no_detectors)):
            gc.collect()
            best[name] = min(best[name], fn(msgs))
    rate = {k: len(msgs) / v for k, v in best.items()}
    print(f"orjson.loads, results thrown away : {rate['discard']:>10,.0f} events/s")
    print(f"orjson.loads, batches of {BATCH:,} kept: {rate['batch']:>10,.0f} events/s")
    print(f"engine decode+update+evaluate     : {rate['engine']:>10,.0f} events/s")
    print(f"engine without detectors          : {rate['no_detectors']:>10,.0f} events/s")
    print(f"detector cost: {1 - rate['engine'] / rate['no_detectors']:.1%} of the engine's rate "
          f"(share of its CPU time in the detectors: {detector_share(msgs):.1%})")
    print(f"ratio engine/orjson-discard: {rate['engine'] / rate['discard']:.2f}")
    print(f"ratio engine/orjson: {rate['engine'] / rate['batch']:.2f}")


def monitor_from(base, detectors: bool = True):
    from stream_monitor.pipeline import Monitor
    config = base.config
    if not detectors:
        config = config.model_copy(update={"defaults": config.defaults.model_copy(
            update={"detector": "none"})})
    return Monitor(config, {n: p.reference for n, p in base.models.items()})


monitor_factory = None
no_detectors_factory = None

if __name__ == "__main__":
    main()
