"""Cost of performance monitoring: the engine with and without the label join, one core.

Throughput (default): the same workload as throughput.py (20 numeric + 5 categorical
features), batches of 10,000 events, measured side by side in one run (CPU time of the
process): the engine alone, and the engine with the label join on and 10% of the events
labelled (each batch is followed by the label events of a tenth of its predictions, as
a consumer of both topics sees them). The two monitors take each batch in turn (which
one goes first alternates), over --rounds fresh runs; per batch the best of the rounds
is kept and summed, as throughput.py does, so that a burst of load on a shared machine
spoils one batch of one round, not the figure. The whole measurement is repeated
--repeats times (fresh monitors each time): each repeat prints both rates and the join's
cost as a share of the rate (and in ms per batch), and the figure is their median,
printed with their spread (a shared 2-core host moves one measurement by several points:
one figure alone proves little).

Checkpoint: the per-batch checkpoint of the Kafka edge (`Monitor.checkpoint`, taken
before every batch so that a poison message can be rolled back) with the join buffer as
the run left it, in ms per call, beside the engine's time per batch of 10,000; then with
1,000 joined pairs waiting in the open performance window (labels for other predictions
of the last batch), as a checkpoint between two window closes sees it.

Parts (--parts): the same run, with a CPU timer around each part of the join (the
decoders of both monitors, the join's steps), printed in ms per batch of 10,000 (per
batch the best of the rounds): where the join's cost goes. The timers add a few
microseconds per call; read the parts, not the rates, of that run.

Steps (--steps): single steps of the join, hot, each beside the plain numpy or msgspec
call it replaces, on the workload's first batch (same outputs, checked): the event ids'
keys (a cast-multiply-sum vs numpy's integer matmul, 10,000 ids), CBPE's score sort
(two radix passes vs `np.sort`, 10,000 scores); ms per call, the best of
--step-calls calls, and their ratio.

Memory (--memory N): N predictions through the join with 10% of them labelled and the
rest never labelled; prints RSS after 1M and after N predictions (the join buffer is
bounded by count and age, so RSS stays flat).

    python benchmarks/labels.py [--events 200000] [--rounds 3] [--repeats 3] [--parts]
    python benchmarks/labels.py --steps
    python benchmarks/labels.py --memory 10000000
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import orjson
from common import monitor, workload

from stream_monitor.config import parse_config
from stream_monitor.pipeline import Monitor

BATCH = 10_000


def label_events(msgs: list[bytes], every: int = 10) -> list[list[bytes]]:
    """Per batch, the label events of every `every`-th prediction (10%), hours late."""
    out = []
    for i in range(0, len(msgs), BATCH):
        batch = []
        for m in msgs[i:i + BATCH:every]:
            ev = orjson.loads(m)
            batch.append(orjson.dumps({"model": ev["model"], "event_id": ev["event_id"],
                                       "label": int(ev["prediction"] > 0.3),
                                       "ts": ev["ts"] + 3600.0}))
        out.append(batch)
    return out


def with_labels(base: Monitor) -> Monitor:
    data = base.config.model_dump(exclude={"base_dir", "source"}, exclude_unset=True, by_alias=True)
    data["topics"] = {"labels": "labels"}
    cfg = parse_config(data)
    return Monitor(cfg, {n: p.reference for n, p in base.models.items()})


def plain(base: Monitor) -> Monitor:
    return Monitor(base.config, {n: p.reference for n, p in base.models.items()})


def run(monitors: list[tuple[Monitor, bool]], msgs: list[bytes], labels: list[list[bytes]],
        parts: dict[str, list[float]] | None = None) -> list[list[float]]:
    """Per monitor, the CPU time of each batch (with its labels when the flag is set).

    The monitors take each batch in turn, the first one alternating: the batch is in the
    CPU cache for whoever goes second, and both get that advantage equally often.
    """
    # CPU time of this process: the figure that matters for one core, and one that a
    # machine shared with other work does not distort as much as wall time
    clock = time.process_time
    times: list[list[float]] = [[] for _ in monitors]
    for k, i in enumerate(range(0, len(msgs), BATCH)):
        for per_batch in (parts or {}).values():
            per_batch.append(0.0)
        order = list(enumerate(monitors))
        for j, (mon, labelled) in order if k % 2 == 0 else order[::-1]:
            t = clock()
            mon.process(msgs[i:i + BATCH], range(i, i + BATCH))
            if labelled:
                mon.process_labels(labels[k], range(len(labels[k])))
            times[j].append(clock() - t)
    return times


# the parts timed by --parts: (label, object path from the labelled monitor, method)
PARTS = [
    ("decode, engine alone", "plain.decoder", "decode"),
    ("decode, with the join's fields", "mon.decoder", "decode"),
    ("predictions into the join", "mon", "_join_predictions"),
    ("  CBPE estimate windows", "mp", "add_estimates"),
    ("  buffering (keys, sort, merges)", "mp.buffer", "add_predictions"),
    ("labels (decode, join, windows)", "mon", "process_labels"),
    ("  label events' decode", "stream_monitor.pipeline", "decode_labels"),
    ("  label lookups and pairs", "mp.buffer", "add_label_columns"),
    ("  performance windows", "mon.performance", "close"),
]


def timed_parts(plain_mon: Monitor, mon: Monitor, times: dict[str, list[float]]) -> None:
    """Wrap each part in a CPU timer adding to `times[label][-1]` (one slot per batch)."""
    import importlib

    mp = mon.performance.models["churn"]
    where = {"plain": plain_mon, "mon": mon, "mp": mp}
    for label, path, name in PARTS:
        head, *rest = path.split(".")
        obj = where.get(head) or importlib.import_module(path)
        if head in where:
            for attr in rest:
                obj = getattr(obj, attr)
        inner = getattr(obj, name)

        def timer(*a, _f=inner, _label=label, **k):
            t = time.process_time()
            try:
                return _f(*a, **k)
            finally:
                times[_label][-1] += time.process_time() - t
        setattr(obj, name, timer)


def checkpoint_cost(mon: Monitor, calls: int = 20) -> float:
    """CPU ms of one `Monitor.checkpoint()` (the buffer as it is)."""
    t = time.process_time()
    for _ in range(calls):
        mon.checkpoint()
    return (time.process_time() - t) / calls * 1e3


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(n: int, pool_size: int) -> None:
    pool = workload(pool_size, seed=5)
    mon = with_labels(monitor())
    labels = label_events(pool)
    done, marks = 0, {}
    while done < n:
        start = done % len(pool)
        batch = pool[start:start + BATCH]
        # fresh event ids each cycle, so no prediction is ever a duplicate
        tag = f"-{done // len(pool)}".encode()
        batch = [m.replace(b'","ts"', tag + b'","ts"', 1) for m in batch]
        labs = [m.replace(b'","label"', tag + b'","label"', 1)
                for m in labels[start // BATCH]]
        mon.process(batch, range(done, done + len(batch)))
        mon.process_labels(labs, range(len(labs)))
        done += len(batch)
        if done % 1_000_000 == 0:
            mark = marks[f"{done // 1_000_000}M"] = rss_mb()
            print(f"RSS after {done // 1_000_000}M predictions: {mark:.1f} MB", flush=True)
    marks["end"] = rss_mb()
    buf = mon.performance.models["churn"].buffer
    print(f"predictions {done:,}, joined {buf.joined:,}, waiting {len(buf.predictions):,} "
          f"(max {buf.bounds.max_predictions:,}), unjoined {dict(buf.unjoined)}")
    print(f"RSS after 1M predictions : {marks.get('1M', float('nan')):.1f} MB")
    print(f"RSS after {done / 1e6:.0f}M predictions: {marks['end']:.1f} MB")
    print(f"difference: {marks['end'] - marks.get('1M', float('nan')):+.1f} MB")


def best_ms(call, calls: int) -> float:
    """The fastest of `calls` calls, in ms (hot: the first call warms the caches)."""
    call()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def steps(msgs: list[bytes], calls: int) -> None:
    import numpy as np

    from stream_monitor.core import join
    from stream_monitor.core.perfstats import sorted_unit

    events = [orjson.loads(m) for m in msgs[:BATCH]]
    codes = np.array([e["event_id"].encode() for e in events])   # fixed-width bytes
    codes = codes.view(np.uint8).reshape(len(events), -1)
    powers = join._POWERS[:codes.shape[1]]
    assert np.array_equal(join._weighted(codes), codes @ powers)
    scores = np.array([e["prediction"] for e in events], np.float64)
    assert np.array_equal(sorted_unit(scores), np.sort(scores))
    rows = [
        (f"join keys of {len(events):,} ids", lambda: join._weighted(codes),
         lambda: codes @ powers, "integer matmul"),
        (f"CBPE sort of {scores.size:,} scores", lambda: sorted_unit(scores),
         lambda: np.sort(scores), "np.sort"),
    ]
    print(f"steps, ms per call (best of {calls:,} calls, hot):")
    for label, new, old, old_name in rows:
        a, b = best_ms(new, calls), best_ms(old, calls)
        print(f"  {label:28s} {a:6.3f}  vs {old_name:>14s} {b:6.3f}  ({a / b:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3,
                    help="independent measurements (fresh monitors, --rounds each): the "
                         "join's cost is their median, printed with their spread")
    ap.add_argument("--memory", type=int, default=0, help="predictions for the RSS check")
    ap.add_argument("--pool", type=int, default=100_000, help="distinct generated events")
    ap.add_argument("--parts", action="store_true", help="time each part of the join")
    ap.add_argument("--steps", action="store_true",
                    help="time single steps of the join beside the calls they replace")
    ap.add_argument("--step-calls", type=int, default=500)
    args = ap.parse_args()
    if args.memory:
        memory(args.memory, args.pool)
        return
    msgs = workload(args.events)
    if args.steps:
        steps(msgs, args.step_calls)
        return
    labels = label_events(msgs)
    base = monitor()
    print(f"workload: {len(msgs)} events, {sum(map(len, labels))} labels (10%), "
          f"{args.repeats} repeats of {args.rounds} rounds, per batch the best of a "
          f"repeat's rounds")
    parts: dict[str, list[list[float]]] = {label: [] for label, _, _ in PARTS}
    costs, per_batch_ms = [], []
    for repeat in range(args.repeats):
        rounds: dict[str, list[list[float]]] = {"engine": [], "join": []}
        for _ in range(args.rounds):
            gc.collect()
            mon, alone = with_labels(base), plain(base)
            times: dict[str, list[float]] = {label: [] for label in parts}
            if args.parts:
                timed_parts(alone, mon, times)
            engine, join = run([(alone, False), (mon, True)], msgs, labels,
                               times if args.parts else None)
            rounds["engine"].append(engine)
            rounds["join"].append(join)
            for label, per_batch in times.items():
                parts[label].append(per_batch)
        best = {k: sum(map(min, zip(*v, strict=True))) for k, v in rounds.items()}
        rate = {k: len(msgs) / v for k, v in best.items()}
        cost = 1 - rate["join"] / rate["engine"]
        costs.append(cost)
        batches = len(msgs) / BATCH
        extra = (best["join"] - best["engine"]) / batches * 1e3
        per_batch_ms.append(best["join"] / batches * 1e3)
        print(f"repeat {repeat + 1}: engine, no labels {rate['engine']:>9,.0f} events/s; "
              f"engine + join, 10% labelled {rate['join']:>9,.0f} events/s; join cost "
              f"{cost:.1%} of the rate ({extra:.2f} ms per batch of {BATCH:,})", flush=True)
    print(f"engine, no labels            : {rate['engine']:>10,.0f} events/s (last repeat)")
    print(f"engine + join, 10% labelled  : {rate['join']:>10,.0f} events/s (last repeat)")
    print(f"join cost: {statistics.median(costs):.1%} of the rate, the median of "
          f"{len(costs)} repeats (spread {min(costs):.1%} to {max(costs):.1%}; ratio "
          f"{1 - statistics.median(costs):.2f})")
    mp = mon.performance.models["churn"]
    waiting = len(mp.buffer.predictions)
    per_batch = statistics.median(per_batch_ms)
    print(f"checkpoint with {waiting:,} predictions waiting: {checkpoint_cost(mon):.2f} ms "
          f"per batch (a batch of {BATCH:,} costs {per_batch:.1f} ms)")
    # labels for other predictions of the last batch: an open window half full, as a
    # checkpoint taken between two window closes sees it
    pending = sum(w.n for w in mp.windows.values())
    need = (mp.s.window // 2 - pending) % mp.s.window
    unlabelled = [m for j, m in enumerate(msgs[-BATCH:]) if j % 10][:need]
    more = label_events(unlabelled, every=1)[0] if unlabelled else []
    mon.process_labels(more, range(len(more)))
    pending = sum(w.n for w in mp.windows.values())
    print(f"checkpoint with {len(mp.buffer.predictions):,} predictions waiting and {pending:,} "
          f"joined pairs in the open window: {checkpoint_cost(mon):.2f} ms per batch")
    if args.parts:
        batches = len(msgs) // BATCH
        print(f"parts, ms per batch of {BATCH:,} (per batch the best of the rounds):")
        for label, runs in parts.items():
            print(f"  {label:34s} {sum(map(min, zip(*runs, strict=True))) / batches * 1e3:6.2f}")


if __name__ == "__main__":
    main()
