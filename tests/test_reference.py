"""Reference profiles (PRODUCT.md §4): built stats vs numpy, JSON round trip, `reference build`."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_monitor.cli import main
from stream_monitor.config import ProfileConfig
from stream_monitor.core.reference import (
    CategoricalProfile,
    NumericProfile,
    Reference,
    ReferenceBuilder,
    ReferenceError,
    build_reference,
    infer_kind,
)


def _numpy_bins(values: np.ndarray, edges: np.ndarray) -> list[int]:
    """Count per bin [e_{i-1}, e_i), computed independently of the code under test."""
    bounds = np.concatenate([[-np.inf], edges, [np.inf]])
    return [int(((values >= lo) & (values < hi)).sum()) for lo, hi in zip(bounds[:-1],
                                                                          bounds[1:],
                                                                          strict=True)]


# -- numeric profiles -------------------------------------------------------------------


@pytest.mark.parametrize("bins", [2, 10, 50])
def test_numeric_profile_matches_numpy(bins):
    rng = np.random.default_rng(11)
    values = rng.lognormal(1.0, 0.7, 4000)
    values[rng.choice(values.size, 200, replace=False)] = np.nan
    builder = ReferenceBuilder("m", ProfileConfig(numeric_bins=bins))
    for v in values:
        builder.add({"amount": None if np.isnan(v) else float(v)})
    p = builder.build().features["amount"]
    assert isinstance(p, NumericProfile)

    present = values[~np.isnan(values)]
    expected_edges = np.quantile(present, np.arange(1, bins) / bins)
    np.testing.assert_allclose(p.edges, expected_edges, rtol=1e-12)
    assert p.edges.size == bins - 1
    assert p.counts.tolist() == _numpy_bins(present, p.edges)
    assert int(p.counts.sum()) == p.count == present.size == 3800
    # quantile bins hold about the same number of values each
    assert p.counts.min() >= 3800 / bins - 2 and p.counts.max() <= 3800 / bins + 2
    assert p.mean == pytest.approx(np.mean(present), rel=1e-12)
    assert p.variance == pytest.approx(np.var(present), rel=1e-9)
    assert p.std == pytest.approx(np.std(present), rel=1e-9)
    assert (p.min, p.max) == (present.min(), present.max())
    assert p.missing_rate == pytest.approx(200 / 4000)


def test_numeric_profile_of_discrete_data_gives_each_atom_its_own_bin():
    values = np.repeat(np.arange(5.0), [50, 10, 10, 10, 20])   # heavy ties at 0
    p = NumericProfile.from_values(values, bins=10)
    assert np.all(np.diff(p.edges) > 0)
    # every value holds >= 5% (half a quantile bin): one bin per value, none empty
    assert p.counts.tolist() == _numpy_bins(values, p.edges) == [50, 10, 10, 10, 20]
    assert p.counts.sum() == 100 and p.missing_rate == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_zero_inflated_profile_keeps_the_atom_apart(seed):
    rng = np.random.default_rng(seed)
    values = np.where(rng.random(20_000) < 0.7, 0.0, rng.exponential(3.0, 20_000))
    p = NumericProfile.from_values(values, bins=50)
    zero_bin = int(np.searchsorted(p.edges, 0.0, side="right"))
    assert p.counts[zero_bin] == (values == 0).sum()       # the zeros and nothing else
    assert p.counts.tolist() == _numpy_bins(values, p.edges)
    assert (p.counts > 0).all()
    # the positive part still gets about 50 * 30% quantile bins of ~2% each
    assert 12 <= p.counts.size - 1 <= 18


def test_constant_numeric_feature_has_one_bin():
    p = NumericProfile.from_values(np.array([3.0, 3.0, np.nan, 3.0]), bins=20)
    assert p.edges.size == 0 and p.counts.tolist() == [3]
    assert (p.mean, p.variance, p.min, p.max, p.count) == (3.0, 0.0, 3.0, 3.0, 3)
    assert p.missing_rate == 0.25


def test_numeric_feature_without_values_is_an_error_naming_it():
    builder = ReferenceBuilder("m", ProfileConfig(), kinds={"age": "numeric"})
    builder.add({"age": None, "plan": "a"})
    builder.add({"plan": "b"})
    with pytest.raises(ReferenceError, match="'age'.*no non-missing values"):
        builder.build()


def test_rows_missing_a_feature_count_as_missing():
    builder = ReferenceBuilder("m", ProfileConfig(numeric_bins=4))
    builder.add({"a": 1.0})
    builder.add({"b": 2.0})          # 'b' appears late: earlier rows count as missing
    builder.add({"a": 3.0, "b": 4.0})
    builder.add({"a": 5.0})
    ref = builder.build()
    assert ref.events == 4
    assert (ref.features["a"].count, ref.features["a"].missing_rate) == (3, 0.25)
    assert (ref.features["b"].count, ref.features["b"].missing_rate) == (2, 0.5)
    assert ref.features["b"].mean == 3.0


# -- categorical profiles ---------------------------------------------------------------


def test_categorical_top_k_other_bucket_and_missing_rate():
    data = ["a"] * 50 + ["b"] * 30 + ["c"] * 10 + ["d"] * 5 + ["e"] * 3 + [None] * 2
    np.random.default_rng(0).shuffle(data)
    builder = ReferenceBuilder("m", ProfileConfig(max_categories=3))
    for v in data:
        builder.add({"plan": v})
    p = builder.build().features["plan"]
    assert isinstance(p, CategoricalProfile)
    assert p.categories == ["a", "b", "c"]
    assert p.counts.tolist() == [50, 30, 10]
    assert (p.other, p.count) == (8, 98)
    assert p.missing_rate == pytest.approx(2 / 100)
    assert p.other_share == pytest.approx(8 / 98)


def test_categorical_keeps_everything_when_under_the_limit_and_keys_booleans_numbers():
    values = [True, False, True, "true", 3, 3.0, "x", None]
    p = CategoricalProfile.from_values(values, max_categories=1000)
    assert dict(zip(p.categories, p.counts.tolist(), strict=True)) == {
        "true": 3, "false": 1, "3": 2, "x": 1}
    assert p.categories[0] == "true"               # most frequent first
    assert (p.other, p.count, p.missing_rate) == (0, 7, 1 / 8)


@pytest.mark.parametrize(("values", "kind"), [
    ([1, 2.5, None, -3], "numeric"),
    ([0, 1, 1, 0], "numeric"),
    (["a", "b"], "categorical"),
    ([True, False], "categorical"),
    ([1, 2, "three"], "categorical"),
    ([1.0, True], "categorical"),
    ([None, None], "categorical"),
])
def test_infer_kind(values, kind):
    assert infer_kind(values) == kind


# -- JSON round trip -------------------------------------------------------------------


def _full_reference() -> Reference:
    rng = np.random.default_rng(5)
    b = ReferenceBuilder("churn", ProfileConfig(numeric_bins=16, max_categories=4))
    for i in range(500):
        b.add({"age": int(rng.integers(18, 90)), "income": float(rng.normal(1e4, 3e3)),
               "const": 1.5, "plan": ("basic", "pro", "team", "edu", "gov", "x")[i % 6],
               "vip": bool(i % 5 == 0), "rare": None if i % 3 else "r"},
              prediction=float(rng.uniform()), label=int(i % 7 == 0))
    return b.build(source="train.jsonl")


def test_save_load_round_trip_is_exact(tmp_path: Path):
    ref = _full_reference()
    path = tmp_path / "ref.json"
    ref.save(path)
    loaded = Reference.load(path)
    assert loaded.to_json() == ref.to_json()
    assert (loaded.model, loaded.events, loaded.source) == ("churn", 500, "train.jsonl")
    assert list(loaded.features) == list(ref.features)
    for name, p in ref.features.items():
        q = loaded.features[name]
        assert type(q) is type(p)
        np.testing.assert_array_equal(q.counts, p.counts)
        assert q.counts.dtype == np.int64
        if isinstance(p, NumericProfile):
            np.testing.assert_array_equal(q.edges, p.edges)
            assert (q.mean, q.variance, q.min, q.max) == (p.mean, p.variance, p.min, p.max)
        else:
            assert q.categories == p.categories and q.other == p.other
        assert (q.count, q.missing_rate) == (p.count, p.missing_rate)
    assert loaded.features["const"].edges.size == 0
    assert isinstance(loaded.prediction, NumericProfile)
    assert isinstance(loaded.label, CategoricalProfile)      # few integer values: classes
    assert sorted(loaded.label.categories) == ["0", "1"]
    assert orjson.loads(path.read_bytes())["schema_version"] == 2
    # v2: absent keys and nulls recorded apart, the membership filter survives the trip
    for name in ("plan", "rare"):
        assert loaded.features[name].absent_rate == ref.features[name].absent_rate
    assert loaded.features["plan"].seen is not None
    assert all(c in loaded.features["plan"].seen for c in ("basic", "pro", "team", "edu",
                                                           "gov", "x"))


def test_version_1_reference_still_loads_and_is_judged_as_before(tmp_path: Path):
    data = _full_reference().to_json()
    data["schema_version"] = 1
    for prof in data["features"].values():     # what a v1 file had
        for key in ("absent_rate", "null_rate", "seen", "singletons"):
            prof.pop(key, None)
    path = tmp_path / "v1.json"
    path.write_bytes(orjson.dumps(data))
    ref = Reference.load(path)
    plan = ref.features["plan"]
    assert plan.seen is None and plan.absent_rate == 0.0
    assert plan.unseen_rate == plan.other_share      # everything outside the top K
    assert ref.features["rare"].null_rate == ref.features["rare"].missing_rate


def test_absent_keys_and_nulls_are_recorded_apart():
    b = ReferenceBuilder("m", ProfileConfig())
    for i in range(1000):
        feats = {"x": None if i % 25 == 0 else float(i), "c": "a" if i % 2 else None}
        if i % 50 == 1:
            del feats["x"]          # absent in 2% of the rows
        if i % 10 == 3:
            del feats["c"]
        b.add(feats)
    ref = b.build()
    x, c = ref.features["x"], ref.features["c"]
    assert (x.absent_rate, x.null_rate, x.missing_rate) == pytest.approx((0.02, 0.04, 0.06))
    assert (c.absent_rate, c.null_rate) == pytest.approx((0.1, 0.5))


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: d.update(schema_version=3), "schema_version 3 is not supported"),
    (lambda d: d.pop("schema_version"), "schema_version None is not supported"),
    (lambda d: d.update(features={}), "no features"),
    (lambda d: d["features"]["age"].update(counts=[1, 2]), "malformed profile"),
    (lambda d: d["features"]["age"].update(edges=[3.0, 2.0, 1.0] + [0.0] * 12),
     "malformed profile"),
    (lambda d: d["features"]["plan"].update(categories=["a", "a", "b", "c"]),
     "malformed profile"),
    (lambda d: d["features"]["age"].pop("mean"), "malformed profile"),
    (lambda d: d["features"]["age"].update(kind="text"), "malformed profile"),
], ids=["version-3", "no-version", "no-features", "counts-length", "edges-decreasing",
        "duplicate-categories", "missing-mean", "unknown-kind"])
def test_load_rejects_bad_reference_with_one_line(tmp_path: Path, mutate, expected):
    data = _full_reference().to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(data))
    with pytest.raises(ReferenceError) as info:
        Reference.load(path)
    msg = str(info.value)
    assert str(path) in msg and expected in msg and "\n" not in msg


def test_load_missing_file_and_bad_json_are_one_line(tmp_path: Path):
    for path, content, expected in ((tmp_path / "none.json", None, "cannot read reference"),
                                    (tmp_path / "bad.json", b"{oops", "not valid JSON")):
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ReferenceError) as info:
            Reference.load(path)
        assert str(path) in str(info.value) and expected in str(info.value)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("features", [[], {"age": 5}], ids=["list", "profile-int"])
def test_load_structurally_malformed_reference_raises_reference_error(tmp_path: Path, features):
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps({"schema_version": 1, "features": features}))
    with pytest.raises(ReferenceError):
        Reference.load(path)


# -- reference build (CLI, no config) ------------------------------------------------------


def _run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip()]


def _events_jsonl(path: Path, n: int = 300) -> Path:
    rng = np.random.default_rng(2)
    lines = []
    for i in range(n):
        ev = {"model": "churn", "ts": 1_700_000_000 + i,
              "features": {"age": int(rng.integers(18, 80)), "score": float(rng.normal()),
                           "plan": ("basic", "pro")[i % 2], "vip": i % 3 == 0,
                           "mixed": i if i % 10 else "n/a", "sparse": None if i % 4 else 1.5},
              "prediction": float(rng.uniform()), "label": ("yes", "no")[i % 4 > 0]}
        lines.append(orjson.dumps(ev))
        if i % 50 == 0:  # other models' events and blank lines are skipped
            lines.append(orjson.dumps({"model": "fraud", "features": {"amount": "huge"}}))
            lines.append(b"")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_reference_build_from_jsonl_infers_kinds(tmp_path: Path, capsys):
    src, out_path = _events_jsonl(tmp_path / "train.jsonl"), tmp_path / "ref.json"
    code, out, err = _run(["reference", "build", "--model", "churn", "--input", str(src),
                           "--out", str(out_path), "--bins", "8"], capsys)
    assert (code, err) == (0, [])
    assert str(out_path) in out and "300 events" in out
    ref = Reference.load(out_path)
    assert ref.model == "churn" and ref.events == 300
    assert {k: p.kind for k, p in ref.features.items()} == {
        "age": "numeric", "score": "numeric", "sparse": "numeric",
        "plan": "categorical", "vip": "categorical", "mixed": "categorical"}
    assert sorted(ref.features["vip"].categories) == ["false", "true"]
    assert ref.features["vip"].counts.sum() == 300
    assert ref.features["age"].edges.size <= 7
    assert ref.features["sparse"].missing_rate == pytest.approx(225 / 300)
    assert (ref.features["sparse"].min, ref.features["sparse"].count) == (1.5, 75)
    assert isinstance(ref.prediction, NumericProfile) and ref.prediction.count == 300
    assert isinstance(ref.label, CategoricalProfile)
    assert dict(zip(ref.label.categories, ref.label.counts.tolist(), strict=True)) == {
        "yes": 75, "no": 225}
    assert "fraud" not in str(ref.to_json()) and "amount" not in ref.features


def test_reference_build_from_csv_infers_kinds(tmp_path: Path, capsys):
    src, out_path = tmp_path / "train.csv", tmp_path / "ref.json"
    rows = ["age,income,plan,active,prediction,label"]
    for i in range(40):
        income = "" if i % 8 == 0 else f"{1000 + 10.5 * i}"
        rows.append(f"{20 + i},{income},{('basic', 'pro')[i % 2]},{('true', 'false')[i % 4 > 0]},"
                    f"{i / 40},{i % 2}")
    src.write_text("\n".join(rows) + "\n")
    code, _, err = _run(["reference", "build", "--model", "m", "--input", str(src),
                         "--out", str(out_path)], capsys)
    assert (code, err) == (0, [])
    ref = Reference.load(out_path)
    assert ref.events == 40
    assert {k: p.kind for k, p in ref.features.items()} == {
        "age": "numeric", "income": "numeric", "plan": "categorical", "active": "categorical"}
    assert ref.features["income"].missing_rate == pytest.approx(5 / 40)
    incomes = np.array([1000 + 10.5 * i for i in range(40) if i % 8])
    assert ref.features["income"].mean == pytest.approx(incomes.mean())
    assert ref.features["age"].mean == pytest.approx(np.mean(np.arange(20, 60)))
    assert Counter(dict(zip(ref.features["active"].categories,
                            ref.features["active"].counts.tolist(), strict=True))) == Counter(
        {"true": 10, "false": 30})
    assert ref.prediction is not None and ref.prediction.kind == "numeric"
    assert ref.label is not None and sorted(ref.label.categories) == ["0", "1"]


def test_reference_build_api_matches_cli(tmp_path: Path, capsys):
    src = _events_jsonl(tmp_path / "train.jsonl", n=120)
    main(["reference", "build", "--model", "churn", "--input", str(src),
          "--out", str(tmp_path / "cli.json")])
    capsys.readouterr()
    api = build_reference(src, "churn", ProfileConfig()).to_json()
    cli = orjson.loads((tmp_path / "cli.json").read_bytes())
    api.pop("created_at"), cli.pop("created_at")
    assert api == cli


@pytest.mark.parametrize(("lines", "expected"), [
    ([b'{"model": "m", "features": {"a": 1}}', b"", b'{"model": "m", "features": {"a": 2'],
     ":3: not valid JSON"),
    ([b'{"model": "m", "features": {"a": 1}}', b"[1, 2]"], ":2: expected an event object"),
    ([b'{"model": "m", "features": "a=1"}'], ":1: expected an event object"),
    ([b'{"model": "other", "features": {"a": 1}}'], "no events to build a reference from"),
], ids=["bad-json-line-3", "not-object-line-2", "features-not-object", "no-events"])
def test_reference_build_input_errors_are_one_line(tmp_path: Path, capsys, lines, expected):
    src = tmp_path / "train.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out_path = tmp_path / "ref.json"
    code, out, err = _run(["reference", "build", "--model", "m", "--input", str(src),
                           "--out", str(out_path)], capsys)
    assert code == 2 and out == "" and not out_path.exists()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and str(src) in err[0] and expected in err[0]


def test_reference_build_missing_input_is_one_line(tmp_path: Path, capsys):
    code, _, err = _run(["reference", "build", "--model", "m", "--input",
                         str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and len(err) == 1
    assert "nope.jsonl" in err[0] and "not found" in err[0]


def test_reference_build_bad_config_is_one_line(tmp_path: Path, capsys):
    src = _events_jsonl(tmp_path / "train.jsonl", n=10)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  churn:\n    reference: r.json\nprofile: {bins: 3}\n")
    code, _, err = _run(["reference", "build", "--config", str(cfg), "--model", "churn",
                         "--input", str(src), "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and len(err) == 1 and "profile" in err[0] and "unknown key" in err[0]


def test_reference_build_uses_config_field_mapping_and_kinds(tmp_path: Path, capsys):
    src = tmp_path / "train.jsonl"
    src.write_bytes(b"\n".join(orjson.dumps({"model_name": "m", "inputs": {
        "zip": 10_000 + i % 3, "x": i * 1.0}}) for i in range(30)) + b"\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode:\n  fields: {model: model_name, features: inputs}\n"
                   "models:\n  m:\n    reference: r.json\n"
                   "    features:\n      zip: {kind: categorical}\n")
    code, _, err = _run(["reference", "build", "--config", str(cfg), "--model", "m",
                         "--input", str(src), "--out", str(tmp_path / "r.json")], capsys)
    assert (code, err) == (0, [])
    ref = Reference.load(tmp_path / "r.json")
    assert ref.features["zip"].kind == "categorical"
    assert sorted(ref.features["zip"].categories) == ["10000", "10001", "10002"]
    assert ref.features["x"].kind == "numeric"


def test_reference_build_creates_the_out_directory(tmp_path: Path, capsys):
    src = _events_jsonl(tmp_path / "train.jsonl", n=10)
    out = tmp_path / "no" / "dir" / "r.json"
    code, _, err = _run(["reference", "build", "--model", "churn", "--input", str(src),
                         "--out", str(out)], capsys)
    assert (code, err) == (0, []) and Reference.load(out).events == 10


def test_reference_build_unwritable_out_is_one_line(tmp_path: Path, capsys):
    src = _events_jsonl(tmp_path / "train.jsonl", n=10)
    (tmp_path / "file").write_text("not a directory")
    code, _, err = _run(["reference", "build", "--model", "churn", "--input", str(src),
                         "--out", str(tmp_path / "file" / "r.json")], capsys)
    assert code == 2 and len(err) == 1 and "r.json" in err[0]


def test_reference_build_ragged_csv_row_is_one_line(tmp_path: Path, capsys):
    src = tmp_path / "train.csv"
    src.write_text("a,b\n1,x\n2,y,surplus\n")
    code, _, err = _run(["reference", "build", "--model", "m", "--input", str(src),
                         "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and len(err) == 1 and "train.csv" in err[0]


def test_reference_build_invalid_bins_is_one_line(tmp_path: Path, capsys):
    src = _events_jsonl(tmp_path / "train.jsonl", n=10)
    code, _, err = _run(["reference", "build", "--model", "churn", "--input", str(src),
                         "--out", str(tmp_path / "r.json"), "--bins", "-5"], capsys)
    assert code == 2 and len(err) == 1 and "bins" in err[0]


# -- membership filter of training categories ---------------------------------------------


@pytest.mark.parametrize("n", [10, 5000, 200_000])
def test_bloom_filter_has_no_false_negatives_and_the_documented_fpr(n):
    from stream_monitor.core.sketch import TARGET_FPR, BloomFilter
    keys = [f"k{i}" for i in range(n)]
    bf = BloomFilter.of(keys)
    assert all(k in bf for k in keys)                      # never a false negative
    probes = [f"other-{i}" for i in range(100_000)]        # disjoint from the keys
    measured = sum(p in bf for p in probes) / len(probes)
    # within 3 binomial sds (plus one in 100,000) of the designed rate, and the rate
    # the filter reports from its own fill agrees with what was measured
    sd = math.sqrt(TARGET_FPR * (1 - TARGET_FPR) / len(probes))
    assert measured <= TARGET_FPR + 3 * sd + 1e-5
    assert bf.false_positive_rate <= 1.5 * TARGET_FPR
    assert abs(measured - bf.false_positive_rate) <= 3 * sd + 1e-5
    again = BloomFilter.from_json(orjson.loads(orjson.dumps(bf.to_json())))
    assert np.array_equal(again.bits, bf.bits) and (again.m, again.k) == (bf.m, bf.k)


@pytest.mark.parametrize(("m", "k"), [(None, None), (1 << 12, 3), (1000, 7)])
def test_bloom_filter_tests_many_keys_at_once_exactly_as_one_by_one(m, k):
    """`contains_many` (the typed decoder's bulk lookup of new categories) answers what
    `in` answers, key for key: false positives included, odd keys, any filter size."""
    from stream_monitor.core.sketch import BloomFilter
    keys = [f"k{i}" for i in range(4000)]
    bf = BloomFilter.of(keys[:1500]) if m is None else BloomFilter(m, k)
    if m is not None:
        bf.update(keys[:1500])
    probes = [*keys, "", "é", "x\ud800y", "z" * 500, *(f"other-{i}" for i in range(20_000))]
    expected = np.array([p in bf for p in probes])
    assert expected[:1500].all()
    assert m is None or expected.sum() > 2000       # small filters: many false positives
    np.testing.assert_array_equal(bf.contains_many(probes), expected)
    assert bf.contains_many([]).shape == (0,)


def test_bloom_filters_merge_exactly():
    from stream_monitor.core.sketch import BloomFilter
    a, b, both = (BloomFilter.for_capacity(2000) for _ in range(3))
    a.update(f"a{i}" for i in range(1000))
    b.update(f"b{i}" for i in range(1000))
    both.update([*(f"a{i}" for i in range(1000)), *(f"b{i}" for i in range(1000))])
    merged = a.merge(b)
    assert np.array_equal(merged.bits, both.bits)
    with pytest.raises(ValueError):
        a.merge(BloomFilter.for_capacity(10))


def test_categorical_reference_keeps_other_apart_from_never_seen():
    rng = np.random.default_rng(3)
    w = 1.0 / np.arange(1, 5001) ** 1.1
    values = [f"c{i}" for i in rng.choice(5000, 50_000, p=w / w.sum())]
    p = CategoricalProfile.from_values(values, max_categories=1000)
    counts = Counter(values)
    assert p.other == sum(c for k, c in counts.items() if k not in set(p.categories))
    assert all(k in p.seen for k in counts)
    assert p.singletons == sum(1 for c in counts.values() if c == 1)
    assert p.unseen_rate == pytest.approx(p.singletons / 50_000)   # Good-Turing
    # a categorical feature with every category in the top K needs no filter
    small = CategoricalProfile.from_values(["a", "b", "a"], max_categories=10)
    assert small.seen is None and small.other == 0
