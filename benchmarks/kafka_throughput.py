"""End-to-end throughput through a real broker, beside the engine's bare rate.

Starts the embedded Kafka-protocol broker, produces --events messages to a topic,
then starts the sidecar (`run`'s loop: consume, decode, update, evaluate, deliver,
commit) and times it from its first consumed batch until every event is applied. The
engine's bare rate on the same messages (no Kafka) is measured in the same run.

    python benchmarks/kafka_throughput.py [--events 300000] [--partitions 1]
"""

from __future__ import annotations

import argparse
import threading
import time

from common import monitor, workload
from confluent_kafka import Producer

from stream_monitor.broker import EmbeddedBroker
from stream_monitor.config import parse_config
from stream_monitor.pipeline import Monitor
from stream_monitor.runtime import KafkaSidecar

BATCH = 10_000


def bare_engine_rate(msgs: list[bytes], base: Monitor) -> float:
    mon = Monitor(base.config, {n: p.reference for n, p in base.models.items()})
    t = time.perf_counter()
    for i in range(0, len(msgs), BATCH):
        mon.process(msgs[i:i + BATCH], range(i, i + BATCH))
    return len(msgs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=10_000)
    args = ap.parse_args()
    msgs = workload(args.events)
    base = monitor()
    with EmbeddedBroker() as broker:
        broker.create_topics({"bench-in": args.partitions, "bench-alerts": 1, "bench-dlq": 1})
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
        ref = next(iter(base.models.values())).reference
        cfg = parse_config({
            "kafka": {"bootstrap.servers": broker.bootstrap_servers, "group.id": "bench",
                      "session.timeout.ms": 6000, "log.connection.close": False,
                      "fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 10_485_760,
                      "auto.offset.reset": "earliest"},  # produced before the join
            "topics": {"inferences": "bench-in", "alerts": "bench-alerts",
                       "dead_letter": "bench-dlq"},
            "consumer": {"batch_size": args.batch_size},
            "http": {"host": "127.0.0.1", "port": 0},
            "models": {"churn": {"reference": "unused.json"}}})
        sidecar = KafkaSidecar(cfg, monitor=Monitor(cfg, {"churn": ref}))
        first: list[float] = []
        sidecar.on_batch = lambda r: first.append(time.perf_counter()) if not first else None
        thread = threading.Thread(target=sidecar.run, daemon=True)
        thread.start()
        while sum(sidecar.applied.values()) < len(msgs):
            time.sleep(0.01)
        done = time.perf_counter()
        sidecar.stop()
        thread.join(30)
    e2e = len(msgs) / (done - first[0])
    engine = bare_engine_rate(msgs, base)
    print(f"events {len(msgs):,}, partitions {args.partitions}, "
          f"consume batch {args.batch_size:,}")
    print(f"produce to the broker              : {produce_rate:>10,.0f} events/s")
    print(f"end to end through the broker      : {e2e:>10,.0f} events/s")
    print(f"engine alone on the same messages  : {engine:>10,.0f} events/s")
    print(f"ratio end-to-end/engine: {e2e / engine:.2f}")


if __name__ == "__main__":
    main()
