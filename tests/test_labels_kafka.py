"""The label join on Kafka: the labels topic, dead letters, retrain topic and metrics."""

from __future__ import annotations

import threading
import urllib.request
import uuid

import orjson
import pytest
from confluent_kafka import Producer
from helpers import read_topic, wait_until
from perfstream import draw, events, reference

from stream_monitor.config import parse_config
from stream_monitor.kafka.runtime import KafkaSidecar

pytestmark = pytest.mark.integration

N_EVENTS = 6000
MAX_PREDICTIONS = 4000
MAX_LABELS = 1500


def _produce(bootstrap: str, topic: str, messages: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    for i, m in enumerate(messages):
        p.produce(topic, m, key=str(i).encode())
        if i % 2000 == 0:
            p.poll(0)
    assert p.flush(30) == 0



def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            out[head] = float(value)
    return out


def _sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    return sum(v for k, v in metrics.items() if k.split("{", 1)[0] == name
               and all(f'{a}="{b}"' in k for a, b in labels.items()))


def test_late_out_of_order_labels_join_on_kafka(kafka_broker, tmp_path):
    tag = uuid.uuid4().hex[:8]
    t = {k: f"lk-{k}-{tag}" for k in ("in", "labels", "alerts", "dlq", "retrain")}
    kafka_broker.create_topics({name: 1 for name in t.values()})
    ref = reference(tmp_path / "churn.json", n=5000)
    cfg = parse_config({
        "kafka": {"bootstrap.servers": kafka_broker.bootstrap_servers,
                  "group.id": f"lk-group-{tag}", "session.timeout.ms": 6000,
                  "log.connection.close": False,
                  "auto.offset.reset": "earliest"},  # produced while the group joins
        "topics": {"inferences": t["in"], "labels": t["labels"], "alerts": t["alerts"],
                   "dead_letter": t["dlq"], "retrain": t["retrain"]},
        "http": {"host": "127.0.0.1", "port": 0},
        "consumer": {"batch_size": 700},
        "defaults": {"window": {"events": 2000},
                     "performance": {"window": 500, "reference_windows": 2,
                                     "retrain": {"every_labels": 2000},
                                     "join": {"max_predictions": MAX_PREDICTIONS,
                                              "max_labels": MAX_LABELS}}},
        "models": {"churn": {"reference": str(ref)}},
    })
    d = draw(N_EVENTS, seed=31)
    evs = events(d)
    preds = [orjson.loads(e)["prediction"] for e in evs]
    # labels equal to the prediction: a label joined to the wrong event shows as an error
    idx = [i for i in range(N_EVENTS) if i % 3]
    late = sorted(idx, key=lambda i: d["ts"][i] + d["lag"][i])  # hours late, out of order
    labels = [orjson.dumps({"model": "churn", "event_id": f"e{i}", "label": preds[i],
                            "ts": float(d["ts"][i] + d["lag"][i])}) for i in late]
    odd = [b"{not json", b'{"model": "churn", "event_id": "e1", "ts": 5}',
           b'{"model": "ghost", "event_id": "e1", "label": "yes", "ts": 1790000000}',
           labels[10]]  # a duplicate
    peaks = {"predictions": 0, "labels": 0}

    def watch(result) -> None:
        buf = sidecar.monitor.performance.models["churn"].buffer
        peaks["predictions"] = max(peaks["predictions"], len(buf.predictions))
        peaks["labels"] = max(peaks["labels"], len(buf.labels))

    sidecar = KafkaSidecar(cfg, on_batch=watch)
    http = sidecar.serve_http()
    thread = threading.Thread(target=sidecar.run, daemon=True)
    thread.start()
    early = [lab for lab, i in zip(labels, late, strict=True) if i >= 4500][:500]
    rest = [lab for lab in labels if lab not in set(early)]
    try:
        # 1. labels whose prediction has not arrived yet: they wait
        _produce(kafka_broker.bootstrap_servers, t["labels"], early)
        wait_until(lambda: _sum(_metrics(http.port), "stream_monitor_labels_total") >= 500,
                   60, "early labels consumed")
        # 2. the predictions: more than the buffer holds, the oldest are evicted
        _produce(kafka_broker.bootstrap_servers, t["in"], evs)
        wait_until(lambda: sum(sidecar.applied.values()) >= N_EVENTS, 60, "predictions")
        # 3. the other labels, hours late and out of order, and odd ones
        _produce(kafka_broker.bootstrap_servers, t["labels"], rest + odd)
        total = N_EVENTS + len(labels) + len(odd)
        wait_until(lambda: _sum(_metrics(http.port), "stream_monitor_messages_consumed_total")
                   >= total, 120, "all messages consumed")
        wait_until(lambda: _sum(_metrics(http.port), "stream_monitor_dead_letters_total") >= 2,
                   30, "malformed labels dead-lettered")
        m = _metrics(http.port)
        dlq = read_topic(kafka_broker.bootstrap_servers, t["dlq"], 2)
        retrain = read_topic(kafka_broker.bootstrap_servers, t["retrain"], 1)
    finally:
        sidecar.stop()
        thread.join(30)
    buf = sidecar.monitor.performance.models["churn"].buffer
    # bounds held after every batch
    assert peaks["predictions"] <= MAX_PREDICTIONS and peaks["labels"] <= MAX_LABELS
    # every joined label went to its own prediction: realized accuracy is exactly 1
    assert _sum(m, "stream_monitor_performance", metric="accuracy") > 0
    for k, v in m.items():
        if k.startswith("stream_monitor_performance{") and 'metric="accuracy"' in k:
            assert v == 1.0, k
    joined = _sum(m, "stream_monitor_labels_joined_total", model="churn")
    # the 500 early labels joined when their predictions came; 5,500 predictions were
    # buffered, so the 1,500 oldest (e0..e1499) were evicted and their labels cannot join
    evicted = N_EVENTS - 500 - MAX_PREDICTIONS
    expect = sum(1 for i in idx if i >= evicted)
    assert joined == buf.joined == expect
    assert buf.unjoined["prediction_evicted"] == evicted
    # their labels wait (within max_labels) for predictions that will not come
    assert len(buf.labels) == sum(1 for i in idx if i < evicted)
    unjoined = {r: _sum(m, "stream_monitor_labels_unjoined_total", reason=r)
                for r in ("label_duplicate", "label_unknown_model", "label_unknown_event",
                          "prediction_evicted", "prediction_expired")}
    assert unjoined["label_duplicate"] == 1 and unjoined["label_unknown_model"] == 1
    # predictions: joined, waiting or counted unjoined; labels the same
    assert N_EVENTS == buf.joined + len(buf.predictions) + buf.unjoined["prediction_evicted"] \
        + buf.unjoined["prediction_expired"]
    counted_labels = _sum(m, "stream_monitor_labels_total", model="churn")
    assert counted_labels == len(labels) + 1  # + the duplicate
    assert counted_labels == buf.joined + len(buf.labels) + buf.unjoined["label_duplicate"] \
        + buf.unjoined["label_unknown_event"]
    # consumed = counted + dead-lettered
    consumed = _sum(m, "stream_monitor_messages_consumed_total")
    counted = (_sum(m, "stream_monitor_events_total") + counted_labels
               + unjoined["label_unknown_model"])
    assert consumed == counted + _sum(m, "stream_monitor_dead_letters_total") == total
    reasons = sorted(dict(x.headers())["reason"].decode() for x in dlq)
    assert reasons == ["label_malformed", "label_malformed"]
    # metrics of the join and the retraining topic
    assert _sum(m, "stream_monitor_join_waiting", side="predictions") == len(buf.predictions)
    assert _sum(m, "stream_monitor_label_lag_seconds_count", model="churn") == joined
    assert _sum(m, "stream_monitor_label_lag_seconds_sum", model="churn") > 60 * joined
    assert retrain and orjson.loads(retrain[0].value())["trigger"] == "new_labels"
    assert _sum(m, "stream_monitor_retrain_records_total") >= 1
