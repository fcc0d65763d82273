"""Decoder contract (PRODUCT.md §3-§4): bytes of a batch -> columns per model + rejects."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import orjson
import pytest

from stream_monitor.config import ProfileConfig, parse_config
from stream_monitor.core.reference import Reference, ReferenceBuilder
from stream_monitor.io.decode import DecodedBatch, Decoder
from stream_monitor.pipeline import ModelPipeline

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp()
ABSENT = object()  # marks a key to leave out of an event


def _reference_m() -> Reference:
    rng = np.random.default_rng(3)
    b = ReferenceBuilder("m", ProfileConfig(numeric_bins=10), kinds={"tier": "categorical"})
    for i in range(300):
        b.add({"x": float(rng.normal()), "y": int(rng.integers(0, 50)), "z": float(rng.uniform()),
               "plan": ("basic", "premium", "student")[i % 3], "vip": i % 4 == 0,
               "tier": 1 + i % 3}, prediction=float(rng.uniform()))
    return b.build()


def _reference_n() -> Reference:
    b = ReferenceBuilder("n", ProfileConfig(numeric_bins=10))
    for i in range(100):
        b.add({"score": i / 10, "color": ("red", "blue")[i % 2]},
              prediction=("yes", "no")[i % 3 > 0])
    return b.build()


REFS = {"m": _reference_m(), "n": _reference_n()}


def make_decoder(models=("m", "n"), decode: dict | None = None,
                 features: dict | None = None) -> Decoder:
    data = {"models": {name: {"reference": f"{name}.json"} for name in models}}
    if features:
        data["models"]["m"]["features"] = features
    if decode:
        data["decode"] = decode
    cfg = parse_config(data)
    return Decoder({name: ModelPipeline(name, cfg, REFS[name]).schema for name in models},
                   cfg.decode)


@pytest.fixture(scope="module")
def dec() -> Decoder:
    return make_decoder()


def feats(**over) -> dict:
    f = {"x": 1.5, "y": 7, "z": -0.25, "plan": "premium", "vip": "true", "tier": "2"}
    f.update(over)
    return {k: v for k, v in f.items() if v is not ABSENT}


def event(features: dict | None = None, **over) -> dict:
    ev = {"model": "m", "model_version": "v3", "event_id": "e1", "ts": T0,
          "features": feats() if features is None else features, "prediction": 0.4}
    ev.update(over)
    return {k: v for k, v in ev.items() if v is not ABSENT}


def enc(ev) -> bytes:
    return orjson.dumps(ev)


SLOW_FEATS = {"vip": True}  # a boolean for a categorical feature (typed path since issue 11)


def on_path(dec: Decoder, path: str) -> Decoder:
    """The decoder itself ("fast": typed where it can) or a copy decoding every event on
    the per-event path ("slow"), so that both paths are held to the same contract."""
    if path == "fast":
        return dec
    slow = Decoder(dec.schemas, dec.config)
    slow.typed = False
    return slow


def col(dec: Decoder, model: str, name: str) -> int:
    s = dec.schemas[model]
    return s.numeric.index(name) if name in s.numeric else s.categorical.index(name)


def code(dec: Decoder, model: str, name: str, key) -> int:
    s = dec.schemas[model]
    return int(s.cat_codes[s.categorical.index(name)][key])


def absent_ix(dec: Decoder, model: str, name: str) -> int:
    return dec.schemas[model].feature_names.index(name)


def decode(dec: Decoder, messages, positions=None) -> DecodedBatch:
    positions = list(range(len(messages))) if positions is None else positions
    out = dec.decode(messages, positions)
    # the invariant every batch keeps: nothing is dropped, nothing is counted twice
    assert out.messages == len(messages)
    assert out.events + len(out.rejects) == len(messages)
    seen = sorted([p for b in out.models.values() for p in b.positions.tolist()]
                  + [r.position for r in out.rejects])
    assert seen == sorted(positions)
    return out


# -- well-formed events -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_well_formed_events_become_columns(dec, path):
    extra = SLOW_FEATS if path == "slow" else {}
    msgs = [enc(event(feats(x=1.5, y=7, plan="premium", **extra))),
            enc(event(feats(x=-2.0, y=0, plan="basic", tier="3", **extra), ts=T0 + 5,
                      prediction=0.9))]
    out = decode(on_path(dec, path), msgs, [40, 41])
    assert out.rejects == [] and list(out.models) == ["m"]
    b = out.models["m"]
    assert b.positions.tolist() == [40, 41]
    assert b.numeric.dtype == np.float64 and b.numeric.shape == (2, 3)
    assert b.numeric[:, col(dec, "m", "x")].tolist() == [1.5, -2.0]
    assert b.numeric[:, col(dec, "m", "y")].tolist() == [7.0, 0.0]
    assert b.numeric[:, col(dec, "m", "z")].tolist() == [-0.25, -0.25]
    j = col(dec, "m", "plan")
    assert b.categorical[:, j].tolist() == [code(dec, "m", "plan", "premium"),
                                            code(dec, "m", "plan", "basic")]
    assert b.categorical[:, col(dec, "m", "tier")].tolist() == [code(dec, "m", "tier", "2"),
                                                                code(dec, "m", "tier", "3")]
    assert b.categorical[:, col(dec, "m", "vip")].tolist() == [code(dec, "m", "vip", "true")] * 2
    assert b.ts.tolist() == [T0, T0 + 5]
    assert b.prediction.tolist() == [0.4, 0.9]
    assert b.model_version == "v3"
    assert b.absent.tolist() == [0] * 6 and b.unexpected_events == 0
    assert b.raw == msgs


# -- rejects ----------------------------------------------------------------------------

ANY = object()  # feature not checked

# id -> (message, reason, model, feature)
REJECTS = {
    "not_json-truncated": (b'{"model": "m", "features": {', "not_json", None, None),
    "not_json-binary": (b"\xff\xfe\x00garbage", "not_json", None, None),
    "not_json-empty": (b"", "not_json", None, None),
    "not_object-array": (b'[{"model": "m"}]', "not_object", None, None),
    "not_object-string": (b'"m"', "not_object", None, None),
    "not_object-number": (b"42", "not_object", None, None),
    "not_object-null": (b"null", "not_object", None, None),
    "no_model-absent": (enc(event(model=ABSENT)), "no_model", None, None),
    "no_model-number": (enc(event(model=5)), "no_model", None, None),
    "no_model-null": (enc(event(model=None)), "no_model", None, None),
    "unknown_model": (enc(event(model="zzz")), "unknown_model", "zzz", None),
    "features-list": (enc(event([1, 2])), "features_not_object", "m", None),
    "features-string": (enc(event("x=1")), "features_not_object", "m", None),
    "features-null": (enc(event(features=ABSENT) | {"features": None}),
                      "features_not_object", "m", None),
    "features-absent": (enc({k: v for k, v in event().items() if k != "features"}),
                        "features_not_object", "m", None),
    "numeric-string": (enc(event(feats(x="1.5"))), "wrong_type", "m", "x"),
    "numeric-dict": (enc(event(feats(z={"value": 1}))), "wrong_type", "m", "z"),
    "numeric-list": (enc(event(feats(x=[1.0]))), "wrong_type", "m", "x"),
    "numeric-bool": (enc(event(feats(y=True))), "wrong_type", "m", "y"),
    "categorical-dict": (enc(event(feats(plan={"name": "basic"}))), "wrong_type", "m", "plan"),
    "categorical-list": (enc(event(feats(tier=[1]))), "wrong_type", "m", "tier"),
    "prediction-string": (enc(event(prediction="high")), "wrong_type", "m", "prediction"),
    "ts-words": (enc(event(ts="yesterday noon")), "bad_timestamp", "m", ANY),
    "ts-dict": (enc(event(ts={"s": 1})), "bad_timestamp", "m", ANY),
    "ts-bool": (enc(event(ts=True)), "bad_timestamp", "m", ANY),
    "ts-bad-date": (enc(event(ts="2026-13-45T10:00:00Z")), "bad_timestamp", "m", ANY),
}


@pytest.mark.parametrize("companions", ["fast", "slow"])
@pytest.mark.parametrize("case", list(REJECTS), ids=list(REJECTS))
def test_each_reject_reason_with_position_raw_model_feature(dec, case, companions):
    bad, reason, model, feature = REJECTS[case]
    extra = SLOW_FEATS if companions == "slow" else {}
    good0, good1 = enc(event(feats(**extra))), enc(event(feats(x=9.0, **extra)))
    out = decode(on_path(dec, companions), [good0, bad, good1], [100, 205, 307])
    assert len(out.rejects) == 1, out.rejects
    (r,) = out.rejects
    assert (r.position, r.reason, r.model) == (205, reason, model)
    assert r.raw == bad and type(r.raw) is bytes
    if feature is not ANY:
        assert r.feature == feature
    b = out.models["m"]
    assert b.positions.tolist() == [100, 307]
    assert b.numeric[:, col(dec, "m", "x")].tolist() == [1.5, 9.0]
    assert b.raw == [good0, good1]


def test_too_large_is_rejected_before_parsing_and_the_limit_is_inclusive():
    limit = 400
    d = make_decoder(decode={"max_message_bytes": limit})

    def sized(size: int, **extra) -> bytes:
        base = enc(event(feats(**extra), event_id=""))
        return enc(event(feats(**extra), event_id="a" * (size - len(base))))

    exact, exact_slow = sized(limit), sized(limit, **SLOW_FEATS)
    over = sized(limit + 1)
    garbage_over = b"[" * (limit + 1)   # would be not_json, but size is checked first
    assert len(exact) == len(exact_slow) == limit and len(over) == limit + 1
    out = decode(d, [exact, over, garbage_over, exact_slow], [7, 8, 9, 10])
    assert out.models["m"].positions.tolist() == [7, 10]
    assert [(r.position, r.reason, r.raw) for r in out.rejects] == [
        (8, "too_large", over), (9, "too_large", garbage_over)]
    assert str(limit) in out.rejects[0].detail


def test_every_line_is_an_event_or_a_reject(dec):
    msgs = [m for m, *_ in REJECTS.values()]
    msgs += [enc(event()), enc(event(feats(**SLOW_FEATS))), enc(event(model="n", features={
        "score": 1.0, "color": "red"}, prediction="yes"))]
    positions = [1000 + 3 * i for i in range(len(msgs))]
    out = decode(dec, msgs, positions)
    assert out.events == 3 and len(out.rejects) == len(REJECTS)
    assert Counter(r.reason for r in out.rejects) == Counter(v[1] for v in REJECTS.values())
    by_pos = {r.position: r.raw for r in out.rejects}
    for p, m in zip(positions, msgs, strict=True):
        if p in by_pos:
            assert by_pos[p] == m


def test_event_without_model_is_rejected_by_single_model_decoder():
    d = make_decoder(models=("m",))
    out = decode(d, [enc(event(model=ABSENT))], [3])
    assert [(r.position, r.reason) for r in out.rejects] == [(3, "no_model")]


@pytest.mark.parametrize("extra", [{}, {"__never__": 0}, {"__never__": 1}])
def test_the_decoders_sentinel_tag_is_an_unknown_model_among_typed_events(extra):
    """The typed union's never-matching member (tag "\\x00never") never decodes, so a
    single-model decoder can take every event decoded without error as its model's."""
    d = make_decoder(models=("m",))
    msgs = [enc(event(ts=T0 + i)) for i in range(6)]
    msgs[4] = enc(event(model="\x00never", **extra))
    out = decode(d, msgs)
    assert [(r.position, r.reason) for r in out.rejects] == [(4, "unknown_model")]
    assert out.models["m"].positions.tolist() == [0, 1, 2, 3, 5]


def test_default_model_takes_events_without_model():
    d = make_decoder(decode={"default_model": "n"})
    nev = event(model=ABSENT, features={"score": 2.5, "color": "blue"}, prediction="no")
    mev = nev | {"model": "m", "features": feats(), "prediction": 0.4}
    out = decode(d, [enc(nev), enc(mev)], [0, 1])
    assert out.rejects == []
    assert out.models["n"].positions.tolist() == [0]
    assert out.models["n"].numeric.tolist() == [[2.5]]
    assert out.models["m"].positions.tolist() == [1]


# -- missing, absent and unexpected values ------------------------------------------------


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_null_values_stay_missing_never_zero(dec, path):
    extra = SLOW_FEATS if path == "slow" else {}
    out = decode(on_path(dec, path),
                 [enc(event(feats(x=None, plan=None, **extra), prediction=None)),
                  enc(event(feats(**extra)))])
    b = out.models["m"]
    x, plan = col(dec, "m", "x"), col(dec, "m", "plan")
    assert np.isnan(b.numeric[0, x]) and b.numeric[1, x] == 1.5
    assert not np.isnan(b.numeric[0, col(dec, "m", "y")])
    missing = dec.schemas["m"].cat_codes[plan].missing
    assert b.categorical[0, plan] == missing != code(dec, "m", "plan", "basic")
    assert b.categorical[1, plan] == code(dec, "m", "plan", "premium")
    assert np.isnan(b.prediction[0]) and b.prediction[1] == 0.4
    assert b.absent.tolist() == [0] * 6          # null is missing, not absent


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_absent_keys_are_missing_and_counted_per_feature(dec, path):
    extra = SLOW_FEATS if path == "slow" else {}
    msgs = [enc(event(feats(y=ABSENT, tier=ABSENT, **extra))),
            enc(event(feats(y=ABSENT, **extra))),
            enc(event(feats(**extra)))]
    b = decode(on_path(dec, path), msgs).models["m"]
    y, tier = col(dec, "m", "y"), col(dec, "m", "tier")
    assert np.isnan(b.numeric[:2, y]).all() and b.numeric[2, y] == 7.0
    assert b.categorical[0, tier] == dec.schemas["m"].cat_codes[tier].missing
    assert b.categorical[1, tier] == code(dec, "m", "tier", "2")
    expected = [0] * 6
    expected[absent_ix(dec, "m", "y")] = 2
    expected[absent_ix(dec, "m", "tier")] = 1
    assert b.absent.tolist() == expected
    assert b.unexpected_events == 0


def test_unexpected_feature_names_are_counted_and_events_kept(dec):
    msgs = [enc(event(feats(new1=1, new2="a"))), enc(event(feats(new1=2))), enc(event()),
            enc(event(feats(y=ABSENT, new3=None)))]
    out = decode(dec, msgs)
    b = out.models["m"]
    assert out.rejects == [] and len(b) == 4
    assert b.unexpected_events == 3
    assert b.unexpected_names == Counter({"new1": 2, "new2": 1, "new3": 1})
    assert b.absent[absent_ix(dec, "m", "y")] == 1
    assert b.numeric[:3, col(dec, "m", "x")].tolist() == [1.5, 1.5, 1.5]


def test_unexpected_name_is_counted_when_an_ignored_feature_is_absent():
    d = make_decoder(models=("m",), features={"z": {"ignore": True}})
    b = decode(d, [enc(event(feats(z=ABSENT, surprise=1)))]).models["m"]
    assert b.unexpected_events == 1 and b.unexpected_names == Counter({"surprise": 1})


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_rejected_events_do_not_count_in_absent_or_unexpected(dec, path):
    good = enc(event(feats(**SLOW_FEATS)))          # "slow": like the rejected one
    bad = enc(event(feats(x="oops", y=ABSENT, extra=1)))
    out = decode(on_path(dec, path), [good, bad])
    assert [r.reason for r in out.rejects] == ["wrong_type"]
    b = out.models["m"]
    assert b.absent.tolist() == [0] * 6             # actual: y counted once
    assert b.unexpected_events == 0                 # actual: 1


# -- accepted spellings -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_ints_are_accepted_for_numeric_features(dec, path):
    extra = SLOW_FEATS if path == "slow" else {}
    big = 2**53 + 1
    msg = enc(event(feats(x=3, y=-4, z=big, **extra), prediction=1))
    b = decode(on_path(dec, path), [msg]).models["m"]
    row = b.numeric[0]
    assert row[col(dec, "m", "x")] == 3.0 and row[col(dec, "m", "y")] == -4.0
    assert row[col(dec, "m", "z")] == float(big)
    assert b.prediction.tolist() == [1.0]


def test_booleans_and_numbers_for_categorical_features_map_to_category_keys(dec):
    msgs = [enc(event(feats(vip=True, tier=3))), enc(event(feats(vip=False, tier=1.0))),
            enc(event(feats(vip="false", tier="3"))), enc(event(feats(tier=9, plan="gold")))]
    out = decode(dec, msgs)
    assert out.rejects == []
    b = out.models["m"]
    vip, tier, plan = col(dec, "m", "vip"), col(dec, "m", "tier"), col(dec, "m", "plan")
    assert b.categorical[:3, vip].tolist() == [code(dec, "m", "vip", k)
                                               for k in ("true", "false", "false")]
    assert b.categorical[:3, tier].tolist() == [code(dec, "m", "tier", k) for k in ("3", "1", "3")]
    unseen = dec.schemas["m"].cat_codes[tier].unseen
    assert b.categorical[3, tier] == unseen
    assert b.categorical[3, plan] == dec.schemas["m"].cat_codes[plan].unseen
    assert code(dec, "m", "vip", "true") != code(dec, "m", "vip", "false")


TIMESTAMPS = [
    ("2026-11-22T10:00:00Z", T0),
    ("2026-11-22T12:00:00+02:00", T0),
    ("2026-11-22T05:00:00-05:00", T0),
    ("2026-11-22T10:00:00.250Z", T0 + 0.25),
    (int(T0), T0),
    (T0 + 0.5, T0 + 0.5),
]


@pytest.mark.filterwarnings("ignore:no explicit representation of timezones")
@pytest.mark.parametrize(("ts", "expected"), TIMESTAMPS, ids=[str(t) for t, _ in TIMESTAMPS])
def test_timestamp_spellings_decode_to_epoch_seconds(dec, ts, expected):
    for extra in ({}, SLOW_FEATS):
        b = decode(dec, [enc(event(feats(**extra), ts=ts))]).models["m"]
        assert b.ts.tolist() == [pytest.approx(expected, abs=1e-6)]


@pytest.mark.filterwarnings("ignore:no explicit representation of timezones")
def test_timestamps_in_one_batch_keep_input_order(dec):
    strings = [t for t, _ in TIMESTAMPS if isinstance(t, str)]
    for group in (TIMESTAMPS, [(t, e) for t, e in TIMESTAMPS if t in strings]):
        msgs = [enc(event(ts=t)) for t, _ in group] + [enc(event(ts=ABSENT)),
                                                        enc(event(ts=None))]
        out = decode(dec, msgs)
        assert out.rejects == []
        got = out.models["m"].ts
        assert got[:-2].tolist() == pytest.approx([e for _, e in group], abs=1e-6)
        assert np.isnan(got[-2:]).all()              # absent / null ts: unknown, not 0


@pytest.mark.parametrize("ts", ["", "NaT"])
def test_unparseable_timestamp_string_is_rejected_even_in_an_all_string_batch(dec, ts):
    out = decode(dec, [enc(event(ts="2026-11-22T10:00:00Z")), enc(event(ts=ts))], [0, 1])
    assert [(r.position, r.reason) for r in out.rejects] == [(1, "bad_timestamp")]


def test_timestamp_outcome_does_not_depend_on_batch_neighbours(dec):
    alone = decode(dec, [enc(event(ts="2026"))], [1])
    mixed = decode(dec, [enc(event(ts=int(T0))), enc(event(ts="2026"))], [0, 1])
    assert [r.reason for r in alone.rejects] == [r.reason for r in mixed.rejects]


# -- fast and slow paths agree -----------------------------------------------------------


def test_mixed_fast_and_slow_batch_equals_decoding_each_event_alone():
    d = make_decoder()
    events = [
        event(),                                              # fast
        event(feats(vip=True)),                               # fast: boolean category
        event(feats(x=None, y=3), ts="2026-11-22T10:00:01Z"),  # fast
        event(feats(tier=2, plan=None)),                      # fast: int category
        event(feats(z=ABSENT), prediction=ABSENT),            # fast: absent key
        event(feats(new=1), ts=T0 + 7),                       # slow: unexpected name
        event(model="n", features={"score": 0.5, "color": "red"}, prediction="yes"),
        event(feats(y=ABSENT, vip=False)),                    # fast: absent and boolean
        event(feats(x=-1e300)),                               # fast
        event(model="n", features={"score": 1, "color": True}, prediction="no"),  # fast
    ]
    msgs = [enc(e) for e in events]
    slow_seen: list[bytes] = []
    original = d._decode_slow

    def spy(messages, positions):
        slow_seen.extend(messages)
        return original(messages, positions)

    d._decode_slow = spy
    positions = [10 * i + 1 for i in range(len(msgs))]
    together = decode(d, msgs, positions)
    assert 0 < len(slow_seen) < len(msgs)  # both paths were exercised
    assert together.rejects == []

    alone = [decode(d, [m], [p]) for m, p in zip(msgs, positions, strict=True)]
    for model in ("m", "n"):
        parts = [a.models[model] for a in alone if model in a.models]
        b = together.models[model]
        assert b.positions.tolist() == [p.positions[0] for p in parts]
        assert b.positions.tolist() == sorted(b.positions.tolist())
        np.testing.assert_array_equal(b.ts, np.concatenate([p.ts for p in parts]))
        np.testing.assert_array_equal(b.numeric, np.concatenate([p.numeric for p in parts]))
        np.testing.assert_array_equal(b.categorical,
                                      np.concatenate([p.categorical for p in parts]))
        np.testing.assert_array_equal(b.prediction,
                                      np.concatenate([p.prediction for p in parts]))
        np.testing.assert_array_equal(b.absent, sum(p.absent for p in parts))
        assert b.unexpected_events == sum(p.unexpected_events for p in parts)
        assert b.unexpected_names == sum((p.unexpected_names for p in parts), Counter())
        assert b.raw == [m for m, p in zip(msgs, positions, strict=True) if p in b.positions]


# -- configuration of the decoder ---------------------------------------------------------


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_field_mapping_points_at_users_fields(path):
    d = make_decoder(decode={"fields": {"model": "model_name", "features": "inputs",
                                        "ts": "time", "prediction": "output",
                                        "model_version": "version"}})
    extra = SLOW_FEATS if path == "slow" else {}
    ev = {"model_name": "m", "version": "2024-01", "time": "2026-11-22T10:00:00Z",
          "inputs": feats(x=4.25, **extra), "output": 0.7}
    misplaced = {k: v for k, v in ev.items() if k != "inputs"} | {"features": ev["inputs"]}
    out = decode(on_path(d, path), [enc(ev), enc(event()), enc(misplaced)], [0, 1, 2])
    b = out.models["m"]
    assert b.positions.tolist() == [0]
    assert b.numeric[0, col(d, "m", "x")] == 4.25
    assert b.ts.tolist() == [T0] and b.prediction.tolist() == [0.7]
    assert b.model_version == "2024-01"
    assert [(r.position, r.reason) for r in out.rejects] == [
        (1, "no_model"), (2, "features_not_object")]


def test_invalid_values_missing_keeps_event_and_counts_type_violation():
    d = make_decoder(decode={"invalid_values": "missing"})
    msgs = [enc(event(feats(x="abc"))), enc(event(feats(plan={"a": 1}, y=[2]))), enc(event())]
    out = decode(d, msgs)
    assert out.rejects == []
    b = out.models["m"]
    x, y, plan = col(d, "m", "x"), col(d, "m", "y"), col(d, "m", "plan")
    assert np.isnan(b.numeric[0, x]) and b.numeric[1, x] == 1.5
    assert np.isnan(b.numeric[1, y]) and b.numeric[0, y] == 7.0
    assert b.categorical[1, plan] == d.schemas["m"].cat_codes[plan].missing
    violations = [0] * 6
    for name in ("x", "y", "plan"):
        violations[absent_ix(d, "m", name)] = 1
    assert b.type_violations.tolist() == violations
    assert b.absent.tolist() == [0] * 6


def test_several_models_in_one_batch_are_split(dec):
    msgs = [enc(event(feats(x=1.0))),
            enc(event(model="n", features={"score": 2.0, "color": "blue"}, prediction="no")),
            enc(event(feats(x=3.0, **SLOW_FEATS))),
            enc(event(model="n", features={"score": 4.0, "color": "green"}, prediction="yes")),
            enc(event(model="zzz"))]
    out = decode(dec, msgs, [5, 6, 7, 8, 9])
    m, n = out.models["m"], out.models["n"]
    assert m.positions.tolist() == [5, 7] and n.positions.tolist() == [6, 8]
    assert m.numeric.shape == (2, 3) and n.numeric.shape == (2, 1)
    assert m.numeric[:, col(dec, "m", "x")].tolist() == [1.0, 3.0]
    assert n.numeric[:, 0].tolist() == [2.0, 4.0]
    color = dec.schemas["n"].cat_codes[0]
    assert n.categorical[:, 0].tolist() == [color["blue"], color.unseen]
    pred = dec.schemas["n"].prediction.codes
    assert n.prediction.tolist() == [pred["no"], pred["yes"]]
    assert [(r.position, r.reason, r.model) for r in out.rejects] == [(9, "unknown_model", "zzz")]


# -- the typed path takes every valid event (issue 11) -----------------------------------


def _varied_events(seed: int, n: int) -> list[bytes]:
    """Events unlike the repo's generator: booleans, ints for numeric features, integer
    ties, Cauchy tails, nulls and absent keys (a few percent each), categories never seen
    in the reference, int-keyed categories, and a few events of the other model."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = {"x": float(rng.standard_cauchy()), "y": int(rng.poisson(4)),
             "z": int(rng.integers(-3, 3)) if rng.random() < 0.3 else float(rng.uniform()),
             "plan": str(rng.choice(["basic", "premium", "student", "gold", "p-new"])),
             "vip": bool(rng.random() < 0.3), "tier": int(rng.integers(0, 6))}
        for k in list(f):
            u = rng.random()
            if u < 0.03:
                del f[k]
            elif u < 0.06:
                f[k] = None
        ev = event(f, ts=T0 + i, prediction=float(rng.uniform()) if rng.random() > 0.03
                   else None)
        if rng.random() < 0.05:
            ev = event(model="n", features={"score": int(rng.integers(0, 9)),
                                            "color": str(rng.choice(["red", "blue", "teal"]))},
                       prediction=bool(rng.random() < 0.5) if rng.random() < 0.5 else "yes")
        out.append(enc(ev))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_valid_events_of_any_value_mix_stay_on_the_typed_path(seed):
    d = make_decoder()
    msgs = _varied_events(seed, 400)
    slow_seen: list[bytes] = []
    original = d._decode_slow
    d._decode_slow = lambda m, p: slow_seen.extend(m) or original(m, p)
    out = decode(d, msgs)
    assert out.rejects == [] and slow_seen == []
    b = out.models["m"]
    # the mix really was there: absent keys, nulls, unseen and int-keyed categories
    assert b.absent.sum() > 0 and np.isnan(b.numeric).sum() > b.absent[:3].sum()
    tier = col(d, "m", "tier")
    codes = d.schemas["m"].cat_codes[tier]
    assert {code(d, "m", "tier", "1"), codes.unseen} <= set(b.categorical[:, tier].tolist())
    plan = d.schemas["m"].cat_codes[col(d, "m", "plan")]
    assert plan.unseen in b.categorical[:, col(d, "m", "plan")]


@pytest.mark.parametrize(("seed", "chunk"), [(4, 2048), (5, 7), (6, 64)])
def test_typed_path_decodes_exactly_as_the_per_event_path(seed, chunk, monkeypatch):
    import stream_monitor.io.decode as decode_module
    monkeypatch.setattr(decode_module, "_CHUNK", chunk)   # batches cut into typed chunks
    fast = make_decoder()
    slow = on_path(fast, "slow")
    msgs = _varied_events(seed, 500)
    msgs[17] = b'{"model": "m", "features": {"x": "1"}}'          # a reject among them
    msgs[300] = enc(event(feats(extra_field=1)))                   # an unknown field
    fast._fast_decoder()
    assert fast._general is not None    # Literal types first, the plain ones for the rest
    _same_columns(decode(fast, msgs), decode(slow, msgs))


def _same_columns(a: DecodedBatch, b: DecodedBatch, models=("m", "n")) -> None:
    assert [(r.position, r.reason, r.feature) for r in a.rejects] == [
        (r.position, r.reason, r.feature) for r in b.rejects]
    for model in models:
        x, y = a.models[model], b.models[model]
        for name in ("positions", "ts", "numeric", "categorical", "prediction", "absent",
                     "type_violations"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        assert x.unexpected_names == y.unexpected_names and x.raw == y.raw
        assert x.model_version == y.model_version


def _with_unseen(seed: int, n: int, share: float) -> list[bytes]:
    """`_varied_events` whose categories are the reference's, but for `share` of the
    events, which get a category never seen in training (plan, vip or color)."""
    rng = np.random.default_rng(seed)
    out = []
    for m in _varied_events(seed, n):
        ev = orjson.loads(m)
        f = ev["features"]
        for key, known in (("plan", ("basic", "premium", "student")), ("color", ("red", "blue"))):
            if isinstance(f.get(key), str):
                f[key] = str(rng.choice(known))
        if rng.random() < share:
            key = "color" if ev["model"] == "n" else str(rng.choice(["plan", "vip"]))
            f[key] = f"new-{rng.integers(0, 5)}"
        out.append(enc(ev))
    return out


@pytest.mark.parametrize("seed", [11, 12])
def test_literal_categories_decode_exactly_and_an_unseen_one_costs_its_event_only(seed):
    """Closed categorical features (every training category in the reference) decode as
    a Literal of the reference's categories; an event with another category (valid) is
    decoded again by the plain typed struct, alone, and never leaves the typed path."""
    fast = make_decoder()
    assert fast.schemas["m"]._closed.keys() == {col(fast, "m", "plan"), col(fast, "m", "vip")}
    assert fast.schemas["n"]._closed.keys() == {0}      # color; tier is int-keyed: plain
    slow_seen: list[bytes] = []
    original = fast._decode_slow
    fast._decode_slow = lambda m, p: slow_seen.extend(m) or original(m, p)
    literal_types = 0
    for batch in range(3):
        msgs = _with_unseen(seed * 10 + batch, 600, 0.01)
        decoder, types = fast._fast_decoder()
        literal_types = sum(t.__name__ == "m_event" for t in types)
        misses = []
        general = fast._general
        fast._general = lambda m, misses=misses, general=general: (
            misses.append(m) or general(m))
        out = decode(fast, msgs)
        fast._general = general
        assert out.rejects == [] and slow_seen == []
        unseen = [m for m in msgs if b'"new-' in m]
        assert misses == unseen and unseen         # exactly those, once each
        _same_columns(out, decode(on_path(fast, "slow"), msgs))
        assert fast._plain == set()                 # 1%: the Literal types stay
    assert literal_types == 2                       # a Literal and a plain type for m


def test_many_unseen_categories_switch_the_model_to_its_plain_type():
    """A model whose events fail their Literal type for more than 2% of a batch's messages
    is decoded by its plain type from the next batch on (one decoding per event), as
    exactly."""
    fast = make_decoder()
    msgs = _with_unseen(21, 800, 0.3)
    _same_columns(decode(fast, msgs), decode(on_path(fast, "slow"), msgs))
    # the cost is counted against the batch: n's few events (5%) keep their Literal type
    assert fast._plain == {"m"}
    _, types = fast._fast_decoder()
    assert sorted(t.__name__ for t in types) == ["m_event", "n_event", "n_event"]
    msgs = _with_unseen(22, 800, 0.3)
    _same_columns(decode(fast, msgs), decode(on_path(fast, "slow"), msgs))


@pytest.mark.parametrize("chunk", [5, 64])
def test_nullable_columns_keep_zeros_signs_and_nan_bits_as_the_per_event_path(chunk,
                                                                             monkeypatch):
    """A numeric column that has carried a null is packed as truth values and its nulls
    are found among the false ones (None, or a zero): zeros, -0.0, ints and absent keys
    next to nulls keep exactly the bits of the per-event path, in the chunk where the
    first null appears (the general path) and in the chunks after it (the packed one)."""
    import stream_monitor.io.decode as decode_module
    monkeypatch.setattr(decode_module, "_CHUNK", chunk)
    fast = make_decoder()
    rng = np.random.default_rng(chunk)
    values = [0.0, -0.0, 0, None, 1e-300, -2.5, 3, None, 0.0]
    msgs = []
    for i in range(300):
        x, z = values[i % len(values)], values[(i * 7) % len(values)] if i > 40 else 0.5
        f = feats(x=x, z=z, y=ABSENT if rng.random() < 0.1 else int(rng.integers(0, 3)),
                  plan=str(rng.choice(["basic", "premium", "gold"])), vip=bool(i % 3))
        msgs.append(enc(event(f, ts=T0 + i, prediction=None if i % 11 == 0 else 0.0)))
    a, b = decode(fast, msgs), decode(on_path(fast, "slow"), msgs)
    _same_columns(a, b, models=("m",))
    x, y = a.models["m"], b.models["m"]
    np.testing.assert_array_equal(x.absent_rows, y.absent_rows)
    # bit for bit (-0.0, the NaN of a null), but for absent keys: NaN with a payload that
    # marks them on the typed path (`ABSENT_NAN`), a plain NaN on the per-event path
    given = ~x.absent_rows[:, :x.numeric.shape[1]]
    np.testing.assert_array_equal(x.numeric.view(np.uint64)[given],
                                  y.numeric.view(np.uint64)[given])
    for name in ("ts", "prediction"):
        np.testing.assert_array_equal(getattr(x, name).view(np.uint64),
                                      getattr(y, name).view(np.uint64), err_msg=name)
    assert np.signbit(x.numeric[:, col(fast, "m", "x")]).any()      # -0.0 was there
    assert fast.schemas["m"]._nullable == {col(fast, "m", "x"), col(fast, "m", "z")}


@pytest.mark.parametrize("seed", [31, 32])
def test_fields_follow_the_producers_key_order_and_any_order_decodes_exactly(seed):
    """The typed struct's fields take the order of the keys in the first event of a
    model (learned once, used from the next batch): events in that order, in another
    order or with keys absent decode exactly as the per-event path."""
    fast = make_decoder()
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(3):
        msgs = []
        for m in _varied_events(seed * 10 + b, 300):
            ev = orjson.loads(m)
            if ev["model"] == "m":      # a column without nulls: packed as float64
                ev["features"]["x"] = float(rng.normal())
            keys = sorted(ev["features"], key=lambda k: "zpxtyv".find(k[0]))  # interleaved
            if b == 2 and rng.random() < 0.5:     # a producer that changed its key order
                rng.shuffle(keys)
            ev["features"] = {k: ev["features"][k] for k in keys}
            msgs.append(enc(ev))
        batches.append(msgs)
    first = next(e for e in map(orjson.loads, batches[0]) if e["model"] == "m")
    for msgs in batches:
        _same_columns(decode(fast, msgs), decode(on_path(fast, "slow"), msgs))
    schema = fast.schemas["m"]
    assert schema.key_order == tuple(first["features"])
    fields = fast._fast_decoder()[1]
    order = [t.__annotations__["features"].__struct_encode_fields__ for t in fields
             if t.__name__ == "m_event"]
    learned = list(schema.key_order)
    assert order and all(list(o[:len(learned)]) == learned for o in order)
    assert learned[:2] == ["z", "plan"]         # not the reference's (sorted) order


def _window_stats(report: dict) -> dict:
    """A window report as written to windows.jsonl (numpy values as JSON)."""
    return orjson.loads(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY))


@pytest.mark.parametrize("seed", [7, 8])
def test_typed_path_gives_the_same_window_statistics_as_the_per_event_path(seed):
    from stream_monitor.pipeline import Monitor
    cfg = parse_config({"defaults": {"window": {"events": 150}},
                        "models": {"m": {"reference": "m.json"}, "n": {"reference": "n.json"}}})
    typed, per_event = Monitor(cfg, REFS), Monitor(cfg, REFS)
    per_event.decoder.typed = False
    msgs = _varied_events(seed, 1_000)
    reports = {id(typed): [], id(per_event): []}
    for mon in (typed, per_event):
        for i in range(0, len(msgs), 170):      # batches that straddle window boundaries
            r = mon.process(msgs[i:i + 170], range(i, i + len(msgs[i:i + 170])))
            assert r.rejects == []
            reports[id(mon)] += r.reports
        reports[id(mon)] += mon.flush().reports
    a, b = reports[id(typed)], reports[id(per_event)]
    assert len(a) == len(b) >= 6
    assert [_window_stats(r) for r in a] == [_window_stats(r) for r in b]


# -- data-quality facts belong to the window of their event (issue 8, item 3) -------------


def _windows(window: dict):
    from stream_monitor.core.engine import ModelWindows
    cfg = parse_config({"models": {"m": {"reference": "m.json"}},
                        "defaults": {"window": window}})
    pipe = ModelPipeline("m", cfg, REFS["m"])
    return pipe.schema, ModelWindows("m", pipe.evaluator.layout, pipe.settings.window)


FAULTS = {
    "absent": lambda i: event(feats(y=ABSENT), ts=T0 + i),
    "unexpected": lambda i: event(feats(surprise=1), ts=T0 + i),
    "violation": lambda i: event(feats(x="oops"), ts=T0 + i),   # rejected, counted
}


@pytest.mark.parametrize("path", ["fast", "slow"])
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("window", [{"events": 10}, {"seconds": 10}])
def test_quality_faults_count_in_the_window_of_their_event(fault, window, path):
    schema, windows = _windows(window)
    d = on_path(Decoder({"m": schema}, make_decoder(models=("m",)).config), path)
    t = 10 * math.floor(T0 / 10)         # on the grid of 10 s windows
    msgs = [enc(event(feats(), ts=t + i)) for i in range(17)]
    msgs[13] = enc(FAULTS[fault](0) | {"ts": t + 13})   # event 13: after the boundary
    closed, _ = windows.add(d.decode(msgs[:5], range(5)).models["m"])
    # one batch over events 5..16 that both windows share: window 0 ends after event 9
    batch = d.decode(msgs[5:], range(5, 17)).models["m"]
    assert batch.positions[0] < 10 < batch.positions[-1]
    closed += windows.add(batch)[0]
    closed += windows.flush()
    first, second = closed[0].accumulator, closed[1].accumulator
    got = {"absent": lambda a: int(a.absent.sum()),
           "unexpected": lambda a: a.unexpected_events,
           "violation": lambda a: int(a.type_violations.sum())}[fault]
    assert (first.events, got(first), got(second)) == (10, 0, 1)
