"""Engine throughput against bare orjson.loads on the same messages, one core.

Two workloads: "clean" (the repo's own generator: 20 numeric + 5 categorical features,
no absent keys) and "realistic" (`common.realistic_workload`: booleans, 2% absent keys,
2% nulls, a 5,000-category Zipf feature, integer features with ties, Cauchy and
Student-t tails). For each, measured side by side in one run (--rounds interleaved;
per batch of 10,000 the best round, summed), every figure also as a ratio to batch
orjson.loads:

  * parse floor: orjson.loads with each result thrown away,
  * batch orjson.loads: batches of 10,000 whose results are kept for the batch (the
    baseline any consumer that decodes a batch pays),
  * typed decoder alone: the msgspec Structs of the model's schema, kept per batch,
  * Decoder.decode: typed decoding plus the numpy columns of the batch,
  * Monitor.process: decode + update + evaluate, the code path of `replay` and `run`
    (windows of 10,000 events, so every batch also closes and evaluates a window),
  * replay end to end: `replay()` over the same events in a JSONL file, writing its
    output files (interpreter start-up excluded: reported on its own below),
  * Monitor.process with the sequential detectors switched off, their cost as the drop
    in rate and as their share of Monitor.process's CPU time measured inside one run
    (the budget: 10%).

Times are CPU time of this process by default (--clock cpu): the machine is shared,
and CPU time is what other processes disturb least; --clock wall for wall time.
Start-up is wall time of `python -m stream_monitor replay` on a one-line file, beside
`python -c pass` and the import of the replay path.

    python benchmarks/throughput.py [--events 100000] [--rounds 7] [--workload both]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from common import realistic_workload, workload

from stream_monitor.config import ProfileConfig, load_config
from stream_monitor.core.reference import Reference, build_reference
from stream_monitor.io.decode import _CHUNK as CHUNK
from stream_monitor.io.replay import replay
from stream_monitor.pipeline import Monitor

BATCH = 10_000
CLOCK = time.process_time


# Each step returns the time of every batch of 10,000: the figure of a step is the sum
# over batches of each batch's best time across rounds (a burst of load on the shared
# machine then spoils one batch of one round, not a whole round).

def parse_discard(msgs: list[bytes], _) -> list[float]:
    loads, out = orjson.loads, []
    for i in range(0, len(msgs), BATCH):
        t = CLOCK()
        for m in msgs[i:i + BATCH]:
            loads(m)
        out.append(CLOCK() - t)
    return out


def parse_batches(msgs: list[bytes], _) -> list[float]:
    loads, out = orjson.loads, []
    for i in range(0, len(msgs), BATCH):
        t = CLOCK()
        kept = [loads(m) for m in msgs[i:i + BATCH]]
        del kept
        out.append(CLOCK() - t)
    return out


def typed_alone(msgs: list[bytes], setup) -> list[float]:
    """The structs of every message (the decoder's chunks, an event with a category
    outside its Literal type decoded again by the plain type), kept per batch."""
    decoder = setup.monitor().decoder
    decoder.decode(msgs[:BATCH], range(BATCH))  # learns the producers' key order, as in use
    fast, types = decoder._fast_decoder()
    out = []
    for i in range(0, len(msgs), BATCH):
        batch = msgs[i:i + BATCH]
        t = CLOCK()
        kept = [decoder._typed_chunk(fast, types, batch, lo, min(lo + CHUNK, len(batch)),
                                     [], [])[0] for lo in range(0, len(batch), CHUNK)]
        del kept
        out.append(CLOCK() - t)
    return out


def decode_columns(msgs: list[bytes], setup) -> list[float]:
    decoder, out = setup.monitor().decoder, []
    for i in range(0, len(msgs), BATCH):
        t = CLOCK()
        decoder.decode(msgs[i:i + BATCH], range(i, i + BATCH))
        out.append(CLOCK() - t)
    return out


def process(msgs: list[bytes], setup, detectors: bool = True) -> list[float]:
    mon, out = setup.monitor(detectors), []
    for i in range(0, len(msgs), BATCH):
        t = CLOCK()
        mon.process(msgs[i:i + BATCH], range(i, i + BATCH))
        out.append(CLOCK() - t)
    return out


def replay_file(msgs: list[bytes], setup) -> list[float]:
    """One figure: `replay` is one call over the whole file (best of rounds)."""
    t = CLOCK()
    summary = replay(setup.config, setup.events, setup.tmp / "out", progress=False)
    elapsed = CLOCK() - t
    assert summary.counted == len(msgs), summary.as_text()
    return [elapsed]


def process_no_detectors(msgs: list[bytes], setup) -> list[float]:
    """Monitor.process with the sequential detectors switched off: their cost."""
    return process(msgs, setup, detectors=False)


STEPS = [("parse floor: orjson.loads, thrown away", parse_discard),
         (f"batch orjson.loads ({BATCH:,} kept)", parse_batches),
         ("typed msgspec decoder alone", typed_alone),
         ("Decoder.decode (typed + columns)", decode_columns),
         ("Monitor.process", process),
         ("replay end to end (no start-up)", replay_file),
         ("Monitor.process, detectors off", process_no_detectors)]
BASELINE = 1


class Setup:
    """A workload on disk: reference, config and events file, and monitors for it."""

    def __init__(self, name: str, msgs: list[bytes], train: list[bytes], model: str):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sm-bench-{name}-"))
        (self.tmp / "train.jsonl").write_bytes(b"\n".join(train) + b"\n")
        ref = build_reference(self.tmp / "train.jsonl", model, ProfileConfig())
        ref.save(self.tmp / "ref.json")
        self.reference = Reference.load(self.tmp / "ref.json")
        self.config_path = self.tmp / "config.yaml"
        self.config_path.write_text(f"defaults:\n  window:\n    events: {BATCH}\n"
                                    f"models:\n  {model}:\n    reference: ref.json\n")
        self.config = load_config(self.config_path)
        self.model = model
        self.events = self.tmp / "events.jsonl"
        self.events.write_bytes(b"\n".join(msgs) + b"\n")
        (self.tmp / "one.jsonl").write_bytes(msgs[0] + b"\n")

    def monitor(self, detectors: bool = True) -> Monitor:
        config = self.config
        if not detectors:
            config = config.model_copy(update={"defaults": config.defaults.model_copy(
                update={"detector": "none"})})
        return Monitor(config, {self.model: self.reference})


def _wall(cmd: list[str], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t)
    return best


def start_up(setup: Setup, rounds: int) -> None:
    py = sys.executable
    bare = _wall([py, "-c", "pass"], rounds)
    imports = _wall([py, "-c", "import stream_monitor.cli, stream_monitor.io.replay"], rounds)
    cmd = _wall([py, "-m", "stream_monitor", "replay", "--quiet", "--config",
                 str(setup.config_path), "--input", str(setup.tmp / "one.jsonl"), "--out",
                 str(setup.tmp / "out1")], rounds)
    print(f"start-up (wall, best of {rounds}): interpreter {bare:.2f} s, + imports of the "
          f"replay path {imports - bare:.2f} s, `replay` of one line {cmd:.2f} s in all")


def detector_share(msgs: list[bytes], setup) -> float:
    """Share of the engine's CPU time spent in the detectors, measured inside one run
    (robust when other processes make the with/without rates noisy)."""
    from stream_monitor.pipeline import Monitor
    spent = [0.0]
    original = Monitor._detect

    def timed(self, *args):
        t = time.process_time()
        out = original(self, *args)
        spent[0] += time.process_time() - t
        return out      # the alarms, for `process` to judge in event order

    Monitor._detect = timed
    try:
        mon = setup.monitor()
        t = time.process_time()
        for i in range(0, len(msgs), BATCH):
            mon.process(msgs[i:i + BATCH], range(i, i + BATCH))
        return spent[0] / (time.process_time() - t)
    finally:
        Monitor._detect = original


def measure(name: str, events: int, rounds: int) -> None:
    """Every step of one workload, interleaved over the rounds, printed with its ratios."""
    if name == "clean":
        msgs = workload(events)
        setup = Setup("clean", msgs, workload(50_000, seed=1), "churn")
    else:
        msgs = realistic_workload(events)
        setup = Setup("realistic", msgs, realistic_workload(50_000, seed=99), "rt")
    times: dict = {label: [] for label, _ in STEPS}
    for _ in range(rounds):
        for label, fn in STEPS:
            gc.collect()
            times[label].append(fn(msgs, setup))
    best = {k: sum(map(min, zip(*v, strict=True))) for k, v in times.items()}
    size = sum(map(len, msgs)) / len(msgs)
    print(f"\n{name} workload ({size:.0f} bytes/event)")
    base = len(msgs) / best[STEPS[BASELINE][0]]
    for label, _ in STEPS:
        rate = len(msgs) / best[label]
        print(f"  {label:<40} {rate:>10,.0f} events/s  {rate / base:5.2f}x")
    ratio = {k: best[STEPS[BASELINE][0]] / best[k] for k in best}
    print(f"  sequential detectors: {1 - best[STEPS[6][0]] / best[STEPS[4][0]]:.1%} of "
          f"Monitor.process's rate; {detector_share(msgs, setup):.1%} of its CPU time")
    print(f"  ratios to batch orjson.loads -- {name}: process "
          f"{ratio[STEPS[4][0]]:.2f}x, replay {ratio[STEPS[5][0]]:.2f}x", flush=True)
    if name == "realistic" or os.environ.get("SM_BENCH_STARTUP"):
        print()
        start_up(setup, rounds)


def labelled(events: int, rounds: int) -> None:
    """The engine with 10% of the events labelled (issue 13): `labels.py` in a process of
    its own prints the engine's rate with and without the label join and the join's cost."""
    print("\nclean workload, 10% of the events labelled (benchmarks/labels.py)", flush=True)
    # at least 200,000 events: 100,000 labelled 10% fill only the 5 reference windows of
    # 2,000 labels, so a shorter run never measures the steady state (detector, findings)
    subprocess.run([sys.executable, str(Path(__file__).with_name("labels.py")), "--events",
                    str(max(events, 200_000)), "--rounds", str(rounds)], check=True)


def main() -> None:
    global CLOCK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workload", choices=["clean", "realistic", "both"], default="both")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one workload here
    args = ap.parse_args()
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.one:
        measure(args.one, args.events, args.rounds)
        return
    print(f"{args.events:,} events per workload, {args.rounds} rounds (per batch the best, "
          f"summed; replay: best run), {args.clock} time, one core; each workload in a "
          f"process of its own (one workload's heap does not disturb the other's)")
    names = ["clean", "realistic"] if args.workload == "both" else [args.workload]
    for name in names:
        subprocess.run([sys.executable, __file__, "--one", name, "--events", str(args.events),
                        "--rounds", str(args.rounds), "--clock", args.clock], check=True)
    labelled(args.events, args.rounds)


if __name__ == "__main__":
    main()
