"""State snapshots: a Monitor restored from one continues exactly as the original does.

The stream is unlike the repo generator: two models interleaved, sparse features (absent
keys), nulls, booleans, integer ties, Cauchy tails, a 5,000-category feature, a drift at
an event time off the window grid, delayed out-of-order labels for one model (label
join, performance windows, concept-drift detector), and a second model that learns its
reference from a baseline on count windows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from stream_monitor.config import ProfileConfig, parse_config
from stream_monitor.core.reference import ReferenceBuilder
from stream_monitor.kafka.state import MAGIC, StateError, pack, unpack
from stream_monitor.pipeline import BatchResult, Monitor

T0 = 1_760_000_000.0


def _pay_event(rng: np.random.Generator, i: int, ts: float, drift: bool) -> dict:
    feats: dict = {}
    amount = float(np.abs(rng.standard_cauchy()) * 20 + (40 if drift else 0))
    for name, value in (
            ("amount", amount),
            ("items", int(rng.poisson(3 if not drift else 6))),       # integer ties
            ("score", float(rng.normal(0.5 if drift else 0.0, 1.0))),
            ("age", None if rng.random() < 0.1 else float(rng.gamma(2.0, 10.0))),
            ("card_present", bool(rng.random() < 0.7)),
            ("merchant", f"m{int(rng.zipf(1.3)) % 5000}"),             # 5,000 categories
            ("country", str(rng.choice(["de", "fr", "us", "br", None], p=[.3, .3, .2, .1, .1]))),
    ):
        if rng.random() < 0.05:
            continue  # an absent key
        feats[name] = value
    p = float(1 / (1 + np.exp(-(feats.get("score") or 0.0))))
    return {"model": "pay", "event_id": f"p{i}", "ts": ts, "features": feats,
            "prediction": "fraud" if p >= 0.5 else "ok", "scores": {"fraud": p, "ok": 1 - p}}


def _ads_event(rng: np.random.Generator, ts: float, drift: bool) -> dict:
    feats = {"ctr": float(rng.beta(2, 50 if not drift else 20)),
             "slot": int(rng.integers(0, 4)),
             "format": str(rng.choice(["banner", "video", "native"])),
             "bid": float(rng.lognormal(0, 1))}
    if rng.random() < 0.2:
        del feats["bid"]
    return {"model": "ads", "ts": ts, "features": feats, "prediction": float(rng.random())}


def stream(seed: int, n: int = 30_000) -> list[tuple[str, list[bytes]]]:
    """Batches ('events' | 'labels', lines) of one interleaved stream of uneven batches."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.cumsum(rng.exponential(0.2, n))
    drift_at = T0 + 0.2 * n * 0.55 + 37.3            # off the 600 s window grid
    lines, pending_labels = [], []
    for i in range(n):
        drift = ts[i] >= drift_at
        if rng.random() < 0.6:
            ev = _pay_event(rng, i, float(ts[i]), drift)
            if rng.random() < 0.8:                    # labelled hours later, out of order
                y = "fraud" if rng.random() < (0.3 if not drift else 0.6) else "ok"
                pending_labels.append((float(ts[i] + rng.uniform(30, 900)),
                                       {"model": "pay", "event_id": ev["event_id"], "label": y}))
        else:
            ev = _ads_event(rng, float(ts[i]), drift)
        lines.append(orjson.dumps(ev))
    lines[500:500] = [b"{not json", b'{"model": "pay", "features": [1]}']  # rejects
    pending_labels.sort(key=lambda x: x[0])
    batches, pos, lab = [], 0, 0
    while pos < len(lines):
        k = int(rng.integers(1, 1700))
        batch = lines[pos:pos + k]
        pos += k
        batches.append(("events", batch))
        if batch:
            now = orjson.loads(batch[-1])["ts"] if batch[-1].startswith(b'{"model"') else 0
            out = []
            while lab < len(pending_labels) and pending_labels[lab][0] <= now:
                t, doc = pending_labels[lab]
                out.append(orjson.dumps({**doc, "ts": t}))
                lab += 1
            if out:
                batches.append(("labels", out))
    return batches


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> object:
    tmp = tmp_path_factory.mktemp("state")
    rng = np.random.default_rng(1234)
    builder = ReferenceBuilder("pay", ProfileConfig())
    for i in range(8000):
        ev = _pay_event(rng, i, T0 - 86400 + i, False)
        builder.add(ev["features"], ev["prediction"],
                    "fraud" if rng.random() < 0.3 else "ok")
    ref = tmp / "pay.json"
    builder.build().save(ref)
    return parse_config({
        "models": {
            "pay": {"reference": str(ref), "window": {"seconds": 600, "allowed_lateness": 5},
                    "block": 300,
                    "performance": {"window": 500, "reference_windows": 2,
                                    "min_labels": 50}},
            "ads": {"baseline": {"events": 2500}, "window": {"events": 1500}, "block": 200},
        },
        "topics": {"labels": "labels"},
    }, str(tmp / "config.yaml"))


def _lines(result: BatchResult) -> list[bytes]:
    """Everything a batch produced, one JSON line each (exact comparison)."""
    out = [b"R " + orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) for r in result.reports]
    out += [b"A " + orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY) for a in result.alerts]
    out += [b"P " + orjson.dumps(p, option=orjson.OPT_SERIALIZE_NUMPY)
            for p in result.performance]
    out += [b"D " + orjson.dumps(dataclasses.asdict(d), option=orjson.OPT_SERIALIZE_NUMPY)
            for d in result.detections]
    out += [b"T " + orjson.dumps(r) for r in result.retrain]
    out += [b"J " + orjson.dumps([r.position, r.reason, r.model]) for r in result.rejects]
    out.append(b"E " + orjson.dumps(sorted(result.events.items())))
    return out


def _apply(monitor: Monitor, batches, start: int) -> list[bytes]:
    return _continue(monitor, batches, start * 10_000)


def _run_with_cut(config, batches, cut: int) -> tuple[list[bytes], list[bytes], Monitor]:
    """(outputs after the cut uninterrupted, outputs after the cut restored, the original)."""
    a = Monitor(config, labels=True)
    position = 0
    for kind, lines in batches[:cut]:
        positions = range(position, position + len(lines))
        position += len(lines)
        (a.process if kind == "events" else a.process_labels)(lines, positions)
    snaps = {m: a.snapshot(m) for m in config.models}
    b = Monitor(config, labels=True)
    for m, data in snaps.items():
        b.restore(m, data)
    # positions go on from where the original is (both continue from the same numbers)
    rest = batches[cut:]
    return _continue(a, rest, position), _continue(b, rest, position), a


def _continue(monitor: Monitor, batches, position: int) -> list[bytes]:
    out = []
    for kind, lines in batches:
        positions = range(position, position + len(lines))
        position += len(lines)
        result = (monitor.process(lines, positions) if kind == "events"
                  else monitor.process_labels(lines, positions))
        out += _lines(result)
    return out + _lines(monitor.flush())


@pytest.mark.parametrize("seed", [3, 8])
def test_restored_monitor_continues_exactly(config, seed):
    batches = stream(seed)
    n = len(batches)
    cuts = sorted({1, 2, n // 5, n // 3, n // 2, (3 * n) // 4, n - 2})
    seen_mid_window = seen_mid_block = seen_baseline = seen_join = False
    for cut in cuts:
        expected, got, original = _run_with_cut(config, batches, cut)
        assert got == expected, f"seed {seed}, cut after batch {cut} of {n}"
        kinds = {line[:1] for line in expected}
        assert {b"R", b"E"} <= kinds
        # what the cut points covered (checked on a fresh run up to the cut)
        probe = Monitor(config, labels=True)
        pos = 0
        for kind, lines in batches[:cut]:
            (probe.process if kind == "events" else probe.process_labels)(
                lines, range(pos, pos + len(lines)))
            pos += len(lines)
        if "ads" in probe.baselines:
            seen_baseline = True
        for pipe in probe.models.values():
            seen_mid_window |= pipe.windows.open_events > 0
            if pipe.detectors is not None:
                seen_mid_block |= pipe.detectors.to_state()["pending"] is not None
        seen_join |= bool(probe.performance.models["pay"].buffer.predictions)
    assert seen_mid_window and seen_mid_block and seen_baseline and seen_join
    full = _apply(Monitor(config, labels=True), batches, 0)
    kinds = {line[:1] for line in full}
    # the stream exercises every kind of output the snapshot must carry state for
    assert {b"R", b"A", b"P", b"D", b"J"} <= kinds, kinds


def test_snapshot_is_compact_and_versioned(config):
    batches = stream(5, 12_000)
    m = Monitor(config, labels=True)
    pos = 0
    for kind, lines in batches[: len(batches) // 2]:
        (m.process if kind == "events" else m.process_labels)(lines, range(pos, pos + len(lines)))
        pos += len(lines)
    data = m.snapshot("pay")
    assert data[:4] == MAGIC
    assert b'"counts"' not in data  # no JSON in it: arrays travel as raw bytes
    fresh = Monitor(config, labels=True)
    with pytest.raises(StateError, match="format version 2, this stream-monitor reads "
                                         "version 1"):
        fresh.restore("pay", data[:4] + (2).to_bytes(2, "big") + data[6:])
    with pytest.raises(StateError, match="not a stream-monitor state snapshot"):
        fresh.restore("pay", b"{}" + data)
    for cut in (7, len(data) // 2, len(data) - 3):
        with pytest.raises(StateError, match="corrupt state snapshot"):
            Monitor(config, labels=True).restore("pay", data[:cut])
    with pytest.raises(StateError, match="of model 'pay', not 'ads'"):
        fresh.restore("ads", data)


def test_snapshot_refuses_another_layout(config, tmp_path):
    data = Monitor(config, labels=True).snapshot("pay")
    rng = np.random.default_rng(7)
    builder = ReferenceBuilder("pay", ProfileConfig(numeric_bins=10))
    for i in range(2000):
        ev = _pay_event(rng, i, T0 + i, False)
        builder.add(ev["features"], ev["prediction"], "ok")
    builder.build().save(tmp_path / "other.json")
    other = parse_config({"models": {"pay": {"reference": str(tmp_path / "other.json")}}},
                         str(tmp_path / "c.yaml"))
    with pytest.raises(StateError, match="another reference or feature layout"):
        Monitor(other).restore("pay", data)


@pytest.mark.parametrize("value", [
    {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.array([np.inf, -np.inf, 0.5])},
    np.array([1 << 90, -(1 << 70), 3], dtype=object),
    {(1, "x", None): frozenset({1, 2}), 2: {3, 4}},
    [(-(1 << 64), 1 << 63), float("-inf")],
])
def test_pack_round_trip(value):
    import msgspec
    back = unpack(msgspec.msgpack.decode(msgspec.msgpack.encode(pack(value))))
    assert _same(back, value)


@pytest.mark.parametrize("kind", [set, frozenset])
def test_equal_sets_pack_to_equal_bytes_however_they_were_built(kind):
    """8 and 16 share a slot in a small set's table, so the order they were added in is
    the order they iterate in: the encoding must not carry that history (a rollback is
    checked by comparing snapshot bytes)."""
    import msgspec
    first, second = set(), set()
    for x in (8, 16, "plan", "f01"):
        first.add(x)
    for x in ("f01", 16, 8, "plan"):
        second.add(x)
    first, second = kind(first), kind(second)
    assert first == second
    assert list(first) != list(second)  # the premise: same members, another order
    assert msgspec.msgpack.encode(pack(first)) == msgspec.msgpack.encode(pack(second))
    back = unpack(msgspec.msgpack.decode(msgspec.msgpack.encode(pack(first))))
    assert type(back) is kind and back == first


def _same(a, b) -> bool:
    if isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and all(x == y for x, y in zip(a.ravel().tolist(), b.ravel().tolist(),
                                               strict=True)))
    if isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("kind", ["adwin", "page_hinkley", "ddm", "hddm_a"])
def test_concept_drift_detectors_round_trip(kind):
    from river import drift
    make = {"adwin": lambda: drift.ADWIN(delta=1e-3), "page_hinkley": drift.PageHinkley,
            "ddm": drift.binary.DDM, "hddm_a": drift.binary.HDDMA}[kind]
    rng = np.random.default_rng(11)
    a = make()
    for x in rng.random(3000) < 0.2:
        a.update(bool(x))
    b = unpack(msgspec_round(pack(a)))
    fired_a, fired_b = [], []
    for x in rng.random(4000) < 0.45:  # a change after the cut: both detect it alike
        a.update(bool(x))
        b.update(bool(x))
        fired_a.append(a.drift_detected)
        fired_b.append(b.drift_detected)
    assert fired_a == fired_b and any(fired_a)


def msgspec_round(tree):
    import msgspec
    return msgspec.msgpack.decode(msgspec.msgpack.encode(tree))


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_snapshot_runs_no_foreign_code():
    import pickle

    import msgspec

    from stream_monitor.kafka import state
    tree = state._tag(state._T_RIVER, pickle.dumps(_Evil()))
    with pytest.raises(StateError, match="not a river class"):
        unpack(msgspec_round(tree))
    tree = state._tag(state._T_OBJECT, ["os:system", {}])
    with pytest.raises(StateError, match="outside stream_monitor"):
        unpack(msgspec.msgpack.decode(msgspec.msgpack.encode(tree)))


def test_a_snapshot_that_does_not_fit_changes_nothing(config):
    import msgspec

    from stream_monitor.kafka import state
    batches = stream(9, 12_000)
    cut = len(batches) // 2

    def run_to(m: Monitor, upto: int) -> int:
        pos = 0
        for kind, lines in batches[:upto]:
            (m.process if kind == "events" else m.process_labels)(
                lines, range(pos, pos + len(lines)))
            pos += len(lines)
        return pos

    donor = Monitor(config, labels=True)
    run_to(donor, cut // 2)
    bad = {}
    for model, broken in (("pay", "detectors"), ("ads", "policy")):
        doc = state.decode(donor.snapshot(model))
        doc.pop(broken)  # windows restored first, then the missing part fails
        bad[model] = (state.MAGIC + state.VERSION.to_bytes(2, "big")
                      + msgspec.msgpack.encode(pack(doc)))
    x, y = Monitor(config, labels=True), Monitor(config, labels=True)
    pos = run_to(x, cut)
    run_to(y, cut)
    for model, data in bad.items():
        with pytest.raises(StateError, match="corrupt state snapshot"):
            x.restore(model, data)
    assert _continue(x, batches[cut:], pos) == _continue(y, batches[cut:], pos)
