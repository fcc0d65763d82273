"""End-to-end throughput through a real broker, beside the engine's bare rate.

Starts the embedded Kafka-protocol broker, produces --events messages to a topic,
then starts the sidecar (`run`'s loop: consume, decode, update, evaluate, deliver,
commit) and times it from its first consumed batch until every event is applied. The
engine's bare rate on the same messages (no Kafka) is measured in the same run.

    python benchmarks/kafka_throughput.py [--events 500000] [--rounds 5] [--guarantee both]

With `--guarantee both` (the default) each round measures the sidecar end to end twice,
in exactly-once mode (transactional checkpoints: state snapshot, offsets and outputs in
one Kafka transaction every `checkpoint.interval`) and in at-least-once mode, side by
side, and the median ratio exactly-once / at-least-once is printed.

The engine alone and the end-to-end runs are alternated for --rounds rounds (each
end-to-end run reads the topic again with a new consumer group), each end-to-end run is
compared with the mean of the engine runs just before and after it, and the median
ratios are printed: on a shared machine a single pair of figures moves by tens of
percent. `--prefetch` chooses where the next batch is consumed while the loop applies
the current one (`consumer.prefetch`): `process` (a child process owns the consumer),
`thread` (a fetch thread), `none`, or several, comma-separated (`all`: the three), each
measured in every round, side by side; the CPU per event of the loop's thread, of the
fetch thread or child process, and of the whole process is printed beside the rates.
`--pin` adds, beside each fetch-process mode, the same with the loop's thread alone on one
CPU and the fetch process and the broker on the others (Linux affinity), side by side: on
a 2-core host it shows how much of the gap is the scheduler placing them on one core.
Each end-to-end run prints the cores other jobs of the host took meanwhile (the host's busy
CPU, steal included, less this process, its child and the broker): `run` needs more than
one core where the engine alone needs one, so other jobs slow it more.
`--skip-scale-out` leaves out the last part (`run` processes sharing a 4-partition topic).
"""

from __future__ import annotations

import argparse
import os
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
_QUIET = 0.25  # cores taken by other jobs under which a round counts as quiet


def bare_engine_rate(msgs: list[bytes], base: Monitor) -> tuple[float, float, float]:
    """Events per second of wall-clock time, of this thread's and of the process's CPU."""
    mon = Monitor(base.config, {n: p.reference for n, p in base.models.items()})
    t, cpu, proc = time.perf_counter(), time.thread_time(), time.process_time()
    for i in range(0, len(msgs), BATCH):
        mon.process(msgs[i:i + BATCH], range(i, i + BATCH))
    n = len(msgs)
    return (n / (time.perf_counter() - t), n / (time.thread_time() - cpu),
            n / (time.process_time() - proc))


def _pid_cpu(pid: int | None) -> float:
    """CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, TypeError):
        return 0.0


def _host_busy() -> float:
    """CPU seconds all cores of the host spent busy so far (Linux /proc/stat; 0
    elsewhere): less what this benchmark's processes used, what other jobs took."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _pin(pid: int | None, cpus: set[int]) -> None:
    """Every thread of a process onto `cpus` (Linux; `--pin`)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # ended meanwhile
            pass


def _fetch_cpu(sidecar: KafkaSidecar) -> float:
    """CPU seconds of the fetch thread or of the fetch process (whichever runs)."""
    child = getattr(sidecar, "fetch_process", None)
    if child is not None:
        return child.cpu_seconds()
    fetcher = getattr(sidecar, "fetch_thread", None)
    if fetcher is not None and fetcher.ident is not None and fetcher.is_alive():
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(fetcher.ident))
        except OSError:  # ended meanwhile
            pass
    return 0.0


def sidecar_rate(broker: EmbeddedBroker, base: Monitor, n: int, batch_size: int,
                 group: str, guarantee: str = "at_least_once", prefetch: str = "process",
                 pin: bool = False) -> tuple[float, float, float, float, int, float, float]:
    """`run`'s loop from the end of its first batch until all n events are applied;
    returns the rate per wall-clock second, the CPU seconds per event of the loop's
    thread, of the fetch thread or process, and of the whole process (librdkafka's
    threads too, the child process too; the broker is another process), the committed
    offset after shutdown, the broker's CPU seconds per event and the cores other jobs
    of the host took meanwhile (busy CPU of the host less this process, its child and
    the broker, over the wall-clock time). `pin`: the loop's thread alone on the first
    CPU of this process's, the fetch process and the broker on the others."""
    ref = next(iter(base.models.values())).reference
    cfg = parse_config({
        "kafka": {"bootstrap.servers": broker.bootstrap_servers, "group.id": group,
                  "session.timeout.ms": 6000, "log.connection.close": False,
                  "fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 10_485_760,
                  "auto.offset.reset": "earliest"},  # produced before the join
        "topics": {"inferences": "bench-in", "alerts": "bench-alerts",
                   "dead_letter": "bench-dlq"},
        "consumer": {"batch_size": batch_size, "prefetch": prefetch},
        "processing": {"guarantee": guarantee},
        "http": {"host": "127.0.0.1", "port": 0},
        "models": {"churn": {"reference": "unused.json"}}})
    sidecar = KafkaSidecar(cfg, monitor=Monitor(cfg, {"churn": ref}))
    # (wall, loop thread CPU, fetch thread/process CPU, process(es) CPU, events applied,
    #  broker CPU, host busy CPU)
    marks: list[tuple[float, float, float, float, int, float, float]] = []

    cpus = sorted(os.sched_getaffinity(0)) if pin else []
    pin = pin and len(cpus) > 1 and prefetch == "process"
    if pin:
        _pin(broker.pid, set(cpus[1:]))

    def mark(_result) -> None:
        if pin and not marks:  # the child's librdkafka threads exist by now
            _pin(sidecar.fetch_process.pid, set(cpus[1:]))
        fetch = _fetch_cpu(sidecar)
        own = time.process_time()
        marks.append((time.perf_counter(), time.thread_time(), fetch,
                      own + (fetch if prefetch == "process" else 0.0),
                      sum(sidecar.applied.values()), _pid_cpu(broker.pid), _host_busy()))

    sidecar.on_batch = mark
    def loop() -> None:
        if pin:  # this thread only (Linux: pid 0 is the calling thread)
            os.sched_setaffinity(0, {cpus[0]})
        sidecar.run()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    while sum(sidecar.applied.values()) < n:
        time.sleep(0.005)
    sidecar.stop()
    thread.join(60)
    if pin:
        _pin(broker.pid, set(cpus))
    c = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group})
    committed = sum(tp.offset for tp in c.committed([TopicPartition("bench-in", 0)], 10))
    c.close()
    (w0, c0, f0, p0, e0, b0, h0), (w1, c1, f1, p1, e1, b1, h1) = marks[0], marks[-1]
    k = e1 - e0
    others = max(0.0, (h1 - h0) - (p1 - p0) - (b1 - b0)) / (w1 - w0)
    return (k / (w1 - w0), (c1 - c0) / k, (f1 - f0) / k, (p1 - p0) / k, committed,
            (b1 - b0) / k, others)


def _median(values: list[float]) -> str:
    v = sorted(values)
    return f"median {v[len(v) // 2]:.2f} (min {v[0]:.2f}, max {v[-1]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5,
                    help="engine alone and end to end, alternated, this many times")
    ap.add_argument("--guarantee", choices=["both", "exactly_once", "at_least_once"],
                    default="both", help="processing guarantee(s) measured end to end")
    ap.add_argument("--prefetch", default="process,thread",
                    help="where the next batch is consumed (consumer.prefetch): process, "
                         "thread, none, or several comma-separated, or all (default: "
                         "%(default)s)")
    ap.add_argument("--pin", action="store_true",
                    help="also measure each fetch-process mode with the loop's thread alone on "
                         "one CPU and the fetch process and the broker on the others (Linux), "
                         "side by side with the unpinned runs")
    ap.add_argument("--skip-scale-out", action="store_true",
                    help="leave out the last part (1 and 2 `run` processes, scale-out)")
    args = ap.parse_args()
    guarantees = (["at_least_once", "exactly_once"] if args.guarantee == "both"
                  else [args.guarantee])
    prefetch = (["process", "thread", "none"] if args.prefetch == "all"
                else args.prefetch.split(","))
    if set(prefetch) - {"process", "thread", "none"}:
        ap.error(f"--prefetch: process, thread, none or all (got {args.prefetch!r})")
    variants = {f"{g}, {p}": (g, p, False) for g in guarantees for p in prefetch}
    if args.pin:  # beside each fetch-process mode, the same pinned
        variants.update({f"{g}, process, pinned": (g, "process", True) for g in guarantees
                         if "process" in prefetch})
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
              f"produce to the broker {produce_rate:,.0f} events/s; {os.cpu_count()} cores, "
              f"load average {_load()}")
        print("each end-to-end run is compared with the engine alone measured just before "
              "and just after it (their mean): the load of a shared machine drifts. CPU in "
              "us per event: loop = the loop's thread, fetch = the fetch thread or child "
              "process, all = the process (and its child)")
        by_mode: dict[str, list[float]] = {m: [] for m in modes}
        ratios: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in modes}
        busy: dict[str, list[float]] = {m: [] for m in modes}
        engine = bare_engine_rate(msgs, base)
        engine_cpu: list[float] = []
        for r in range(args.rounds):
            # the order of the modes reversed every other round: none always runs first
            # (each end-to-end run reads the topic into a broker that keeps growing state)
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                guarantee, ahead, pinned = variants[mode]
                e2e, loop_cpu, fetch_cpu, all_cpu, committed, broker_cpu, others = \
                    sidecar_rate(broker, base, len(msgs), args.batch_size,
                                 f"bench-{r}-{len(by_mode[mode])}-{guarantee}-{ahead}-{int(pinned)}",
                                 guarantee, ahead, pinned)
                after = bare_engine_rate(msgs, base)
                wall, thread_rate, _ = ((x + y) / 2 for x, y in zip(engine, after, strict=True))
                engine = after
                by_mode[mode].append(e2e)
                ratios[mode].append(e2e / wall)
                cpu[mode].append((loop_cpu, fetch_cpu, all_cpu, broker_cpu))
                busy[mode].append(others)
                engine_cpu.append(1 / thread_rate)
                print(f"round {r + 1}: engine alone {wall:>9,.0f} events/s, end to end "
                      f"({mode}) {e2e:>9,.0f} events/s, ratio {e2e / wall:.2f}; CPU us/event: "
                      f"engine {1e6 / thread_rate:.2f}, loop {1e6 * loop_cpu:.2f}, fetch "
                      f"{1e6 * fetch_cpu:.2f}, all {1e6 * all_cpu:.2f}, broker "
                      f"{1e6 * broker_cpu:.2f}; other jobs {others:.2f} cores (committed "
                      f"{committed:,} of {len(msgs):,}; load {_load()})", flush=True)
    for mode in modes:
        rates = sorted(by_mode[mode])
        print(f"end to end, {mode}: median {rates[len(rates) // 2]:,.0f} events/s")
    for p in prefetch + (["process, pinned"] if args.pin else []):
        eo, al = f"exactly_once, {p}", f"at_least_once, {p}"
        if eo in by_mode and al in by_mode:
            print(f"ratio exactly-once/at-least-once ({p}): " + _median(
                [e / a for e, a in zip(by_mode[eo], by_mode[al], strict=True)]))
    print(f"engine alone: {1e6 * sorted(engine_cpu)[len(engine_cpu) // 2]:.2f} us CPU/event "
          f"(median)")
    for mode in modes:
        loops, fetches, alls, brokers = zip(*cpu[mode], strict=True)
        print(f"ratio end-to-end ({mode})/engine: {_median(ratios[mode])} over "
              f"{len(ratios[mode])} rounds; CPU us/event (median): loop {1e6 * _mid(loops):.2f}, "
              f"fetch {1e6 * _mid(fetches):.2f}, all {1e6 * _mid(alls):.2f}, broker "
              f"{1e6 * _mid(brokers):.2f}; other jobs {_median(busy[mode])} cores")
        # `run` needs more than one core (loop, fetch, broker) where the engine alone
        # takes one: other jobs on a small host slow it more than the engine. Shown
        # beside the headline figure above, never instead of it.
        quiet = [q for q, o in zip(ratios[mode], busy[mode], strict=True) if o < _QUIET]
        if quiet and len(quiet) < len(ratios[mode]):
            print(f"    of which the {len(quiet)} round(s) with other jobs under {_QUIET} "
                  f"cores: {_median(quiet)}")
    print(f"load average at the end: {_load()}")


def _mid(values) -> float:
    v = sorted(values)
    return v[len(v) // 2]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
