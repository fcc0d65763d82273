"""End-to-end throughput through a real broker, beside the engine's bare rate.

Starts the embedded Kafka-protocol broker, produces --events messages to a topic,
then starts the sidecar (`run`'s loop: consume, decode, update, evaluate, deliver,
commit) and times it from its first consumed batch until every event is applied. The
engine's bare rate on the same messages (no Kafka) is measured in the same run.

    python benchmarks/kafka_throughput.py [--events 300000] [--rounds 3] [--guarantee both]

With `--guarantee both` (the default) each round measures the sidecar end to end twice,
in exactly-once mode (transactional checkpoints: state snapshot, offsets and outputs in
one Kafka transaction every `checkpoint.interval`) and in at-least-once mode, side by
side, and the median ratio exactly-once / at-least-once is printed.

The engine alone and the end-to-end runs are alternated for --rounds rounds (each
end-to-end run reads the topic again with a new consumer group), each end-to-end run is
compared with the mean of the engine runs just before and after it, and the median
ratios are printed: on a shared machine a single pair of figures moves by tens of
percent. `--prefetch both` measures each guarantee with and without the fetch thread
that consumes ahead of the loop; `--skip-scale-out` leaves out the last part (`run`
processes sharing a 4-partition topic).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from common import monitor, workload
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_monitor.config import parse_config
from stream_monitor.kafka.broker import EmbeddedBroker
from stream_monitor.kafka.runtime import KafkaSidecar
from stream_monitor.pipeline import Monitor

BATCH = 10_000


def bare_engine_rate(msgs: list[bytes], base: Monitor) -> tuple[float, float, float]:
    """Events per second of wall-clock time, of this thread's and of the process's CPU."""
    mon = Monitor(base.config, {n: p.reference for n, p in base.models.items()})
    t, cpu, proc = time.perf_counter(), time.thread_time(), time.process_time()
    for i in range(0, len(msgs), BATCH):
        mon.process(msgs[i:i + BATCH], range(i, i + BATCH))
    n = len(msgs)
    return (n / (time.perf_counter() - t), n / (time.thread_time() - cpu),
            n / (time.process_time() - proc))


def _loop_cpu(sidecar: KafkaSidecar) -> float:
    """CPU seconds of the loop's thread (the caller) and of its fetch thread if any."""
    total = time.thread_time()
    fetcher = getattr(sidecar, "fetch_thread", None)
    if fetcher is not None and fetcher.ident is not None and fetcher.is_alive():
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(fetcher.ident))
        except OSError:  # ended meanwhile
            pass
    return total


def sidecar_rate(broker: EmbeddedBroker, base: Monitor, n: int, batch_size: int,
                 group: str, guarantee: str = "at_least_once", prefetch: bool = True
                 ) -> tuple[float, float, float, int]:
    """`run`'s loop from the end of its first batch until all n events are applied;
    returns the rate per wall-clock second, per CPU second of the loop's thread(s) and
    per CPU second of the whole process (librdkafka's threads too; the broker is another
    process), and the committed offset after shutdown."""
    ref = next(iter(base.models.values())).reference
    cfg = parse_config({
        "kafka": {"bootstrap.servers": broker.bootstrap_servers, "group.id": group,
                  "session.timeout.ms": 6000, "log.connection.close": False,
                  "fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 10_485_760,
                  "auto.offset.reset": "earliest"},  # produced before the join
        "topics": {"inferences": "bench-in", "alerts": "bench-alerts",
                   "dead_letter": "bench-dlq"},
        "consumer": {"batch_size": batch_size},
        "processing": {"guarantee": guarantee},
        "http": {"host": "127.0.0.1", "port": 0},
        "models": {"churn": {"reference": "unused.json"}}})
    sidecar = KafkaSidecar(cfg, monitor=Monitor(cfg, {"churn": ref}))
    sidecar.prefetch = prefetch
    # (wall, loop thread(s) CPU, process CPU, events applied)
    marks: list[tuple[float, float, float, int]] = []
    sidecar.on_batch = lambda r: marks.append(
        (time.perf_counter(), _loop_cpu(sidecar), time.process_time(),
         sum(sidecar.applied.values())))
    thread = threading.Thread(target=sidecar.run, daemon=True)
    thread.start()
    while sum(sidecar.applied.values()) < n:
        time.sleep(0.005)
    sidecar.stop()
    thread.join(60)
    c = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group})
    committed = sum(tp.offset for tp in c.committed([TopicPartition("bench-in", 0)], 10))
    c.close()
    (w0, c0, p0, e0), (w1, c1, p1, e1) = marks[0], marks[-1]
    return (e1 - e0) / (w1 - w0), (e1 - e0) / (c1 - c0), (e1 - e0) / (p1 - p0), committed


def _median(values: list[float]) -> str:
    v = sorted(values)
    return f"median {v[len(v) // 2]:.2f} (min {v[0]:.2f}, max {v[-1]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3,
                    help="engine alone and end to end, alternated, this many times")
    ap.add_argument("--guarantee", choices=["both", "exactly_once", "at_least_once"],
                    default="both", help="processing guarantee(s) measured end to end")
    ap.add_argument("--prefetch", choices=["on", "off", "both"], default="on",
                    help="the fetch thread consuming ahead of the loop (both: each mode "
                         "with and without it, alternated)")
    ap.add_argument("--skip-scale-out", action="store_true",
                    help="leave out the last part (1 and 2 `run` processes, scale-out)")
    args = ap.parse_args()
    guarantees = (["at_least_once", "exactly_once"] if args.guarantee == "both"
                  else [args.guarantee])
    prefetch = {"on": [True], "off": [False], "both": [True, False]}[args.prefetch]
    variants = {(g if p else f"{g}, no prefetch"): (g, p) for g in guarantees for p in prefetch}
    modes = list(variants)
    msgs = workload(args.events)
    base = monitor()
    with EmbeddedBroker() as broker:
        broker.create_topics({"bench-in": 1, "bench-alerts": 1, "bench-dlq": 1})
        p = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 50,
                      "batch.size": 1_000_000, "log.connection.close": False})
        t = time.perf_counter()
        for i, m in enumerate(msgs):
            while True:
                try:
                    p.produce("bench-in", m)
                    break
                except BufferError:
                    p.poll(0.1)
            if i % 10_000 == 0:
                p.poll(0)
        p.flush(120)
        produce_rate = len(msgs) / (time.perf_counter() - t)
        print(f"events {len(msgs):,}, 1 partition, consume batch {args.batch_size:,}; "
              f"produce to the broker {produce_rate:,.0f} events/s")
        print("each end-to-end run is compared with the engine alone measured just before "
              "and just after it (their mean): the load of a shared machine drifts")
        by_mode: dict[str, list[float]] = {m: [] for m in modes}
        ratios: dict[str, list[float]] = {m: [] for m in modes}
        cpu_ratios: dict[str, list[float]] = {m: [] for m in modes}
        proc_ratios: dict[str, list[float]] = {m: [] for m in modes}
        engine = bare_engine_rate(msgs, base)
        for r in range(args.rounds):
            for mode in modes:
                guarantee, ahead = variants[mode]
                e2e, e2e_cpu, e2e_proc, committed = sidecar_rate(
                    broker, base, len(msgs), args.batch_size, f"bench-{r}-{len(by_mode[mode])}"
                    f"-{guarantee}-{ahead}", guarantee, ahead)
                after = bare_engine_rate(msgs, base)
                wall, cpu, proc = ((x + y) / 2 for x, y in zip(engine, after, strict=True))
                engine = after
                by_mode[mode].append(e2e)
                ratios[mode].append(e2e / wall)
                cpu_ratios[mode].append(e2e_cpu / cpu)
                proc_ratios[mode].append(e2e_proc / proc)
                print(f"round {r + 1}: engine alone {wall:>9,.0f} events/s, end to end "
                      f"({mode}) {e2e:>9,.0f} events/s, ratio {e2e / wall:.2f}; per CPU "
                      f"second of the loop's thread(s) {e2e_cpu / cpu:.2f}, of the process "
                      f"{e2e_proc / proc:.2f} (committed {committed:,} of {len(msgs):,})",
                      flush=True)
    for mode in modes:
        rates = sorted(by_mode[mode])
        print(f"end to end, {mode}: median {rates[len(rates) // 2]:,.0f} events/s")
    if "exactly_once" in modes and "at_least_once" in modes:
        print("ratio exactly-once/at-least-once: " + _median(
            [e / a for e, a in zip(by_mode["exactly_once"], by_mode["at_least_once"],
                                   strict=True)]))
    for mode in modes:
        print(f"ratio end-to-end ({mode})/engine: {_median(ratios[mode])}; per CPU second "
              f"of the loop's thread(s) {_median(cpu_ratios[mode])}, of the process "
              f"{_median(proc_ratios[mode])}")


# -- scale-out: 1 and 2 `run` processes sharing the topic (added for issue 15) --------------

def _committed(broker: EmbeddedBroker, group: str, topic: str, partitions: int) -> int:
    c = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group})
    try:
        return sum(max(0, tp.offset) for tp in c.committed(
            [TopicPartition(topic, p) for p in range(partitions)], 10))
    finally:
        c.close()


def run_processes(broker: EmbeddedBroker, ref_path: str, msgs: list[bytes], instances: int,
                  scale_out: bool, partitions: int, tag: str) -> tuple[float, float]:
    """`instances` `stream-monitor run` processes (exactly-once) started on an empty
    topic; once their group has settled the events are produced. Returns the rate from
    the first committed checkpoint to the last (events/s) and the seconds from the
    start of production until every event was committed."""
    import os
    import subprocess
    import sys
    import tempfile

    import yaml
    group, topic, n = f"so-bench-{tag}", f"{tag}-in", len(msgs)
    broker.create_topics({topic: partitions})
    cfg = {"kafka": {"bootstrap.servers": broker.bootstrap_servers, "group.id": group,
                     "session.timeout.ms": 6000, "log.connection.close": False,
                     "auto.offset.reset": "earliest"},
           "topics": {"inferences": topic, "alerts": f"{tag}-alerts",
                      "dead_letter": f"{tag}-dlq", "partials": f"{tag}-partials"},
           "consumer": {"batch_size": 10_000},
           "checkpoint": {"interval": {"seconds": 0.5}},
           "http": {"host": "127.0.0.1", "port": 0},
           "defaults": {"window": {"seconds": 60, "allowed_lateness": 600}},
           "models": {"churn": {"reference": ref_path}},
           "scale_out": {"enabled": scale_out, "partitions": 2}}
    tmp = tempfile.mkdtemp(prefix="sm-bench-so-")
    procs = []
    start = time.perf_counter()
    for k in range(instances):
        path = os.path.join(tmp, f"i{k}.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump({**cfg, "processing": {"transactional_id": f"{tag}-{k}"}}, fh)
        procs.append(subprocess.Popen([sys.executable, "-m", "stream_monitor", "run",
                                       "--config", path, "--log-level", "warning"]))
    first = None
    try:
        time.sleep(12)   # join, restore, the second member's rebalance: not measured
        start = time.perf_counter()
        p = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 50,
                      "batch.size": 1_000_000, "log.connection.close": False})
        for i, m in enumerate(msgs):
            while True:
                try:
                    p.produce(topic, m, partition=i % partitions)
                    break
                except BufferError:
                    p.poll(0.1)
        p.flush(120)
        while True:
            done = _committed(broker, group, topic, partitions)
            now = time.perf_counter()
            if done and first is None:
                first = (now, done)
            if done >= n:
                break
            if now - start > 600 or any(p.poll() is not None for p in procs):
                raise SystemExit(f"{instances} instance(s): {done:,} of {n:,} committed")
            time.sleep(0.1)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    t0, e0 = first
    return (n - e0) / max(1e-9, now - t0), now - start


def scale_out_main() -> None:
    """1 process, then 2 processes of `run` in scale-out mode, and 1 without scale-out,
    end to end through the broker on the same 4-partition topic (one core each)."""
    import tempfile
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300_000)
    args, _ = ap.parse_known_args()
    msgs = workload(args.events)
    ref_path = f"{tempfile.mkdtemp(prefix='sm-bench-ref-')}/churn.json"
    next(iter(monitor().models.values())).reference.save(ref_path)
    partitions = 4
    with EmbeddedBroker() as broker:
        print(f"\nscale-out: {len(msgs):,} events on {partitions} partitions, exactly-once, "
              f"event-time windows of 60 s; `run` processes, produced once they joined")
        rates = {}
        for label, instances, scale in (("1 process, no scale-out", 1, False),
                                        ("1 process, scale-out", 1, True),
                                        ("2 processes, scale-out", 2, True)):
            tag = f"so{instances}{int(scale)}"
            rate, total = run_processes(broker, ref_path, msgs, instances, scale,
                                        partitions, tag)
            rates[label] = rate
            print(f"{label:<26} {rate:>9,.0f} events/s between checkpoints "
                  f"({total:.1f} s from the first produced event to the last committed)")
        base = rates["1 process, scale-out"]
        print(f"ratio scale-out 1 process / no scale-out: "
              f"{base / rates['1 process, no scale-out']:.2f}; "
              f"2 processes / 1 process: {rates['2 processes, scale-out'] / base:.2f}")


if __name__ == "__main__":
    main()
    if "--skip-scale-out" not in sys.argv:
        scale_out_main()
