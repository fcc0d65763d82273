"""Config contract (PRODUCT.md §4): defaults, one-line errors, overrides, check-config."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from stream_monitor.cli import main
from stream_monitor.config import ConfigError, load_config, model_settings, parse_config
from stream_monitor.core.reference import ReferenceBuilder

SOURCE = "cfg.yaml"
BASE = {"models": {"m": {"reference": "x.json"}}}


def _errors(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)
    return info.value.lines


def _one_error(data) -> str:
    lines = _errors(data)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line
    assert line.startswith(f"{SOURCE}: "), line
    return line


def _rule(method: str, warning: float = 0.1, critical: float = 0.2) -> dict:
    return {"method": method, "warning": warning, "critical": critical}


# -- defaults ---------------------------------------------------------------------------


def test_models_with_a_reference_is_a_complete_config_with_documented_defaults():
    cfg = parse_config(BASE)
    assert cfg.kafka == {"bootstrap.servers": "localhost:9092", "group.id": "stream-monitor",
                         "auto.offset.reset": "latest", "session.timeout.ms": 6000,
                         "heartbeat.interval.ms": 2000}
    assert cfg.topics.inferences == ["inferences"]
    assert cfg.topics.labels is None
    assert cfg.topics.alerts == "model-alerts"
    assert cfg.topics.dead_letter == "model-events-dlq"
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 9108)
    assert cfg.decode.invalid_values == "reject"
    assert cfg.decode.fields.model == "model" and cfg.decode.fields.features == "features"

    s = model_settings(cfg, "m")
    assert s.window.events == 10_000 and s.window.seconds is None
    for rule in (s.numeric, s.categorical):
        assert (rule.method, rule.warning, rule.critical) == ("psi", 0.1, 0.25)
    assert (s.alerting.fire_after, s.alerting.resolve_after) == (1, 3)
    f = s.feature("age", "numeric")
    assert f.kind == "numeric" and f.drift == s.numeric
    assert s.feature("plan", "categorical").drift == s.categorical


def test_load_config_reads_minimal_file_and_resolves_relative_to_it(tmp_path: Path):
    path = tmp_path / "sub" / "monitor.yaml"
    path.parent.mkdir()
    path.write_text("models:\n  churn:\n    reference: refs/churn.json\n")
    cfg = load_config(path)
    assert list(cfg.models) == ["churn"]
    assert cfg.models["churn"].reference == Path("refs/churn.json")
    assert cfg.base_dir == path.parent
    assert model_settings(cfg, "churn").window.events == 10_000


# -- one line per mistake: key path, bad value, what was expected -------------------------

# (config, key path, how the bad value is shown (None for a mapping value), expectation)
MISTAKES = {
    "unknown top-level key": (
        {**BASE, "colour": "red"}, "colour", "(got 'red')", "unknown key"),
    "unknown top-level section": (
        {**BASE, "kafak": {"bootstrap.servers": "x"}}, "kafak", None, "unknown key"),
    "unknown nested key": (
        {**BASE, "defaults": {"window": {"evnts": 5}}}, "defaults.window.evnts", "(got 5)",
        "unknown key"),
    "unknown model key": (
        {"models": {"m": {"reference": "x.json", "refrence": "y"}}}, "models.m.refrence",
        "'y'", "unknown key"),
    "wrong type": (
        {**BASE, "http": {"port": "abc"}}, "http.port", "(got 'abc')", "integer"),
    "port out of range": (
        {**BASE, "http": {"port": 70000}}, "http.port", "(got 70000)", "65535"),
    "significance out of range": (
        {**BASE, "defaults": {"significance": 2}}, "defaults.significance", "(got 2)",
        "less than 1"),
    "window events not positive": (
        {**BASE, "defaults": {"window": {"events": 0}}}, "defaults.window.events", "(got 0)",
        "greater than 0"),
    "window with events and seconds": (
        {**BASE, "defaults": {"window": {"events": 5, "seconds": 3}}}, "defaults.window", None,
        "exactly one of 'events' or 'seconds'"),
    "model window with neither": (
        {"models": {"m": {"reference": "x", "window": {"allowed_lateness": 3}}}},
        "models.m.window", None, "exactly one of 'events' or 'seconds'"),
    "model with neither reference nor baseline": (
        {"models": {"m": {}}}, "models.m", None, "'reference'"),
    "model with reference and baseline": (
        {"models": {"m": {"reference": "x", "baseline": {"events": 10}}}}, "models.m", None,
        "exactly one of 'reference'"),
    "unknown numeric method at defaults": (
        {**BASE, "defaults": {"numeric": _rule("kss")}}, "defaults.numeric.method",
        "unknown method 'kss'",
        "expected one of psi, jensen_shannon, ks"),
    "numeric-only method for categorical defaults": (
        {**BASE, "defaults": {"categorical": _rule("ks")}}, "defaults.categorical.method",
        "unknown method 'ks'", "expected one of psi, jensen_shannon)"),
    "unknown method at model level": (
        {"models": {"m": {"reference": "x", "numeric": _rule("foo")}}}, "models.m.numeric.method",
        "unknown method 'foo'", "expected one of"),
    "unknown method at feature level": (
        {"models": {"m": {"reference": "x", "features": {"age": {"drift": _rule("foo")}}}}},
        "models.m.features.age.drift.method", "unknown method 'foo'", "expected one of"),
    "numeric method on a categorical feature override": (
        {"models": {"m": {"reference": "x", "features": {
            "plan": {"kind": "categorical", "drift": _rule("ks")}}}}},
        "models.m.features.plan.drift.method", "unknown method 'ks'",
        "expected one of psi, jensen_shannon)"),
    "critical below warning at defaults": (
        {**BASE, "defaults": {"numeric": _rule("psi", 0.3, 0.1)}}, "defaults.numeric", None,
        "critical (0.1) must be >= warning (0.3)"),
    "critical below warning at feature level": (
        {"models": {"m": {"reference": "x", "features": {
            "age": {"drift": _rule("ks", 0.5, 0.2)}}}}},
        "models.m.features.age.drift", None, "critical (0.2) must be >= warning (0.5)"),
    "critical below warning in data quality": (
        {**BASE, "defaults": {"data_quality": {"missing": {"warning": 0.3, "critical": 0.1}}}},
        "defaults.data_quality.missing", None, "critical (0.1) must be >= warning (0.3)"),
    "models missing": (
        {"http": {"port": 9000}}, "models", None, "required key is missing"),
    "models empty": (
        {"models": {}}, "models", None, "at least 1 item"),
    "models null": (
        {"models": None}, "models", "(got None)", "valid dictionary"),
    "unknown invalid_values": (
        {**BASE, "decode": {"invalid_values": "drop"}}, "decode.invalid_values", "(got 'drop')",
        "'reject' or 'missing'"),
    "unknown feature kind": (
        {"models": {"m": {"reference": "x", "features": {"a": {"kind": "text"}}}}},
        "models.m.features.a.kind", "(got 'text')", "'numeric' or 'categorical'"),
    "base_dir is internal": (
        {**BASE, "base_dir": "/"}, "base_dir", None, "unknown key"),
}


@pytest.mark.parametrize("case", list(MISTAKES), ids=list(MISTAKES))
def test_each_mistake_is_one_line_with_path_value_and_expectation(case):
    data, path, shown, expected = MISTAKES[case]
    line = _one_error(data)
    assert f": {path}: " in line, line
    if shown is not None:
        assert shown in line, line
    assert expected in line, line


def test_kafka_section_merges_with_the_defaults():
    # issue 10.1: a section naming only the brokers used to drop group.id (run crashed)
    cfg = parse_config({**BASE, "kafka": {"bootstrap.servers": "broker:9093"}})
    assert cfg.kafka["bootstrap.servers"] == "broker:9093"
    assert cfg.kafka["group.id"] == "stream-monitor"
    assert cfg.kafka["auto.offset.reset"] == "latest"
    cfg = parse_config({**BASE, "kafka": {"group.id": "g", "auto.offset.reset": "earliest"}})
    assert (cfg.kafka["group.id"], cfg.kafka["auto.offset.reset"]) == ("g", "earliest")
    assert cfg.kafka["bootstrap.servers"] == "localhost:9092"


def test_structural_and_method_mistakes_are_reported_in_one_pass():
    # issue 10.8: a bad method used to be reported only once everything else was fixed
    data = {"models": {"m": {"reference": "x", "numeric": _rule("foo")}},
            "http": {"port": "abc"}, "defaults": {"categorical": _rule("ks")}}
    lines = _errors(data)
    assert len(lines) == 3, lines
    for path in ("http.port", "models.m.numeric.method", "defaults.categorical.method"):
        assert sum(f": {path}: " in ln for ln in lines) == 1, lines


def test_every_mistake_gets_its_own_line():
    data = {"models": {"m": {"reference": "x"}}, "http": {"port": "abc"},
            "defaults": {"significance": 5, "window": {"evnts": 1}}}
    lines = _errors(data)
    assert len(lines) == 3, lines
    joined = "\n".join(lines)
    for path in ("http.port", "defaults.significance", "defaults.window.evnts"):
        assert sum(f": {path}: " in ln for ln in lines) == 1, joined


@pytest.mark.parametrize("doc", [[1, 2], "models", None, 3])
def test_non_mapping_document_is_one_line(doc):
    line = _one_error(doc)
    assert "<top>" in line and "mapping" in line


def test_yaml_syntax_error_reports_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("models:\n  m:\n    reference: a: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.lines
    assert str(path) in line and "line 3" in line and "invalid YAML" in line
    assert "\n" not in line


def test_empty_yaml_file_is_a_non_mapping_document(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.lines
    assert str(path) in line and "mapping" in line


def test_unreadable_config_file_is_one_line(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    (line,) = info.value.lines
    assert "nope.yaml" in line and "cannot read" in line


# -- overrides ------------------------------------------------------------------------


OVERRIDES = {
    "defaults": {
        "window": {"seconds": 60, "allowed_lateness": 5},
        "numeric": _rule("ks", 0.1, 0.2),
    },
    "models": {
        "a": {
            "reference": "a.json",
            "window": {"events": 500},
            "min_events": 50,
            "categorical": _rule("jensen_shannon", 0.2, 0.4),
            "alerting": {"fire_after": 2},
            "features": {
                "age": {"drift": _rule("ks", 0.5, 1.0)},
                "zip": {"kind": "categorical"},
                "code": {"kind": "categorical", "drift": _rule("psi", 0.3, 0.6)},
                "notes": {"data_quality": {"missing": {"warning": 0.5, "critical": 0.9}}},
            },
        },
        "b": {"baseline": {"events": 1000}},
    },
}


def test_model_and_feature_overrides_resolve_over_defaults():
    cfg = parse_config(OVERRIDES)
    a, b = model_settings(cfg, "a"), model_settings(cfg, "b")
    assert (a.window.events, a.window.seconds) == (500, None)
    assert (b.window.seconds, b.window.allowed_lateness, b.window.events) == (60, 5, None)
    assert (a.min_events, b.min_events) == (50, 200)
    assert (a.alerting.fire_after, b.alerting.fire_after) == (2, 1)
    assert a.numeric.method == b.numeric.method == "ks"           # from defaults
    assert (a.categorical.method, b.categorical.method) == ("jensen_shannon", "psi")

    age = a.feature("age", "numeric")
    assert (age.drift.method, age.drift.warning, age.drift.critical) == ("ks", 0.5, 1.0)
    other = a.feature("income", "numeric")
    assert (other.kind, other.drift.method, other.drift.warning) == ("numeric", "ks", 0.1)
    zipf = a.feature("zip", "numeric")                            # kind overridden
    assert zipf.kind == "categorical" and zipf.drift.method == "jensen_shannon"
    code = a.feature("code", "numeric")
    assert code.kind == "categorical" and (code.drift.method, code.drift.critical) == ("psi", 0.6)
    notes = a.feature("notes", "categorical")
    assert (notes.data_quality.missing.warning, notes.data_quality.missing.critical) == (0.5, 0.9)
    assert a.feature("age", "numeric").data_quality.missing.warning == 0.05
    # the same feature name in another model is not affected
    assert b.feature("age", "numeric").drift.method == "ks"


def test_partial_model_alerting_override_keeps_user_defaults():
    cfg = parse_config({"defaults": {"alerting": {"resolve_after": 5}},
                        "models": {"m": {"reference": "x", "alerting": {"fire_after": 2}}}})
    s = model_settings(cfg, "m")
    assert s.alerting.fire_after == 2
    assert s.alerting.resolve_after == 5  # actual: 3 (built-in default)


def test_partial_model_data_quality_override_keeps_user_defaults():
    cfg = parse_config({
        "defaults": {"data_quality": {"out_of_range": {"warning": 0.2, "critical": 0.4}}},
        "models": {"m": {"reference": "x",
                         "data_quality": {"missing": {"warning": 0.3, "critical": 0.6}}}}})
    dq = model_settings(cfg, "m").data_quality
    assert dq.missing.warning == 0.3
    assert dq.out_of_range.warning == 0.2  # actual: 0.02 (built-in default)


@pytest.mark.parametrize(("value", "expected"), [
    ("events", ["events"]),
    (["a", "b"], ["a", "b"]),
])
def test_inferences_topic_accepts_string_or_list(value, expected):
    cfg = parse_config({**BASE, "topics": {"inferences": value}})
    assert cfg.topics.inferences == expected


def test_inferences_topic_of_wrong_type_is_an_error():
    line = _one_error({**BASE, "topics": {"inferences": 5}})
    assert "topics.inferences" in line


def test_inferences_topic_list_must_not_be_empty():
    line = _one_error({**BASE, "topics": {"inferences": []}})
    assert "topics.inferences" in line


# -- check-config CLI -----------------------------------------------------------------


def _write_reference(path: Path) -> Path:
    builder = ReferenceBuilder("m", parse_config(BASE).defaults.profile)
    for i in range(60):
        builder.add({"age": 20 + i % 40, "income": 1000.0 + 13 * i,
                     "plan": ("basic", "premium", "student")[i % 3]}, prediction=i / 60)
    builder.build(source="test").save(path)
    return path


@pytest.fixture
def ref_dir(tmp_path: Path) -> Path:
    _write_reference(tmp_path / "m.json")
    return tmp_path


def _check(path: Path, capsys) -> tuple[int, str, list[str]]:
    code = main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip()]


def _config(directory: Path, text: str) -> Path:
    path = directory / "monitor.yaml"
    path.write_text(text)
    return path


def test_check_config_accepts_good_file_with_reference_relative_to_it(
        ref_dir: Path, tmp_path_factory, monkeypatch, capsys):
    cfg = _config(ref_dir, "models:\n  m:\n    reference: m.json\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    code, out, err = _check(cfg, capsys)
    assert (code, err) == (0, [])
    assert "ok" in out and "m" in out


def test_check_config_bad_file_exits_2_with_one_line(ref_dir: Path, capsys):
    cfg = _config(ref_dir, "models:\n  m:\n    reference: m.json\nhttp:\n  port: abc\n")
    code, out, err = _check(cfg, capsys)
    assert code == 2 and out == ""
    assert len(err) == 1, err
    assert str(cfg) in err[0] and "http.port" in err[0] and "'abc'" in err[0]


def test_check_config_yaml_syntax_error_exits_2(ref_dir: Path, capsys):
    cfg = _config(ref_dir, "models:\n  m:\n    reference: m.json\n  - oops\n")
    code, _, err = _check(cfg, capsys)
    assert code == 2 and len(err) == 1 and "line 4" in err[0]


def _bad_reference(directory: Path, name: str, content: bytes | None) -> Path:
    if content is not None:
        (directory / name).write_bytes(content)
    return _config(directory, f"models:\n  m:\n    reference: {name}\n")


@pytest.mark.parametrize(("content", "expected"), [
    (None, "cannot read reference"),
    (b'{"schema_version": 1, "features": {', "not valid JSON"),
    (b'{"schema_version": 99, "model": "m", "features": {}}', "schema_version 99"),
    (b'{"model": "m", "features": {}}', "schema_version None"),
    (b'{"schema_version": 1, "features": {"a": {"kind": "numeric", "edges": [1, 2],'
     b' "counts": [1]}}}', "malformed profile"),
    (b'[1, 2]', "expected a JSON object"),
], ids=["missing", "bad-json", "schema-99", "no-schema-version", "bad-profile", "not-object"])
def test_check_config_bad_reference_exits_2_with_one_line(tmp_path: Path, capsys, content,
                                                          expected):
    cfg = _bad_reference(tmp_path, "ref.json", content)
    code, _, err = _check(cfg, capsys)
    assert code == 2
    assert len(err) == 1, err
    assert "models.m.reference" in err[0] and "ref.json" in err[0] and expected in err[0]


def test_check_config_override_of_unknown_feature_exits_2(ref_dir: Path, capsys):
    cfg = _config(ref_dir, "models:\n  m:\n    reference: m.json\n"
                           "    features:\n      agee: {ignore: true}\n")
    code, _, err = _check(cfg, capsys)
    assert code == 2 and len(err) == 1, err
    assert "models.m.features.agee" in err[0] and "not a feature" in err[0]
    assert "age" in err[0].split("not a feature", 1)[1]  # names the known features


@pytest.mark.parametrize("content", [
    b'{"schema_version": 1, "features": []}',
    b'{"schema_version": 1, "features": {"a": 5}}',
], ids=["features-list", "profile-int"])
def test_check_config_structurally_malformed_reference_exits_2(tmp_path: Path, capsys, content):
    cfg = _bad_reference(tmp_path, "ref.json", content)
    code, _, err = _check(cfg, capsys)
    assert code == 2 and len(err) == 1 and "models.m.reference" in err[0]


@pytest.mark.parametrize(("feature", "kind"), [("age", "categorical"), ("plan", "numeric")])
def test_check_config_kind_override_contradicting_reference_exits_2(ref_dir: Path, capsys,
                                                                     feature, kind):
    cfg = _config(ref_dir, "models:\n  m:\n    reference: m.json\n"
                           f"    features:\n      {feature}: {{kind: {kind}}}\n")
    code, _, err = _check(cfg, capsys)
    assert code == 2 and len(err) == 1 and f"models.m.features.{feature}" in err[0]


def test_check_config_numeric_method_on_categorical_reference_feature_exits_2(ref_dir: Path,
                                                                             capsys):
    cfg = _config(ref_dir, "models:\n  m:\n    reference: m.json\n    features:\n"
                           "      plan: {drift: {method: ks, warning: 0.1, critical: 0.2}}\n")
    code, _, err = _check(cfg, capsys)
    assert code == 2 and len(err) == 1 and "models.m.features.plan.drift.method" in err[0]


def test_reference_written_by_builder_is_valid_json_with_schema_version(ref_dir: Path):
    data = orjson.loads((ref_dir / "m.json").read_bytes())
    assert data["schema_version"] == 2
    assert {k: v["kind"] for k, v in data["features"].items()} == {
        "age": "numeric", "income": "numeric", "plan": "categorical"}
