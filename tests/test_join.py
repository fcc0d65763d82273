"""Label join: decoding label events, the join buffer, its bounds and its counters."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from stream_monitor.config import FieldMapping, JoinConfig
from stream_monitor.core import join
from stream_monitor.core.join import JoinBuffer, LabelEvent, decode_labels, looks_like_label

FIELDS = FieldMapping()


def outcomes(ids, preds=None, labels=None, scores=None, segs=None, version=None):
    n = len(ids)
    return {"event_id": list(ids), "prediction": list(preds or [1] * n),
            "scores": list(scores or [None] * n), "label": list(labels or [None] * n),
            "segment": list(segs or [None] * n), "model_version": [version] * n}


def labels(ids, ts, values=None, pos0=1000):
    values = values or [1] * len(ids)
    return [LabelEvent("m", str(i), v, float(t), pos0 + k)
            for k, (i, t, v) in enumerate(zip(ids, ts, values, strict=True))]


def test_decode_labels_accepts_and_rejects_with_reasons():
    lines = [
        b'{"model": "m", "event_id": "a", "label": 1, "ts": 10}',
        b'{"model": "m", "event_id": 7, "label": "yes", "ts": "2026-11-22T10:00:00Z"}',
        b'{"model": "m", "event_id": "b", "label": true, "ts": 1.5}',
        b'not json',
        b'[1, 2]',
        b'{"event_id": "c", "label": 1, "ts": 1}',
        b'{"model": "m", "label": 1, "ts": 1}',
        b'{"model": "m", "event_id": "d", "ts": 1}',
        b'{"model": "m", "event_id": "e", "label": null, "ts": 1}',
        b'{"model": "m", "event_id": "f", "label": {"x": 1}, "ts": 1}',
        b'{"model": "m", "event_id": "g", "label": 1}',
        b'{"model": "m", "event_id": "h", "label": 1, "ts": "yesterday"}',
        b'{"model": "m", "event_id": true, "label": 1, "ts": 1}',
    ]
    events, rejects = decode_labels(lines, list(range(1, len(lines) + 1)), FIELDS)
    assert [(e.event_id, e.label) for e in events] == [("a", 1), ("7", "yes"), ("b", True)]
    assert events[1].ts == pytest.approx(1795341600.0)
    assert [r.position for r in rejects] == list(range(4, 14))
    assert {r.reason for r in rejects} == {join.LABEL_MALFORMED}
    details = [r.detail for r in rejects]
    assert "not JSON" in details[0] and "list" in details[1] and "'model'" in details[2]
    assert "'event_id'" in details[3] and "'label'" in details[4] and "'ts'" in details[7]


def test_looks_like_label_is_a_byte_test():
    assert looks_like_label(b'{"model":"m","event_id":"a","label":1,"ts":1}', FIELDS)
    assert not looks_like_label(b'{"model":"m","event_id":"a","features":{},"label":1}', FIELDS)
    assert not looks_like_label(b'garbage', FIELDS)


def test_out_of_order_and_late_labels_join_to_their_predictions():
    rng = np.random.default_rng(3)
    buf = JoinBuffer(JoinConfig(max_age=86400.0))
    n = 500
    ts = 1000.0 + np.arange(n) * 10.0
    preds = rng.integers(0, 2, n).tolist()
    buf.add_predictions(list(range(n)), ts.tolist(), outcomes(range(n), preds, version="v1"))
    order = rng.permutation(n)
    lab = labels(order, ts[order] + 3 * 3600.0, [preds[i] for i in order])  # 3 h late
    pairs = buf.add_labels(lab)
    assert len(pairs) == n and buf.joined == n and not buf.predictions
    for pos, pts, lts, version, pred, _, _, label in pairs:
        eid = pos - 1000
        assert version == "v1" and pts == ts[order[eid]] and lts == pts + 3 * 3600.0
        assert pred == label  # each label went to its own prediction


def test_labels_before_predictions_wait_and_join():
    buf = JoinBuffer(JoinConfig())
    assert buf.add_labels(labels(["x", "y"], [5.0, 6.0], [0, 1])) == []
    assert len(buf.labels) == 2
    pairs = buf.add_predictions([1, 2, 3], [1.0, 2.0, 3.0], outcomes(["y", "z", "x"], [1, 1, 0]))
    assert sorted((p[4], p[7]) for p in pairs) == [(0, 0), (1, 1)]
    assert len(buf.predictions) == 1 and not buf.labels
    assert [p[4] for p in buf.add_labels(labels(["z"], [7.0]))] == [1]  # "z" was waiting


def test_unjoined_counted_by_reason():
    buf = JoinBuffer(JoinConfig(max_age=100.0, max_predictions=1000))
    buf.add_predictions([1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0], outcomes(["a", "b", None, "a"]))
    assert buf.unjoined[join.PREDICTION_NO_ID] == 1
    assert buf.unjoined[join.PREDICTION_DUPLICATE] == 1
    buf.add_labels(labels(["a", "a"], [10.0, 11.0]))
    assert buf.unjoined[join.LABEL_DUPLICATE] == 1 and buf.joined == 1
    # a label far ahead in event time expires "b" (no label within max_age)
    buf.add_labels(labels(["zz"], [500.0]))
    assert buf.unjoined[join.PREDICTION_EXPIRED] == 1 and not buf.predictions
    # "zz" waits for a prediction; predictions past its time + max_age expire it
    buf.add_predictions([9], [700.0], outcomes(["q"]))
    assert buf.unjoined[join.LABEL_UNKNOWN_EVENT] == 1 and not buf.labels


def test_inline_label_joins_at_once_and_a_later_topic_label_is_a_duplicate():
    buf = JoinBuffer(JoinConfig())
    pairs = buf.add_predictions([1, 2], [1.0, 2.0],
                                outcomes(["a", None], [1, 0], labels=[1, 1], version="v2"))
    assert len(pairs) == 2 and not buf.predictions
    assert buf.add_labels(labels(["a"], [3.0])) == []
    assert buf.unjoined[join.LABEL_DUPLICATE] == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_hold_over_a_long_unlabelled_stream(seed):
    rng = np.random.default_rng(seed)
    bounds = JoinConfig(max_predictions=300, max_labels=50, max_age=1e9)
    buf = JoinBuffer(bounds)
    n_in = 0
    for b in range(40):
        ids = [f"{b}-{i}" for i in range(100)]
        ts = (b * 100 + np.arange(100)).astype(float).tolist()
        buf.add_predictions(list(range(100)), ts, outcomes(ids))
        n_in += 100
        stray = labels([f"nope-{b}-{i}" for i in range(20)], [ts[-1]] * 20)
        lab = labels([ids[i] for i in rng.choice(100, 10, replace=False)], [ts[-1]] * 10)
        buf.add_labels(stray + lab)
        assert len(buf.predictions) <= 300 and len(buf.labels) <= 50
        assert len(buf.joined_ids) <= 300
    # every prediction is joined, waiting, or counted unjoined
    assert n_in == buf.joined + len(buf.predictions) + buf.unjoined[join.PREDICTION_EVICTED]
    assert buf.unjoined[join.LABEL_UNKNOWN_EVENT] == 40 * 20 - len(buf.labels)


def test_state_round_trips_through_json():
    buf = JoinBuffer(JoinConfig())
    buf.add_predictions([1, 2], [1.0, math.nan], outcomes(
        ["a", "b"], ["yes", "no"], scores=[{"yes": 0.8, "no": 0.2}, None],
        segs=[{"r": "eu"}, None], version="v"))
    buf.add_labels(labels(["c"], [5.0]))
    state = orjson.loads(orjson.dumps(buf.state()))
    again = JoinBuffer.from_state(JoinConfig(), state)
    assert again.state() == buf.state()
    pairs = again.add_labels(labels(["a"], [9.0], ["yes"]))
    assert pairs[0][4:] == ("yes", {"yes": 0.8, "no": 0.2}, {"r": "eu"}, "yes")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_fast_path_matches_the_per_event_path(seed):
    """String ids take the C-level path; the same events with integer ids the per-event one."""
    results = []
    for as_int in (False, True):
        buf = JoinBuffer(JoinConfig(max_predictions=700, max_labels=80, max_age=5000.0))
        r = np.random.default_rng(seed)
        out = []
        for b in range(12):
            ids = r.choice(3000, 300, replace=False) + b * 200  # overlaps: duplicates
            ts = (b * 300.0 + np.arange(300)).tolist()
            keys = ids.tolist() if as_int else [str(i) for i in ids]
            out += buf.add_predictions(list(range(300)), ts, outcomes(keys, scores=[
                {"yes": 0.5}] * 300, segs=[{"r": "x"}] * 300))
            lab = r.choice(3000 + b * 200, 60, replace=False)
            out += buf.add_labels(labels(lab.tolist(), [ts[-1] + 10.0] * 60))
        results.append((sorted(map(repr, out)), buf.state()))
    assert results[0] == results[1]


def _chunks_equal(a: JoinBuffer, b: JoinBuffer) -> bool:
    """The internal columns, not only `state()`: rollback must restore them exactly."""
    if len(a.chunks) != len(b.chunks):
        return False
    for x, y in zip(a.chunks, b.chunks, strict=True):
        for k in x:
            u, v = x[k], y[k]
            if isinstance(u, np.ndarray):
                if not isinstance(v, np.ndarray) or u.dtype != v.dtype or not (
                        np.array_equal(u, v, equal_nan=u.dtype.kind == "f")):
                    return False
            elif u != v:
                return False
    return (a.labels == b.labels and list(a.labels) == list(b.labels)
            and list(a.joined_ids.items()) == list(b.joined_ids.items())
            and (a.seq, a.joined, a.unjoined, a.versions) == (b.seq, b.joined, b.unjoined,
                                                              b.versions))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollback_restores_the_buffer_exactly(seed):
    """Batches of predictions (duplicates, inline labels, objects and floats) and labels
    (early, duplicate, unknown) that expire, evict and merge chunks; after each, a
    rollback must give back exactly the buffer of before, and re-applying the batch must
    give what a buffer that never rolled back holds."""
    import copy

    r = np.random.default_rng(seed)
    bounds = JoinConfig(max_predictions=400, max_labels=60, max_age=4000.0)
    buf, twin = JoinBuffer(bounds), JoinBuffer(bounds)
    for b in range(30):
        size = int(r.choice([3, 40, 300]))
        ids = (r.choice(2500, size, replace=False) + b * 60).tolist()
        ts = (b * 300.0 + np.arange(size)).tolist()
        floats = b % 3 != 0
        preds = r.random(size).tolist() if floats else r.choice(["yes", "no"], size).tolist()
        inline = [None if r.random() > 0.05 else "yes" for _ in range(size)]
        out = outcomes([str(i) for i in ids], preds, labels=inline,
                       scores=[{"yes": 0.5}] * size, segs=[{"r": str(b % 4)}] * size,
                       version=f"v{b % 2}")
        lab_ids = r.choice(2500 + b * 60, 50).tolist()  # some twice, some unknown
        lab = labels(lab_ids, (ts[-1] + r.uniform(-500, 3000, 50)).tolist())
        before = copy.deepcopy(buf)
        token = buf.begin()
        buf.add_predictions(list(range(size)), ts, out)
        buf.add_labels(lab)
        buf.rollback(token)
        assert _chunks_equal(buf, before)
        assert buf.state() == before.state()
        expect = twin.add_predictions(list(range(size)), ts, out) + twin.add_labels(lab)
        buf.begin()  # a journal that is not rolled back changes nothing
        got = buf.add_predictions(list(range(size)), ts, out) + buf.add_labels(lab)
        assert sorted(map(repr, got)) == sorted(map(repr, expect))
        assert _chunks_equal(buf, twin)
    assert buf.unjoined[join.PREDICTION_EXPIRED] and buf.unjoined[join.LABEL_DUPLICATE]
    assert buf.unjoined[join.PREDICTION_EVICTED] and buf.joined


def test_rollback_to_an_older_checkpoint_is_refused():
    buf = JoinBuffer(JoinConfig())
    old = buf.begin()
    buf.begin()
    with pytest.raises(RuntimeError):
        buf.rollback(old)


def test_stable_keys_do_not_depend_on_the_batch():
    """The same id gets the same key alone, beside longer ids, and beside a very long one
    (the array width differs), and distinct ids get distinct keys."""
    ids = ["a", "ab", "b", "é-7", "x" * 64, "x" * 65, "y" * 300, "a\x00"]
    alone = [int(join.id_hashes([i])[0]) for i in ids]
    assert join.id_hashes(ids).tolist() == alone
    assert len(set(alone)) == len(ids)
    many = join.id_hashes([f"churn-{i}" for i in range(200_000)])
    assert np.unique(many).size == many.size


def test_decode_labels_keeps_input_order_across_the_typed_and_per_event_paths():
    """Well-formed labels take the typed decoder, the others the per-event parser (for the
    reason); the events come out in input order, and the same as parsed one by one."""
    lines = []
    for i in range(60):
        kind = i % 6
        if kind == 0:
            lines.append(b'{"model": "m", "event_id": "%d", "label": 1, "ts": %d}' % (i, i))
        elif kind == 1:
            lines.append(b'{"event_id": %d, "label": "a", "ts": "2026-11-22T10:00:00Z"}' % i)
        elif kind == 2:
            lines.append(b'{"model": null, "event_id": "%d", "label": 1, "ts": 1}' % i)
        elif kind == 3:
            lines.append(b'{"model": "m", "event_id": "", "label": 1, "ts": 1}')
        elif kind == 4:
            lines.append(b'{"model": "m", "event_id": "%d", "label": false, "ts": 1e999}' % i)
        else:
            lines.append(b'{"model": "m", "event_id": "%d", "label": 2.5, "ts": 3, "x": [1]}'
                         % i)
    pos = list(range(100, 160))
    events, rejects = decode_labels(lines, pos, FIELDS, default_model="dflt")
    one_by_one = [decode_labels([ln], [p], FIELDS, default_model="dflt")
                  for ln, p in zip(lines, pos, strict=True)]
    assert events == [e for evs, _ in one_by_one for e in evs]
    assert [e.position for e in events] == sorted(e.position for e in events)
    assert {e.model for e in events} == {"m", "dflt"} and len(events) == 30
    assert [r.position for r in rejects] == [p for p in pos if (p - 100) % 6 in (2, 3, 4)]
    slow = join._decode_labels_slow(list(zip(pos, lines, strict=True)), FIELDS, "dflt")
    assert [r for r in slow if isinstance(r, LabelEvent)] == events


def test_key_filters_never_miss_a_joined_or_waiting_key():
    """The flag tables in front of the joined and waiting keys are supersets, rebuilt in
    place: a prediction re-sent after its label joined is a duplicate, and one whose label
    waits joins it, through many rebuilds (small max_labels), a rollback that puts keys
    back, and a restore from the JSON state; the counts equal a plain dict's."""
    rng = np.random.default_rng(3)
    bounds = JoinConfig(max_predictions=5000, max_labels=64, max_age=1e9)
    buf = JoinBuffer(bounds)
    expect_dup = expect_joined = 0
    joined_recent: list[str] = []  # the last max_labels joined ids (what the dict holds)
    for step in range(40):
        ids = [f"s{step}-{i}" for i in range(50)]
        buf.add_predictions(list(range(50)), [float(step)] * 50, outcomes(ids))
        lab = [i for i in ids if rng.random() < 0.6]
        expect_joined += len(buf.add_labels(labels(lab, [float(step)] * len(lab))))
        joined_recent = (joined_recent + lab)[-64:]
        resend = list(rng.choice(joined_recent, 5, replace=False))
        if step % 7 == 3:  # a batch that is rolled back: it evicts the joined keys and
            token = buf.begin()  # rebuilds the filters; the rollback puts the keys back
            tmp = [f"tmp{step}-{i}" for i in range(150)]
            buf.add_predictions(list(range(150)), [float(step)] * 150, outcomes(tmp))
            buf.add_labels(labels(tmp, [float(step)] * 150))
            buf.add_labels(labels([f"late{step}-{i}" for i in range(30)], [float(step)] * 30))
            buf.add_predictions([0], [float(step)], outcomes([f"new{step}"]))
            buf.rollback(token)
        if step == 20:
            buf = JoinBuffer.from_state(bounds, orjson.loads(orjson.dumps(buf.state())))
        before = buf.unjoined[join.PREDICTION_DUPLICATE]
        buf.add_predictions(list(range(5)), [float(step)] * 5, outcomes(resend))
        assert buf.unjoined[join.PREDICTION_DUPLICATE] - before == 5
        expect_dup += 5
        # a label first, then its prediction: joined at once through the waiting filter
        first = f"first{step}"
        buf.add_labels(labels([first], [float(step)]))
        assert len(buf.add_predictions([0], [float(step)], outcomes([first]))) == 1
        expect_joined += 1
        joined_recent = (joined_recent + [first])[-64:]
    assert buf.unjoined[join.PREDICTION_DUPLICATE] == expect_dup
    assert buf.joined == expect_joined


def test_key_order_is_the_stable_sort_of_the_keys():
    """The radix order of the keys' top halves, checked, equals numpy's stable argsort:
    on random keys, on keys that share their top 32 bits (the check sends them to the
    full sort), with duplicates (arrival order kept), at the int64 extremes."""
    rng = np.random.default_rng(11)
    cases = [rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64) for n in (0, 1, 63, 64, 5000)]
    top = rng.integers(-2**31, 2**31 - 1, 40, dtype=np.int64) << 32
    shared = top[rng.integers(0, 40, 3000)] | rng.integers(0, 2**32, 3000, dtype=np.int64)
    cases.append(shared)                               # equal top halves, distinct keys
    dup = rng.integers(-2**63, 2**63 - 1, 500, dtype=np.int64)
    cases.append(dup[rng.integers(0, 500, 4000)])      # many duplicates
    cases.append(np.array([2**63 - 1, -2**63, 0, -1, 1] * 30, np.int64))
    for h in cases:
        assert np.array_equal(join._key_order(h), np.argsort(h, kind="stable"))


def _waiting(buf: JoinBuffer) -> dict[int, float]:
    """Key -> event time of every waiting prediction, over the chunks."""
    return {int(k): t for c in buf.chunks for k, t, a in
            zip(c["h"].tolist(), c["ts"].tolist(), c["alive"].tolist(), strict=True) if a}


def test_merged_chunks_keep_every_waiting_prediction_and_its_age():
    """Small chunks merge as batches arrive; the merged chunk holds exactly the waiting
    rows of its parts, in arrival order, with their times, its keys in stable sorted
    order; and a buffer that merges joins, expires and counts exactly as one that never
    merges (no duplicate predictions: merging only settles duplicates earlier)."""
    rng = np.random.default_rng(5)
    bounds = JoinConfig(max_predictions=20_000, max_labels=500, max_age=3000.0)
    merging, flat = JoinBuffer(bounds), JoinBuffer(bounds)
    flat._merge_tail = lambda: None           # every batch stays its own chunk
    seen_merge = False
    next_id = 0
    for b in range(60):
        size = int(rng.choice([5, 80, 400]))
        ids = [f"e{next_id + i}" for i in range(size)]
        next_id += size
        ts = (b * 100.0 + rng.uniform(0, 100, size)).tolist()
        preds = rng.random(size).tolist()
        lab = rng.choice(next_id, 40, replace=False).tolist()
        lab_ts = (b * 100.0 + rng.uniform(-50, 400, 40)).tolist()
        got = []
        for buf in (merging, flat):
            n_before = len(buf.chunks)
            waiting = _waiting(buf)
            pairs = buf.add_predictions(list(range(size)), ts, outcomes(ids, preds))
            pairs += buf.add_labels(labels([f"e{i}" for i in lab], lab_ts))
            got.append((sorted(map(repr, pairs)), buf.state()))
            if buf is merging and len(buf.chunks) < n_before + 1:
                seen_merge = True
                # the merged chunk: waiting rows of its parts (and of the batch), times kept
                after = _waiting(buf)
                new = dict(zip(join.id_hashes(ids).tolist(), ts, strict=True))
                assert set(after) <= set(waiting) | set(new)
                assert all(after[k] == (waiting[k] if k in waiting else new[k]) for k in after)
        assert got[0] == got[1]
        for c in merging.chunks:
            assert np.array_equal(c["order"], np.argsort(c["h"], kind="stable"))
            assert np.array_equal(c["hs"], c["h"][c["order"]])
    assert seen_merge and len(merging.chunks) < len(flat.chunks)
    assert merging.unjoined[join.PREDICTION_EXPIRED] and merging.joined


def _outcome_events(n: int, seed: int) -> list[bytes]:
    """Events of two models (a numeric and a categorical prediction) with every outcome
    form: ids that are strings, integers, null, empty, with a NUL, non-ASCII or longer
    than 64 characters; null, absent, integer and boolean predictions; inline labels,
    scores and segments in a few events; several versions; a bad timestamp (a reject
    inside a typed chunk)."""
    from test_decode import ABSENT, enc, event, feats

    rng = np.random.default_rng(seed)
    out = []
    odd_ids = [None, "", 17, "a\x00b", "é-1", "x" * 100, ABSENT]
    for i in range(n):
        r = rng.random()
        eid = odd_ids[int(rng.integers(len(odd_ids)))] if r < 0.02 else f"ev-{seed}-{i}"
        if rng.random() < 0.3:
            ev = {"model": "n", "event_id": eid, "ts": 1.79e9 + i,
                  "features": {"score": float(rng.normal()), "color": "red"},
                  "prediction": ("yes", "no", "maybe", True, None)[int(rng.integers(5))]}
        else:
            pred = (float(rng.random()), None, ABSENT, 1, True)[
                int(rng.choice(5, p=[0.9, 0.04, 0.03, 0.02, 0.01]))]
            ev = event(feats(x=float(rng.normal())), event_id=eid, prediction=pred,
                       ts=1.79e9 + i)
        if eid is ABSENT:
            ev.pop("event_id", None)
        ev["model_version"] = ("v3", "v3", "v3", 4, None)[int(rng.integers(5))] if (
            i // 700) % 2 else "v3"
        if rng.random() < 0.03:
            ev["label"] = (1, "yes", True, 0.5)[int(rng.integers(4))]
        if rng.random() < 0.03:
            ev["scores"] = {"yes": 0.7, "no": 0.3}
        if rng.random() < 0.03:
            ev["segment"] = {"region": "eu"}
        if rng.random() < 0.005:
            ev["ts"] = None
        out.append(enc(ev))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_typed_outcomes_are_the_per_event_paths(seed):
    """The typed decoder's compact outcomes (ids joined, no prediction list beside the
    numeric column, rare fields per chunk), given back as lists by `outcome_lists`, are
    the per-event path's values, event by event; and the join keys of `JoinedIds` are
    those of the listed ids."""
    from test_decode import make_decoder

    from stream_monitor.core.join import _string_keys, as_json, event_key, id_hashes
    from stream_monitor.io.decode import Decoder, JoinedIds, outcome_lists

    msgs = _outcome_events(5000, seed)
    fast = make_decoder()
    fast.outcomes = True
    slow = Decoder(fast.schemas, fast.config)
    slow.typed, slow.outcomes = False, True
    for cut in (5000, 997):  # one batch of five chunks, and batches of 997
        for lo in range(0, len(msgs), cut):
            part = msgs[lo:lo + cut]
            a = fast.decode(part, range(lo, lo + len(part)))
            b = slow.decode(part, range(lo, lo + len(part)))
            assert set(a.models) == set(b.models)
            for model, batch in a.models.items():
                other = b.models[model]
                assert batch.positions.tolist() == other.positions.tolist()
                got, want = outcome_lists(batch), other.outcomes
                for k in ("event_id", "prediction", "label", "model_version"):
                    assert got[k] == want[k], k
                    assert list(map(type, got[k])) == [
                        float if k == "prediction" and type(v) is int and model == "m"
                        else type(v) for v in want[k]], k
                for k in ("scores", "segment"):
                    assert [as_json(v) for v in got[k]] == want[k], k
                ids = batch.outcomes["event_id"]
                if type(ids) is JoinedIds:
                    keys = [event_key(e) for e in want["event_id"]]
                    assert None not in keys
                    assert _string_keys(ids.tolist()).tolist() == id_hashes(keys).tolist()
    # string ids only (the usual stream): one joined string, hashed as the list would be
    from test_decode import enc, event
    clean = [enc(event(event_id=f"id-{i}", ts=1.79e9 + i)) for i in range(3000)]
    batch = fast.decode(clean, range(3000)).models["m"]
    ids = batch.outcomes["event_id"]
    assert type(ids) is JoinedIds and "prediction" not in batch.outcomes
    assert ids.tolist() == [f"id-{i}" for i in range(3000)]
    buf = JoinBuffer(JoinConfig())
    buf.add_predictions(batch.positions, batch.ts, batch.outcomes, batch.prediction)
    want = id_hashes([f"id-{i}" for i in range(3000)])
    assert sorted(buf.chunks[0]["h"].tolist()) == sorted(want.tolist())


@pytest.mark.parametrize("seed", [1, 2])
def test_skipped_outcome_fields_are_none_and_the_others_unchanged(seed):
    """A model whose segment and scores are not decoded (`outcome_skip`: no segments
    configured, numeric predictions) gets no per-chunk lists of them: they come back as
    None for every event, and every other outcome field is that of the decoder that
    decodes them all (the same events, chunk sizes, rejects and several models)."""
    from test_decode import make_decoder

    from stream_monitor.io.decode import Decoder, outcome_lists

    msgs = _outcome_events(4000, seed)
    full = make_decoder()
    full.outcomes = True
    lean = Decoder({m: s for m, s in full.schemas.items()}, full.config)
    lean.outcomes = True
    for cut in (4000, 997):
        for lo in range(0, len(msgs), cut):
            part = msgs[lo:lo + cut]
            a = full.decode(part, range(lo, lo + len(part)))
            for schema in lean.schemas.values():
                schema.outcome_skip = frozenset({"scores", "segment"})
            b = lean.decode(part, range(lo, lo + len(part)))
            for schema in lean.schemas.values():
                schema.outcome_skip = frozenset()
            assert set(a.models) == set(b.models)
            assert [r.position for r in a.rejects] == [r.position for r in b.rejects]
            for model, batch in a.models.items():
                got, want = outcome_lists(b.models[model]), outcome_lists(batch)
                for k in ("event_id", "prediction", "label", "model_version"):
                    assert got[k] == want[k], k
                for k in ("scores", "segment"):
                    assert got[k] == [None] * len(want[k]), k
                    assert any(v is not None for v in want[k]) or len(want[k]) < 100, k


@pytest.mark.parametrize("odd", ["", "é-unicode", "x" * 90, "id-7", "fixed"])
def test_joined_ids_that_are_not_plain_join_as_their_list(odd):
    """Typed ids given as one `JoinedIds` whose text the fast hash cannot take (an empty
    id, non-ASCII, longer than 64) buffer, join and count exactly as the same ids given
    as a list; plain ids ("id-7") take the fast hash and agree too, and so do ids of one
    width ("fixed": the strided hash, whose NULs a `JoinedIds` does not count again)."""
    from stream_monitor.io.decode import JoinedIds
    n = 500
    ids = [f"id-{i}" for i in range(n)] if odd != "fixed" else [f"id-{i:05d}" for i in range(n)]
    odd = ids[7] if odd == "fixed" else odd
    ids[7] = odd
    ts = 1.79e9 + np.arange(n, dtype=float)
    preds = np.linspace(0.0, 1.0, n)
    base = {"prediction": preds.tolist(), "label": [None] * n, "scores": [None] * n,
            "segment": [None] * n, "model_version": ["v1"] * n}
    bufs = []
    for given in (JoinedIds("\x00".join(ids), n), list(ids)):
        buf = JoinBuffer(JoinConfig())
        buf.add_predictions(range(n), ts, {**base, "event_id": given}, preds)
        labels = [LabelEvent("m", e, 1, ts[k] + 60.0, n + k) for k, e in enumerate(ids[:20])]
        pairs = buf.add_labels(labels)
        bufs.append((sorted(p[0] for p in pairs), dict(buf.unjoined), orjson.dumps(
            buf.state(), option=orjson.OPT_SERIALIZE_NUMPY)))
    assert bufs[0] == bufs[1]
    assert len(bufs[0][0]) == (19 if odd == "" else 20)  # an empty id has no key


@pytest.mark.parametrize("seed", [0, 1])
def test_chunk_bit_tables_join_as_a_search_of_every_label(seed):
    """A label is searched only in the chunks whose bit table has its key's bit: the
    same pairs, duplicates (re-sent predictions in later chunks), counters and state
    as searching every label in every chunk (a table with every bit set)."""
    rng = np.random.default_rng(seed)
    bounds = JoinConfig(max_predictions=30_000, max_labels=2_000, max_age=1e9)
    tabled, searched = JoinBuffer(bounds), JoinBuffer(bounds)

    def every_bit(c, bits):
        bits[id(c)] = (c, np.full(1 << 12, 0xFF, np.uint8))
        return bits[id(c)][1]

    searched._key_bits = every_bit
    next_id = 0
    for b in range(40):
        size = int(rng.choice([300, 1_500, 4_000]))
        ids = [f"p{next_id + i}" for i in range(size)]
        next_id += size
        resent = [f"p{i}" for i in rng.choice(next_id, 30, replace=False).tolist()]
        ts = (b * 100.0 + rng.uniform(0, 100, size + 30)).tolist()
        lab = [f"p{i}" for i in rng.choice(next_id + 500, 300, replace=False).tolist()]
        preds = rng.random(size + 30).tolist()
        got = []
        for buf in (tabled, searched):
            pairs = buf.add_predictions(list(range(size + 30)), ts, outcomes(ids + resent, preds))
            pairs += buf.add_labels(labels(lab, [b * 100.0 + 50.0] * 300))
            got.append((sorted(map(repr, pairs)), buf.state()))
        assert got[0] == got[1]
        assert len(tabled._bits) == sum(1 for c in tabled.chunks if c["live"]) or b == 0
    assert len(tabled.chunks) > 4
    assert tabled.unjoined[join.PREDICTION_DUPLICATE] and tabled.joined


@pytest.mark.parametrize("ids", [
    [f"churn-{i}" for i in range(100_000, 103_000)],                   # one length
    [f"{i:032x}" for i in range(2_000)] + ["f" * 32],                  # uuid-like
    [f"e{i}" for i in range(95, 1_005)],                                # three lengths
    ["x"], ["ab", "cd"], ["a" * 64, "b" * 64], ["a" * 65, "b" * 65],    # one, two, long
    ["a" * 64, "b" * 65], ["ab", "c", "de"]])
def test_joined_keys_are_the_keys_of_the_ids(ids):
    """Keys from the NUL-joined ids (the equal-length ids as rows of a strided view, the
    others from the NULs' positions) are those of `id_hashes` of the listed ids."""
    want = join.id_hashes(ids).tolist()
    got = join._joined_keys("\x00".join(ids), len(ids))
    assert (got is None and max(map(len, ids)) > 64) or got.tolist() == want
    assert join._string_keys(ids).tolist() == want
    assert join._joined_keys("\x00".join(ids + [""]), len(ids) + 1) is join._EMPTY_ID


@pytest.mark.parametrize(("max_labels", "batch"), [(100_000, 5_000), (30_000, 1_000)])
def test_joined_keys_keep_their_table_under_first_in_first_out(max_labels, batch):
    """Once `max_labels` keys have joined, each new joined key pushes the oldest out: the
    dict keeps its size, and its table (`sys.getsizeof`) stays the one it had when it
    first filled up, where Python's own doubles (the default 100,000, and a size whose
    table has less room left, where the rebuilds come sooner); the keys are the last
    max_labels joined, in order."""
    import sys

    buf = JoinBuffer(JoinConfig(max_predictions=50_000, max_labels=max_labels, max_age=1e9))
    full = None
    batches = 6 * max_labels // batch
    for b in range(batches):
        ids = [f"k{b}-{i}" for i in range(batch)]
        buf.add_predictions(list(range(batch)), [float(b)] * batch, outcomes(ids))
        buf.add_labels(labels(ids, [float(b)] * batch))
        if full is None and len(buf.joined_ids) == max_labels:
            full = sys.getsizeof(buf.joined_ids)
        elif full is not None:
            assert sys.getsizeof(buf.joined_ids) <= full
    last = [f"k{b}-{i}" for b in range(batches - max_labels // batch, batches)
            for i in range(batch)]
    assert list(buf.joined_ids) == join.id_hashes(last).tolist()


def _label_line(rng, i: int, kind: str) -> bytes:
    ev = {"model": "m", "event_id": f"id-{i}", "label": int(rng.integers(0, 2)),
          "ts": float(rng.random() * 1e9)}
    if kind == "bool":
        ev["label"] = bool(rng.integers(0, 2))
    elif kind == "float":
        ev["label"] = float(rng.standard_cauchy())
    elif kind == "string":
        ev["label"] = rng.choice(["yes", "no", "ünïcode", "1"]).item()
    elif kind == "int ts":
        ev["ts"] = int(rng.integers(0, 2**40))
    elif kind == "extra keys":
        ev.update(position=12345, scores={"a": 1}, note=None)
    elif kind == "int id":
        ev["event_id"] = i
    elif kind == "time string":
        ev["ts"] = "2026-11-22T10:00:00Z"
    elif kind == "no model":
        del ev["model"]
    elif kind == "null label":
        ev["label"] = None
    elif kind == "list label":
        ev["label"] = [1]
    elif kind == "empty id":
        ev["event_id"] = ""
    elif kind == "bad position":
        ev["position"] = "x"
    raw = orjson.dumps(ev)
    if kind == "infinite ts":
        raw = raw.replace(b'"ts":', b'"ts":1e999,"_":', 1)
    elif kind == "not json":
        raw = raw[:-1]
    return raw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_decoded_straight_into_events_equal_the_message_by_message_path(seed):
    """Batches of well-formed labels take the direct path (decoded into `LabelEvent` and
    checked by msgspec); a batch with one message that needs converting or is malformed
    takes the message-by-message path. Either way the events and rejects are those of
    the message-by-message path: bool, float (Cauchy), string and integer labels, integer
    times, extra keys (a `position` key too), integer ids, time strings, the default
    model, nulls, lists, empty ids, infinite times, broken JSON."""
    rng = np.random.default_rng(seed)
    well = ["int", "bool", "float", "string", "int ts", "extra keys"]
    odd = ["int id", "time string", "no model", "null label", "list label", "empty id",
           "bad position", "infinite ts", "not json"]
    for odd_kind in [None, *odd]:
        kinds = [well[int(k)] for k in rng.integers(0, len(well), 300)]
        if odd_kind is not None:
            kinds[int(rng.integers(0, 300))] = odd_kind
        lines = [_label_line(rng, i, k) for i, k in enumerate(kinds)]
        pos = [int(p) for p in rng.permutation(10_000)[:300]]
        direct = join._decode_direct(lines, pos)
        assert (direct is not None) == (odd_kind is None)
        got = decode_labels(lines, pos, FIELDS, default_model="dflt")
        want = join._decode_labels_typed(lines, pos, FIELDS, "dflt")
        assert got[0] == want[0] and len(got[0]) >= 299
        assert [e.position for e in got[0]] == [p for p, e in zip(pos, kinds, strict=True)
                                               if e in well or e in ("int id", "time string",
                                                                     "no model",
                                                                     "bad position")], odd_kind
        assert [(r.position, r.reason, r.detail) for r in got[1]] == [
            (r.position, r.reason, r.detail) for r in want[1]]
    assert join._decode_direct([], []) == []


def _expire_predictions_before(buf, cutoff):
    """`JoinBuffer._expire_predictions` as it was before its early exit (the old path)."""
    if cutoff == -math.inf:
        return
    for c in buf.chunks:
        if not c["live"]:
            continue
        s = c["start"]
        alive = c["alive"][s:]
        blocked = alive & ~(c["ts"][s:] < cutoff)
        stop = int(blocked.argmax()) if blocked.any() else int(alive.size)
        gone = np.flatnonzero(alive[:stop]) + s
        if gone.size:
            buf._kill(c, gone)
            buf.unjoined[join.PREDICTION_EXPIRED] += int(gone.size)
        c["start"] = s + stop
        if stop < alive.size:
            break


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prediction_expiry_with_its_early_exit_is_the_old_path(seed):
    """Chunks with joined rows at their front, NaN times, times out of arrival order and
    cutoffs before, inside and after them: the same rows expire, with the same starts,
    counters and state as the path without the early exit."""
    import copy
    rng = np.random.default_rng(seed)
    buf = JoinBuffer(JoinConfig(max_predictions=10**6, max_labels=10**6, max_age=1e12))
    n, next_id = 300, 0
    for b in range(6):
        ids = [f"e{next_id + i}" for i in range(n)]
        next_id += n
        ts = 1000.0 * b + rng.permutation(n).astype(float) * (1 + (b % 2))
        ts[rng.random(n) < 0.05] = np.nan
        buf.add_predictions(range(n), ts, outcomes(ids), np.full(n, 0.5))
        picked = [ids[i] for i in sorted(rng.choice(n, 40, replace=False))] + ids[:5]
        buf.add_labels(labels(picked, [1e5] * len(picked)))
    for cutoff in (-1.0, 0.0, 150.0, 999.0, 1500.0, 2600.0, 4000.0, 1e9, math.nan):
        a, b = copy.deepcopy(buf), copy.deepcopy(buf)
        for _ in range(2):  # twice: the second call starts where the first stopped
            a._expire_predictions(cutoff)
            _expire_predictions_before(b, cutoff)
        assert dict(a.unjoined) == dict(b.unjoined), cutoff
        for ca, cb in zip(a.chunks, b.chunks, strict=True):
            assert (ca["start"], ca["live"]) == (cb["start"], cb["live"]), cutoff
            assert np.array_equal(ca["alive"], cb["alive"]), cutoff


def _reference_key(event_id: str) -> int:
    """The join key of one id, in plain Python integers (independent of numpy): the
    polynomial over the code points modulo 2^64, the length, the splitmix64 finaliser."""
    m = 1 << 64
    poly, h, p = 0x9E3779B97F4A7C15, 0, 1
    for ch in event_id:
        p = p * poly % m
        h = (h + ord(ch) * p) % m
    h ^= len(event_id)
    h ^= h >> 30
    h = h * 0xBF58476D1CE4E5B9 % m
    h ^= h >> 27
    h = h * 0x94D049BB133111EB % m
    h ^= h >> 31
    return h - m if h >= 1 << 63 else h


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keys_are_the_plain_python_polynomial_of_each_id(seed):
    """Every hashing path (`id_hashes`, `_string_keys`, `_joined_keys`: equal-length ids
    as strided rows, mixed lengths from the NULs, non-ASCII, longer than 64) gives each
    id the key of the plain-Python reference: checkpointed buffers are matched by them."""
    rng = np.random.default_rng(seed)
    alphabet = [chr(c) for c in range(32, 127)]
    batches = {
        "equal length": [f"churn-{i}" for i in rng.integers(100_000, 999_999, 3_000)],
        "uuid hex": [f"{i:032x}" for i in rng.integers(0, 2**63, 2_000)],
        "mixed lengths": ["".join(rng.choice(alphabet, int(k)))
                          for k in rng.integers(1, 65, 1_500)],
        "full width": ["".join(rng.choice(alphabet, 64)) for _ in range(300)],
        "with long": ["".join(rng.choice(alphabet, int(k)))
                      for k in rng.integers(1, 200, 500)],
        "non-ASCII": [f"é-{i}-ß" if i % 3 else f"{i}" for i in range(700)],
        "one": ["x"],
    }
    for name, ids in batches.items():
        want = [_reference_key(i) for i in ids]
        assert join.id_hashes(ids).tolist() == want, name
        assert join._string_keys(ids).tolist() == want, name
        got = join._joined_keys("\x00".join(ids), len(ids))
        assert got is None or got.tolist() == want, name
        if name in ("equal length", "uuid hex", "mixed lengths", "full width", "one"):
            assert got is not None, name  # the numpy paths themselves were compared
            assert join._joined_keys("\x00".join(ids), len(ids), nul_free=True).tolist() == want


@pytest.mark.parametrize("layout", ["one per chunk", "one per batch", "mixed in a chunk"])
def test_typed_model_versions_are_the_per_event_paths_chunk_by_chunk(layout):
    """The typed decoder keeps a chunk's versions as one object when the chunk has one
    and makes the batch's list once: whether every chunk has its own version (a string,
    an integer, null), the batch has one, or a chunk mixes them, the list is that of
    the per-event path, value and type, event by event, and so is the set of versions."""
    from test_decode import enc, event, feats

    from stream_monitor.io.decode import _CHUNK, Decoder, outcome_lists

    n = 3 * _CHUNK + 300
    if layout == "one per chunk":
        versions = [("v1", 7, None, "v1")[i // _CHUNK] for i in range(n)]
    elif layout == "one per batch":
        versions = ["2026-11-é"] * n
    else:
        versions = ["v1" if i % 5 else 2 for i in range(n)]
    msgs = [enc({**event(feats(x=float(i % 7)), event_id=f"e{i}", prediction=0.25,
                         ts=1.79e9 + i), "model_version": v})
            for i, v in enumerate(versions)]
    from test_decode import make_decoder
    fast = make_decoder()
    fast.outcomes = True
    slow = Decoder(fast.schemas, fast.config)
    slow.typed, slow.outcomes = False, True
    a = fast.decode(msgs, range(n)).models["m"]
    b = slow.decode(msgs, range(n)).models["m"]
    got, want = outcome_lists(a)["model_version"], b.outcomes["model_version"]
    assert got == want == versions
    assert list(map(type, got)) == list(map(type, versions))
    assert a.outcome_facts[0] == set(versions)
