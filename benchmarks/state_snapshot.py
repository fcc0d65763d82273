"""Size and time of one model's state snapshot (`Monitor.snapshot` / `Monitor.restore`).

The realistic 25-feature model (`common.realistic_workload`: 5,000-category feature,
absent keys, nulls) with the default settings (sequential detectors on), mid-window and
mid-block: an open window of --open events. Printed side by side in one run: the
snapshot's bytes, snapshot and restore time (best of --rounds), and `Monitor.checkpoint`
(the per-batch in-memory rollback copy) for scale, with the snapshot time as a share of
applying one batch of 5,000 events.

    python benchmarks/state_snapshot.py [--open 7000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

from common import realistic_monitor, realistic_workload


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--open", type=int, default=7000, help="events in the open window")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    monitor = realistic_monitor(window_events=10_000)
    events = realistic_workload(20_000 + args.open + 5000)
    head = 20_000 + args.open
    for k in range(0, head, 5000):
        chunk = events[k:min(k + 5000, head)]
        monitor.process(chunk, range(k, k + len(chunk)))
    model = "rt"
    pipe = monitor.models[model]
    data = monitor.snapshot(model)
    fresh = realistic_monitor(window_events=10_000)
    batch = events[head:]


    t_snap = best(lambda: monitor.snapshot(model), args.rounds)
    t_restore = best(lambda: fresh.restore(model, data), args.rounds)
    t_checkpoint = best(monitor.checkpoint, args.rounds)

    def restored_batch() -> None:  # from the same state every round: restore, then apply
        fresh.restore(model, data)
        fresh.process(batch, range(head, head + len(batch)))

    t_batch = best(restored_batch, args.rounds) - t_restore
    features = len(pipe.schema.numeric) + len(pipe.schema.categorical)
    print(f"model {model}: {features} features, {pipe.evaluator.layout.numeric.size} numeric "
          f"+ {pipe.evaluator.layout.categorical.size} categorical slots; open window "
          f"{pipe.windows.open_events} events, detectors "
          f"{'on' if pipe.detectors is not None else 'off'}")
    print(f"snapshot size      {len(data):>9,} bytes")
    print(f"snapshot           {t_snap * 1e3:9.2f} ms")
    print(f"restore            {t_restore * 1e3:9.2f} ms")
    print(f"checkpoint (copy)  {t_checkpoint * 1e3:9.2f} ms   (snapshot / checkpoint: "
          f"{t_snap / t_checkpoint:.1f}x)")
    print(f"apply 5,000 events {t_batch * 1e3:9.2f} ms   (snapshot / batch: "
          f"{t_snap / t_batch:.1%})")


if __name__ == "__main__":
    main()
