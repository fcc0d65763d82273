"""The command line as a first-time user meets it: one line and exit 2 for every mistake,
every config mistake in one pass, help text and defaults, --version (issue 10)."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stream_monitor import __version__
from stream_monitor.cli import build_parser, main
from stream_monitor.config import ProfileConfig
from stream_monitor.core.reference import ReferenceBuilder


@pytest.fixture(scope="module")
def busy_port():
    """A port some other program listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _reference(path: Path, model: str = "churn", features: int = 3) -> Path:
    builder = ReferenceBuilder(model, ProfileConfig())
    for i in range(60):
        row = {f"x{j:02d}": float(i * (j + 1) % 17) for j in range(features - 1)}
        row["plan"] = ("basic", "premium", "student")[i % 3]
        builder.add(row, prediction=i / 60)
    builder.build(source="test").save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, busy_port) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    _reference(d / "churn.json")
    (d / "events.jsonl").write_text('{"model": "churn", "features": {"x00": 1}}\n')
    (d / "good.yaml").write_text("models:\n  churn:\n    reference: churn.json\n")
    (d / "bad.yaml").write_text("models:\n  churn:\n    reference: churn.json\n"
                                "http: {port: abc}\n")
    (d / "typo.yaml").write_text("kafka: {bootstrap.server: localhost:9092}\n"
                                 "models:\n  churn:\n    reference: churn.json\n")
    (d / "busy.yaml").write_text(
        "kafka: {bootstrap.servers: '127.0.0.1:1'}\n"
        f"http: {{host: 127.0.0.1, port: {busy_port}}}\n"
        "models:\n  churn:\n    reference: churn.json\n")
    (d / "noref.yaml").write_text("models:\n  churn:\n    reference: gone.json\n")
    (d / "a-file").write_text("not a directory\n")
    return {p.name: p for p in d.iterdir()}


# (command line with {name} placeholders for the files above, what the one line says)
CASES = {
    "run: bad argument": ("run --config {good} --log-level loud", "--log-level"),
    "run: no config given": ("run", "--config"),
    "run: missing config": ("run --config {nope_yaml}", "nope.yaml"),
    "run: bad config": ("run --config {bad}", "http.port"),
    "run: librdkafka property typo": ("run --config {typo}", "kafka.bootstrap.server"),
    "run: busy port": ("run --config {busy}", "http.port"),
    "run: missing reference": ("run --config {noref}", "gone.json"),
    "replay: bad argument": ("replay --config {good} --input {events}", "--out"),
    "replay: missing config": ("replay --config {nope_yaml} --input {events} --out {out}",
                               "nope.yaml"),
    "replay: bad config": ("replay --config {bad} --input {events} --out {out}",
                           "http.port"),
    "replay: missing input": ("replay --config {good} --input {nope_jsonl} --out {out}",
                              "nope.jsonl"),
    "replay: output is a file": ("replay --config {good} --input {events} "
                                 "--out {afile}", "a-file"),
    "reference build: bad argument": ("reference build --model churn --input {events} "
                                      "--out {out}/r.json --bins many", "--bins"),
    "reference build: bad config": ("reference build --config {bad} --model churn "
                                    "--input {events} --out {out}/r.json", "http.port"),
    "reference build: missing config": ("reference build --config {nope_yaml} --model churn "
                                        "--input {events} --out {out}/r.json", "nope.yaml"),
    "reference build: missing input": ("reference build --model churn --input {nope_jsonl} "
                                       "--out {out}/r.json", "nope.jsonl"),
    "check-config: bad argument": ("check-config", "config"),
    "check-config: missing file": ("check-config {nope_yaml}", "nope.yaml"),
    "check-config: bad config": ("check-config {bad}", "http.port"),
    "check-config: librdkafka property typo": ("check-config {typo}",
                                               "kafka.bootstrap.server"),
    "demo: bad argument": ("demo --rate 0", "--rate"),
    "demo: not a number": ("demo --duration soon", "--duration"),
    "demo: busy port": ("demo --port {port}", "--port"),
    "diagnose: missing file": ("diagnose {nope}", "nope"),
    "diagnose: not a window file": ("diagnose {events}", "events.jsonl:1"),
    "broker: busy port": ("broker --port {port}", "port"),
    "broker: missing feed file": ("broker --port 0 --feed {nope_jsonl}", "nope.jsonl"),
    "unknown command": ("monitor", "invalid choice"),
}


# A busy port is tried by a real process (sockets, logging set-up, a child broker); the
# other cases run `main` in-process (the same code, without paying an interpreter start).
SUBPROCESS = ("busy port", "missing reference")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_user_error_is_one_line_and_exit_2(case, files, busy_port, tmp_path, capsys,
                                           monkeypatch):
    line, expected = CASES[case]
    names = {"good": files["good.yaml"], "bad": files["bad.yaml"], "typo": files["typo.yaml"],
             "busy": files["busy.yaml"], "events": files["events.jsonl"],
             "noref": files["noref.yaml"],
             "afile": files["a-file"], "nope_yaml": tmp_path / "nope.yaml",
             "nope_jsonl": tmp_path / "nope.jsonl", "nope": tmp_path / "nope",
             "out": tmp_path / "out", "port": busy_port}
    argv = [a.format(**names) for a in line.split()]
    if case.endswith(SUBPROCESS):
        proc = subprocess.run([sys.executable, "-m", "stream_monitor", *argv],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
        code, out, err_text = proc.returncode, proc.stdout, proc.stderr
    else:
        monkeypatch.chdir(tmp_path)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err_text = capsys.readouterr()
    err = [ln for ln in err_text.splitlines() if ln.strip()]
    assert code == 2, (code, out, err_text)
    assert "Traceback" not in err_text + out, err_text
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"stream-monitor {__version__}"


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_option_has_help_and_shows_its_default():
    commands = dict(_subparsers(build_parser()))
    assert {"run", "replay", "reference build", "check-config", "demo", "diagnose",
            "broker"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            if action.option_strings and action.default not in (None, False):
                assert "default" in action.help, f"{name} {action.option_strings}"
        assert "default: %(default)s" not in text


# -- check-config: every mistake in one pass, naming the file --------------------------


def test_check_config_reports_every_mistake_in_one_pass(tmp_path: Path, capsys):
    _reference(tmp_path / "fraud.json", model="fraud")
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(
        "kafka: {bootstrap.server: 'b:9092', session.timeout.ms: soon}\n"
        "http: {port: abc}\n"
        "defaults: {numeric: {method: kss, warning: 0.1, critical: 0.2}}\n"
        "models:\n"
        "  churn: {reference: missing.json}\n"
        "  payments: {reference: fraud.json}\n")
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith(f"error: {cfg}: ") for line in err), err
    expect = ["kafka.bootstrap.server", "kafka.session.timeout.ms", "http.port",
              "defaults.numeric.method", "models.churn.reference", "models.payments.reference"]
    for key in expect:
        assert sum(f": {key}: " in line for line in err) == 1, (key, err)
    assert len(err) == len(expect), err
    churn = next(line for line in err if "models.churn.reference" in line)
    assert "missing.json" in churn  # the reference file is named
    payments = next(line for line in err if "models.payments.reference" in line)
    assert "fraud.json" in payments and "'fraud'" in payments and "'payments'" in payments


def test_check_config_on_a_valid_structure_still_reports_everything(tmp_path: Path, capsys):
    _reference(tmp_path / "churn.json", features=30)
    _reference(tmp_path / "fraud.json", model="fraud")
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(
        "kafka: {bootstrap.server: 'b:9092'}\n"
        "models:\n"
        "  churn:\n    reference: churn.json\n    features: {agee: {ignore: true}}\n"
        "  payments: {reference: fraud.json}\n")
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3, err
    assert all(line.startswith(f"error: {cfg}: ") for line in err), err
    agee = next(line for line in err if "models.churn.features.agee" in line)
    # the reference is named, and the list of known features says what was left out
    assert str(tmp_path / "churn.json") in agee
    assert "x00" in agee and "... (10 more)" in agee
    assert any("models.payments.reference" in line and "'fraud'" in line for line in err)
    assert any("kafka.bootstrap.server" in line for line in err)


def test_reference_of_another_model_is_refused_by_replay_too(tmp_path: Path, capsys):
    _reference(tmp_path / "fraud.json", model="fraud")
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text("models:\n  churn: {reference: fraud.json}\n")
    (tmp_path / "e.jsonl").write_text("{}\n")
    assert main(["replay", "--config", str(cfg), "--input", str(tmp_path / "e.jsonl"),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "models.churn.reference" in line and "built for model 'fraud'" in line


def test_check_config_accepts_kafka_section_with_only_the_brokers(tmp_path: Path, capsys):
    _reference(tmp_path / "churn.json")
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text("kafka: {bootstrap.servers: 'broker-1:9093'}\n"
                   "models:\n  churn: {reference: churn.json}\n")
    assert main(["check-config", str(cfg)]) == 0, capsys.readouterr().err


# -- diagnose: the windows that fired, rounded ------------------------------------------


@pytest.fixture(scope="module")
def drift_then_normal(churn_reference_file: Path, tmp_path_factory) -> Path:
    """Windows 0-1 normal, 2-3 drifted (an alert fires at 2), 4-5 normal again."""
    from stream_monitor.io import synthetic
    tmp_path = tmp_path_factory.mktemp("diagnose")
    events = tmp_path / "events.jsonl"
    with events.open("wb") as fh:
        for chunk in synthetic.generate(20_000, seed=51, drift=synthetic.default_drift(10_000)):
            fh.write(b"\n".join(chunk) + b"\n")
        for chunk in synthetic.generate(10_000, seed=52, start_index=20_000):
            fh.write(b"\n".join(chunk) + b"\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models:\n  churn:\n    reference: {churn_reference_file}\n"
                   "defaults: {window: {events: 5000}}\n")
    from stream_monitor.config import load_config
    from stream_monitor.io.replay import replay
    replay(load_config(cfg), events, tmp_path / "out", progress=False)
    return tmp_path / "out"


def test_diagnose_explains_the_window_that_fired_with_rounded_numbers(drift_then_normal, capsys):
    capsys.readouterr()
    assert main(["diagnose", str(drift_then_normal)]) == 0
    out = capsys.readouterr().out
    blocks = [ln for ln in out.splitlines() if ln.startswith("churn: window")]
    # the window that fired (#2), not the latest one (#5, back to normal)
    assert len(blocks) == 1 and blocks[0].startswith("churn: window #2 "), out
    assert "fired: FeatureDrift" in blocks[0] and "lines 10001..15000" in blocks[0]
    assert "root cause: data_drift" in out
    for feature in ("f01", "f04", "f09", "f12", "plan"):
        assert f"  - {feature}: psi " in out, out
    # numbers are rounded to 3 significant digits (no 0.24837261...)
    values = re.findall(r"psi (\S+) \(", out)
    assert values and all(len(v.replace("0.", "").lstrip("0")) <= 4 for v in values), values

    assert main(["diagnose", str(drift_then_normal), "--latest"]) == 0
    latest = capsys.readouterr().out
    assert "churn: window #5 " in latest and "no drift or data-quality finding" in latest
    assert main(["diagnose", str(drift_then_normal / "windows.jsonl"), "--windows", "2:3"]) == 0
    ranged = capsys.readouterr().out
    assert "churn: window #2 " in ranged and "churn: window #3 " in ranged
    assert "window #4" not in ranged


@pytest.mark.parametrize(("args", "expected"), [
    (["--windows", "3:1"], "--windows"), (["--windows", "x"], "--windows"),
    (["--windows", "40:50"], "no window"), (["--model", "fraud"], "--model"),
])
def test_diagnose_bad_selection_is_one_line(drift_then_normal, capsys, args, expected):
    capsys.readouterr()
    assert main(["diagnose", str(drift_then_normal), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and expected in err[0], err
