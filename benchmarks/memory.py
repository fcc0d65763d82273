"""Resident memory of the engine over a long stream: flat, not growing with its length.

Feeds --events (default 10M) events through the engine (a pool of 500k distinct
generated events, cycled with increasing positions) and prints RSS after 1M events,
after all of them, and the difference. --workload realistic uses the realistic
workload of `throughput.py` (booleans, absent keys, nulls, a 5,000-category feature).

    python benchmarks/memory.py [--events 10000000] [--workload clean|realistic]
"""

from __future__ import annotations

import argparse
import os

from common import monitor, realistic_monitor, realistic_workload, workload
from rich.progress import Progress

BATCH = 10_000


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--pool", type=int, default=500_000)
    ap.add_argument("--workload", choices=["clean", "realistic"], default="clean")
    args = ap.parse_args()
    if args.workload == "clean":
        pool, mon = workload(args.pool, seed=5), monitor()
    else:
        pool, mon = realistic_workload(args.pool, seed=5), realistic_monitor()
    marks = {}
    done = windows = 0
    with Progress(transient=True, disable=not os.isatty(2)) as bar:
        task = bar.add_task("events", total=args.events)
        while done < args.events:
            start = done % len(pool)
            batch = pool[start:start + BATCH]
            res = mon.process(batch, range(done, done + len(batch)))
            windows += len(res.reports)
            done += len(batch)
            bar.update(task, completed=done)
            if done == 1_000_000:
                marks["1M"] = rss_mb()
    marks["end"] = rss_mb()
    print(f"{args.workload} workload: events {done:,}, windows closed {windows}")
    print(f"RSS after 1M events : {marks.get('1M', float('nan')):.1f} MB")
    print(f"RSS after {done / 1e6:.0f}M events: {marks['end']:.1f} MB")
    print(f"difference: {marks['end'] - marks.get('1M', float('nan')):+.1f} MB")


if __name__ == "__main__":
    main()
