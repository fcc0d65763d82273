"""Malformed input the decoder must reject with a reason, never crash on (issue 9.2, 9.5, 9.8)."""

from __future__ import annotations

import pytest
from test_decode import T0, decode, enc, event, feats, make_decoder

from stream_monitor.io.decode import TS_MAX, TS_MIN

GOOD = enc(event())


def _deep(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"a":' * depth + inner + b"}" * depth


def _with(field: bytes, value: bytes) -> bytes:
    """The good event with one more top-level field, spliced in as raw bytes."""
    return GOOD[:-1] + b',"' + field + b'":' + value + b"}"


POISON = {
    "invalid utf-8 in a category": (
        enc(event()).replace(b'"premium"', b'"pre\xffmium"'), "not_json"),
    "invalid utf-8 in the model name": (enc(event()).replace(b'"m"', b'"\xfe\xff"', 1),
                                        "not_json"),
    "invalid utf-8 in ts": (enc(event(ts="2026-11-22T10:00:00Z")).replace(b"T10", b"T\xc3("),
                            "not_json"),
    "invalid utf-8 in a feature key": (enc(event()).replace(b'"x"', b'"\x80x"'), "not_json"),
    "1,000 deep in an unused field": (_with(b"extra", _deep(1000)), "not_json"),
    "1,000 deep in segment": (_with(b"segment", _deep(1000)), "not_json"),
    "10,000 deep at the top level": (b"[" * 10_000 + b"]" * 10_000, "not_json"),
    "ts 1e15": (enc(event(ts=1e15)), "bad_timestamp"),
    "ts -1e15": (enc(event(ts=-1e15)), "bad_timestamp"),
    "ts in year 9999": (enc(event(ts="9999-12-31T23:59:59Z")), "bad_timestamp"),
    "ts in milliseconds": (enc(event(ts=T0 * 1000)), "bad_timestamp"),
    "ts before 1970": (enc(event(ts="1969-12-31T23:59:59Z")), "bad_timestamp"),
    "1e400": (enc(event()).replace(b"1.5", b"1e400"), "non_finite"),
    "NaN": (enc(event()).replace(b"1.5", b"NaN"), "non_finite"),
    "-Infinity": (enc(event()).replace(b"1.5", b"-Infinity"), "non_finite"),
}


@pytest.fixture(scope="module")
def dec():
    return make_decoder()


@pytest.mark.parametrize("case", POISON, ids=list(POISON))
@pytest.mark.parametrize("slow", [False, True], ids=["fast-batch", "slow-batch"])
def test_poison_is_rejected_with_its_reason_and_neighbours_survive(dec, case, slow):
    raw, reason = POISON[case]
    good = enc(event(feats(vip=True))) if slow else GOOD  # a boolean takes the slow path
    out = decode(dec, [good, raw, good], [0, 1, 2])
    assert [(r.position, r.reason) for r in out.rejects] == [(1, reason)], out.rejects
    assert out.models["m"].positions.tolist() == [0, 2]
    assert out.rejects[0].raw == raw


def test_non_finite_names_the_feature_and_model(dec):
    out = decode(dec, [enc(event()).replace(b"-0.25", b"-Infinity")])
    (rej,) = out.rejects
    assert (rej.reason, rej.model, rej.feature) == ("non_finite", "m", "z")


def test_range_bounds_are_documented_and_inclusive_at_the_start(dec):
    out = decode(dec, [enc(event(ts=TS_MIN)), enc(event(ts=TS_MAX - 1)), enc(event(ts=TS_MAX))])
    assert [r.position for r in out.rejects] == [2]
    assert out.models["m"].ts.tolist() == [TS_MIN, TS_MAX - 1]


def test_replay_rejects_every_poison_line(tmp_path, churn_reference_file):
    """The poison lines through `replay` (event-time windows): no crash, all kept."""
    import orjson
    from poison import poison_messages

    from stream_monitor.cli import main
    from stream_monitor.io import synthetic
    good = [m for chunk in synthetic.generate(3000, seed=5) for m in chunk]
    poison = poison_messages(good[0])
    lines = good[:1500] + [p for p, _ in poison] + good[1500:]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("defaults:\n  window: {seconds: 5, allowed_lateness: 1}\n"
                   f"models:\n  churn:\n    reference: {churn_reference_file}\n")
    out = tmp_path / "out"
    assert main(["replay", "--config", str(cfg), "--input", str(path), "--out", str(out),
                 "--quiet"]) == 0
    rejects = [orjson.loads(x) for x in (out / "rejects.jsonl").read_bytes().splitlines()]
    assert sorted((r["line"], r["reason"]) for r in rejects) == [
        (1501 + i, reason) for i, (_, reason) in enumerate(poison)]
    windows = [orjson.loads(x) for x in (out / "windows.jsonl").read_bytes().splitlines()]
    assert sum(w["window"]["events"] for w in windows) == 3000
