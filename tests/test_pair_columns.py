"""Joined pairs as columns (`join.PairColumns`): the label join's column output against
its tuples, the performance windows' routing against a per-pair implementation, and
snapshots of the older window format (a list of tuples) restoring and continuing."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import orjson
import perfstream as ps
import pytest
import yaml

from stream_monitor.config import JoinConfig, PerformanceConfig, load_config
from stream_monitor.core.join import JoinBuffer, LabelEvent, PairColumns, as_json
from stream_monitor.core.performance import ModelPerformance, _Window
from stream_monitor.kafka import state
from stream_monitor.pipeline import Monitor


def _norm(pairs) -> list:
    """Pairs comparable with == (NaN times as a marker; types kept apart: 1 != True)."""
    def one(v):
        if isinstance(v, float) and math.isnan(v):
            return "<nan>"
        return (type(v).__name__, v if not isinstance(v, dict | list) else repr(v))
    return [tuple(one(v) for v in p) for p in pairs]


def _awkward_pairs(rng, n: int) -> list[tuple]:
    labels = [1, 0, True, "yes", "no", 2.5, "klasse-ü", 3]
    out = []
    for i in range(n):
        pts = math.nan if rng.random() < 0.1 else float(1e9 + rng.integers(0, 1000))
        pred = [float(rng.random()), "yes", None, 2, True][int(rng.integers(0, 5))]
        sc = [None, {"yes": 0.3, "no": 0.7}, b'{"yes": 0.9}', b"not json"][
            int(rng.integers(0, 4))]
        sg = [None, {"region": "eu"}, b'{"region": "us"}'][int(rng.integers(0, 3))]
        out.append((int(rng.integers(0, 10 * n)), pts, float(1e9 + 5000 + i),
                    [None, "v1", "v2"][int(rng.integers(0, 3))], pred, sc, sg,
                    labels[int(rng.integers(0, len(labels)))]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_columns_round_trip_take_and_concat(seed):
    rng = np.random.default_rng(seed)
    pairs = _awkward_pairs(rng, 300)
    pc = PairColumns.from_pairs(pairs)
    assert len(pc) == 300 and _norm(pc.pairs()) == _norm(pairs)
    idx = rng.permutation(300)[:120]
    assert _norm(pc.take(idx).pairs()) == _norm([pairs[i] for i in idx.tolist()])
    assert _norm(pc.take(slice(40, 90)).pairs()) == _norm(pairs[40:90])
    cuts = sorted(set(rng.integers(0, 300, 5).tolist()) | {0, 300})
    blocks = [PairColumns.from_pairs(pairs[a:b]) for a, b in pairwise(cuts)]
    assert _norm(PairColumns.concat(blocks).pairs()) == _norm(pairs)
    # a block without scores or segments beside one with them
    plain = [(*p[:5], None, None, p[7]) for p in pairs[:50]]
    both = PairColumns.concat([PairColumns.from_pairs(plain), PairColumns.from_pairs(pairs)])
    assert _norm(both.pairs()) == _norm(plain + pairs)
    assert PairColumns.from_pairs(plain).scores is None
    assert len(PairColumns.from_pairs([])) == 0 and PairColumns.concat([]).pairs() == []


def _outcomes(ids, preds, scores, segs, versions):
    return {"event_id": list(ids), "prediction": list(preds), "scores": list(scores),
            "label": [None] * len(ids), "segment": list(segs), "model_version": list(versions)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_label_columns_are_the_sent_pairs_and_a_rollback_leaves_no_trace(seed):
    """Twin buffers fed the same awkward stream, through small bounds, predictions
    re-sent in a later batch (two chunks hold the key), duplicate, early and unknown
    labels, several versions, object predictions, raw scores and segments, NaN times.
    One (`b`, joined by `add_label_columns`) also applies some label batches and rolls
    them back first: after every batch it has the state, counters and pairs of the other
    (`a`, joined by `add_labels`, the tuples). Every joined pair is its label event's
    label, time and position with one of the predictions sent under that event id."""
    rng = np.random.default_rng(seed)
    bounds = JoinConfig(max_predictions=900, max_labels=400, max_age=5000.0)
    a, b = JoinBuffer(bounds), JoinBuffer(bounds)
    next_id, sent = 0, []
    predictions: dict[str, list] = {}   # event id -> (ts, version, prediction, scores, segment)
    for step in range(40):
        n = int(rng.integers(1, 160))
        ids = list(range(next_id, next_id + n))
        next_id += n
        if sent and rng.random() < 0.4:  # re-sent predictions (a later chunk)
            ids[: n // 4] = rng.choice(sent, min(n // 4, len(sent))).tolist()[: n // 4]
        sent += ids
        ts = [math.nan if rng.random() < 0.03 else float(step * 100 + i % 50) for i in range(n)]
        kind = step % 3
        preds = ([float(rng.random()) for _ in ids] if kind == 0 else
                 [["yes", "no", 1, None][int(rng.integers(0, 4))] for _ in ids])
        scores = [None if kind == 0 or rng.random() < 0.3 else b'{"yes": 0.25}' for _ in ids]
        segs = [None if rng.random() < 0.5 else {"region": "eu"} for _ in ids]
        versions = [["v1", "v2", None][int(rng.integers(0, 3))] for _ in ids]
        out = _outcomes([f"id{i}" for i in ids], preds, scores, segs, versions)
        for i, row in zip(ids, zip(ts, versions, preds, scores, segs, strict=True), strict=True):
            predictions.setdefault(f"id{i}", []).append(_norm([row])[0])
        pa = a.add_predictions(list(range(n)), ts, out)
        pb = b.add_predictions(list(range(n)), ts, out)
        assert _norm(pa) == _norm(pb)
        m = int(rng.integers(0, 120))
        lab_ids = rng.choice(max(next_id + 30, 1), m).tolist()  # early and unknown ones too
        lab_ids += lab_ids[: m // 10]                            # duplicates in a batch
        values = [[1, 0, "yes", True, 2.5][int(rng.integers(0, 5))] for _ in lab_ids]
        events = [LabelEvent("m", f"id{i}", v, float(step * 100 + 60 + k % 7), 10_000 * step + k)
                  for k, (i, v) in enumerate(zip(lab_ids, values, strict=True))]
        if step % 7 == 3:  # a batch applied and rolled back on one twin only
            tb = b.begin()
            assert len(b.add_label_columns(events))
            b.rollback(tb)
            assert a.state() == b.state()
        tuples = a.add_labels(events)
        cols = b.add_label_columns(events)
        assert type(cols) is PairColumns
        assert _norm(cols.pairs()) == _norm(tuples)
        assert a.state() == b.state() and a.joined == b.joined and a.unjoined == b.unjoined
        by_position = {ev.position: ev for ev in events}
        assert np.unique(cols.position).size == len(cols)  # a label event joins once
        for pos, pts, lts, ver, pred, sc, sg, lab in cols.pairs():
            ev = by_position[pos]
            assert _norm([(lts, lab)]) == _norm([(ev.ts, ev.label)])
            assert _norm([(pts, ver, pred, sc, sg)])[0] in predictions[ev.event_id]
    assert a.joined and a.unjoined["prediction_duplicate"] and a.unjoined["label_duplicate"]


def _per_pair_add_pairs(windows: dict, pairs: list, size: int) -> tuple[list, np.ndarray]:
    """The routing `add_pairs` did before columns, pair by pair (an independent
    implementation): raw JSON parsed, sorted by position (stable), each pair to its
    version's window, a window closing at the pair that fills it."""
    pairs = [(*p[:5], as_json(p[5]), as_json(p[6]), p[7]) for p in pairs]
    pairs = sorted(pairs, key=lambda p: p[0])
    lag = np.array([p[2] - p[1] for p in pairs], float)
    closed = []
    for p in pairs:
        w = windows.setdefault(p[3], [[], 0])
        w[0].append(p)
        if len(w[0]) >= size:
            closed.append((p[3], w[0], w[1]))
            w[0], w[1] = [], w[1] + 1
    return closed, lag[~np.isnan(lag)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("as_columns", [False, True])
def test_add_pairs_routes_like_the_per_pair_loop(seed, as_columns):
    rng = np.random.default_rng(seed)
    size = 37
    mp = ModelPerformance("m", PerformanceConfig(window=size), None)
    ref: dict = {}
    for _ in range(30):
        pairs = _awkward_pairs(rng, int(rng.integers(1, 90)))
        if rng.random() < 0.5:  # one version (the whole-slice path)
            pairs = [(*p[:3], "v1", *p[4:]) for p in pairs]
        lags_before = len(mp.lags)
        got = mp.add_pairs(PairColumns.from_pairs(pairs) if as_columns else pairs)
        expect, lag = _per_pair_add_pairs(ref, pairs, size)
        assert [(v, i) for v, _, i in got] == [(v, i) for v, _, i in expect]
        for (_, g, _), (_, e, _) in zip(got, expect, strict=True):
            assert type(g) is PairColumns and _norm(g.pairs()) == _norm(e)
        new_lags = mp.lags[lags_before:]
        assert np.array_equal(np.concatenate(new_lags) if new_lags else np.empty(0), lag)
        for version, (open_pairs, index) in ref.items():
            w = mp.windows[version]
            assert w.index == index and w.n == len(open_pairs)
            assert _norm(w.pairs) == _norm(open_pairs)
    flushed = {v: p for v, p, _ in mp.flush()}
    assert {v: _norm(p.pairs()) for v, p in flushed.items()} == {
        v: _norm(p) for v, (p, _) in ref.items() if len(p) >= mp.s.min_labels}


def test_evaluate_takes_columns_or_tuples_alike():
    d = ps.draw(3000, seed=8)
    rng = np.random.default_rng(8)
    pairs = [(i, float(d["ts"][i]), float(d["ts"][i] + 60), "v1",
              "yes" if d["p"][i] >= 0.5 else "no",
              {"yes": float(d["p"][i]), "no": 1 - float(d["p"][i])},
              {"region": ps.REGIONS[int(d["region"][i])]} if rng.random() < 0.9 else None,
              "yes" if d["y"][i] else "no") for i in range(3000)]
    settings = PerformanceConfig(segments={"fields": ["region"]})
    reports = []
    for form in (pairs, PairColumns.from_pairs(pairs)):
        mp = ModelPerformance("m", settings, None)
        reports.append([mp.evaluate("v1", form, k)[0] for k in range(3)])
    assert orjson.dumps(reports[0]) == orjson.dumps(reports[1])
    assert "segments" in reports[0][0] and reports[0][0]["window"]["first_line"] == 0


def _config(tmp_path, ref):
    cfg = {"topics": {"labels": "labels"},
           "defaults": {"window": {"events": 5000},
                        "performance": {"window": 900, "segments": {"fields": ["region"]}}},
           "models": {"churn": {"reference": str(ref)}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def test_snapshot_of_the_older_window_format_restores_and_continues(tmp_path):
    """A snapshot written before windows kept columns holds each open window as a list of
    pair tuples: it restores, and the monitor goes on exactly as the one that took it."""
    ref = ps.reference(tmp_path / "churn.json")
    cfg = _config(tmp_path, ref)
    d = ps.draw(9000, seed=12)
    evs = ps.events(d, version="v1", inline_every=11)
    labs = ps.labels(d, fraction=0.7)
    mon = Monitor(cfg)
    mon.process(evs[:6000], list(range(6000)))
    mon.process_labels(labs[:2500], list(range(2500)))
    body = state.decode(state.snapshot(mon, "churn"))
    windows = body["performance"]["attrs"]["windows"]
    assert windows and all(0 < w.n < 900 for w in windows.values())
    for version, w in list(windows.items()):  # as the older format stored it
        legacy = object.__new__(_Window)
        legacy.__dict__.update(pairs=w.pairs, index=w.index)
        windows[version] = legacy
    old = state.frame(state.MAGIC, state.VERSION, body)
    stored = state.decode(old)["performance"]["attrs"]["windows"]
    assert all(set(vars(w)) == {"pairs", "index"} for w in stored.values())
    twin = Monitor(cfg)
    state.restore(twin, "churn", old)
    outs = []
    for m in (mon, twin):
        a = m.process(evs[6000:], list(range(6000, 9000)))
        b = m.process_labels(labs[2500:], list(range(2500, len(labs))))
        c = m.flush()
        outs.append(orjson.dumps([a.performance, b.performance, c.performance]))
        assert b.performance
    assert outs[0] == outs[1]
    # and the restored window, snapshotted again, is in the new format
    again = state.decode(state.snapshot(twin, "churn"))["performance"]["attrs"]["windows"]
    assert all("pairs" not in vars(w) for w in again.values())


def _label_line(rng, i: int) -> bytes:
    ev = {"model": "m", "event_id": f"id{i}", "label": [1, 0, "yes", True, 2.5][i % 5],
          "ts": 1e9 + i}
    if rng.random() < 0.3:
        ev["extra"] = {"note": "a}\n{b", "list": [{"x": 1}, {}]}  # escaped newline, braces
    return orjson.dumps(ev)


@pytest.mark.parametrize("seed", range(6))
def test_label_batches_decoded_straight_are_the_message_by_message_decode(seed):
    """`decode_labels` decodes a batch of well-formed labels straight into `LabelEvent`s;
    batches with awkward messages among them (two values in one message beside an empty
    one, an object split over two messages, raw newlines, padding, non-UTF-8 bytes, a
    message that is not an object) give exactly the events and rejects of the
    message-by-message path."""
    from stream_monitor.config import FieldMapping
    from stream_monitor.core.join import _decode_direct, _decode_labels_typed, decode_labels
    rng = np.random.default_rng(seed)
    fields = FieldMapping()
    good = [_label_line(rng, i) for i in range(200)]
    assert _decode_direct(good, list(range(200))) is not None  # the straight path taken
    events, rejects = decode_labels(good, list(range(200)), fields)
    expect = _decode_labels_typed(good, list(range(200)), fields, None)
    assert (events, rejects) == expect and not rejects and len(events) == 200
    a, b = good[0], good[1]
    traps = [
        [a + b" " + b, b""],                      # two values in one message, an empty one
        [a + b + b, b"   ", b"\t"], [a + b" " + b], [a + b"\n" + b, b"  \r\n "],
        [a + b + b, b"   ", b"    "],              # 3 values in 3 messages, misaligned
        [a[:20], a[20:]],                          # one object split over two messages
        [a[:-1] + b"\n}"],                         # a raw newline inside
        [a.replace(b'"m"', b'"m\n"')],             # a raw newline in a string
        [b" " + a + b" "],                         # padding (decoded one by one)
        [b"\xff" + a[1:]], [a[:-1] + b',"x":"\xff"}'],
        [b"[" + a + b"]"], [b"{}"], [b"}{"], [b"{"], [b"}"],
        [b'{"model":"m","event_id":"x","label":1,"ts":1} {"model":"m","event_id":"y","labe',
         b'l":1,"ts":2}'],
    ]
    for trap in traps:
        for _ in range(3):
            batch = list(good[:30])
            for t in trap:
                batch.insert(int(rng.integers(0, len(batch) + 1)), t)
            pos = list(range(500, 500 + len(batch)))
            got = decode_labels(batch, pos, fields)
            assert got == _decode_labels_typed(batch, pos, fields, None), trap
