"""`replay` end to end on generated streams: detection, false alarms, nothing lost."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_monitor.cli import main
from stream_monitor.config import load_config
from stream_monitor.io import synthetic
from stream_monitor.io.replay import replay

DRIFTED = {"f01", "f04", "f09", "f12", "plan"}


def _read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _flagged(report: dict) -> set[str]:
    return {n for n, f in report["features"].items() if f["severity"] != "ok"}


def test_drift_flags_exactly_the_shifted_features_in_first_full_window(
        minimal_config: Path, tmp_path: Path):
    events = synthetic.write_jsonl(tmp_path / "events.jsonl", 500_000, seed=2,
                                   drift=synthetic.default_drift(250_000))
    out = tmp_path / "out"
    assert main(["replay", "--config", str(minimal_config), "--input", str(events),
                 "--out", str(out), "--quiet"]) == 0
    windows = _read(out / "windows.jsonl")
    assert len(windows) == 50
    for w in windows:
        first = w["window"]["first_line"]
        if w["window"]["last_line"] <= 250_000:
            assert _flagged(w) == set(), f"false alarm before the change in {w['window']}"
        else:
            assert first > 250_000  # windows are aligned on 10,000 lines here
            assert _flagged(w) == DRIFTED, w["window"]
        assert all(q["severity"] == "ok" for f in w["features"].values()
                   for q in f["data_quality"].values())
    alerts = _read(out / "alerts.jsonl")
    firing = [a for a in alerts if a["status"] == "firing"]
    # one grouped model-level alert: the sequential detectors raise it (warning) from the
    # first block after the change, the first full window escalates it with a diagnosis
    assert len(firing) == 2
    early, alert = firing
    assert early["fingerprint"] == alert["fingerprint"]
    assert early["method"].startswith("cusum_")
    assert {f["feature"] for f in early["features"]} == DRIFTED
    assert 250_000 < early["window"]["last_line"] <= 253_000
    assert "feature" not in alert["labels"]
    assert {f["feature"] for f in alert["features"]} == DRIFTED
    assert alert["window"]["first_line"] == 250_001
    assert alert["window"]["last_line"] == 260_000
    values = [f["value"] for f in alert["features"]]
    assert values == sorted(values, reverse=True)
    assert alert["diagnosis"]["root_cause"] == "data_drift"
    assert alert["labels"]["alertname"] == "FeatureDrift"
    for key in ("labels", "annotations", "startsAt", "endsAt", "status", "fingerprint",
                "kind", "method", "value", "threshold", "window"):
        assert key in alert


@pytest.mark.slow
def test_one_million_stationary_events_raise_no_alert(minimal_config: Path, tmp_path: Path):
    events = synthetic.write_jsonl(tmp_path / "events.jsonl", 1_000_000, seed=3)
    cfg = load_config(minimal_config)
    summary = replay(cfg, events, tmp_path / "out", progress=False)
    assert summary.counted == 1_000_000
    assert summary.windows == 100
    assert summary.alerts == 0
    assert (tmp_path / "out" / "alerts.jsonl").read_bytes() == b""
    for w in _read(tmp_path / "out" / "windows.jsonl"):
        assert _flagged(w) == set()
        assert w["dataset"]["severity"] == "ok"


def test_malformed_lines_are_kept_with_line_numbers(minimal_config: Path, tmp_path: Path):
    lines = [line for chunk in synthetic.generate(30_000, seed=4) for line in chunk]
    lines[12_344] = b'{"model": "churn", "features": {"f01": '         # truncated JSON
    lines[20_000] = b'["not", "an", "object"]'
    lines[25_000] = lines[25_000].replace(b'"f02":', b'"f02":"oops","x":')  # wrong type
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    out = tmp_path / "out"
    summary = replay(load_config(minimal_config), path, out, progress=False)
    rejects = _read(out / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (12_345, "not_json"), (20_001, "not_object"), (25_001, "wrong_type")]
    assert rejects[0]["raw"] == lines[12_344].decode()
    assert rejects[2]["feature"] == "f02"
    assert summary.lines == 30_000 == summary.counted + len(rejects)
    windows = _read(out / "windows.jsonl")
    assert sum(w["window"]["events"] for w in windows) == summary.counted
    assert windows[-1]["window"]["complete"] is False


def test_time_windows_and_late_events(minimal_config: Path, tmp_path: Path):
    cfg_path = tmp_path / "time.yaml"
    ref = load_config(minimal_config).models["churn"].reference
    cfg_path.write_text(f"defaults:\n  window: {{seconds: 60, allowed_lateness: 5}}\n"
                        f"models:\n  churn:\n    reference: {ref}\n")
    lines = [line for chunk in synthetic.generate(20_000, seed=5, rate=100.0) for line in chunk]
    late = orjson.loads(lines[10])
    lines.append(orjson.dumps(late))  # 10 s of event time into the past of the stream end
    del late["ts"]
    lines.append(orjson.dumps(late))  # no event time at all
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines))
    summary = replay(load_config(cfg_path), path, tmp_path / "out", progress=False)
    windows = _read(tmp_path / "out" / "windows.jsonl")
    # 200 s of events at 100/s from t0 = 1_790_000_000 (20 s into a 60 s bucket):
    # windows [t0-20, t0+40), [+40, +100), [+100, +160) and [+160, +220) flushed at the end
    assert [w["window"]["events"] for w in windows] == [4000, 6000, 6000, 4000]
    assert windows[1]["window"]["start"] == "2026-09-21T14:14:00Z"
    assert summary.rejects["late_event"] == 1 and summary.rejects["bad_timestamp"] == 1
    rejects = _read(tmp_path / "out" / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (20_001, "late_event"), (20_002, "bad_timestamp")]


def test_baseline_from_the_stream(tmp_path: Path):
    cfg_path = tmp_path / "baseline.yaml"
    cfg_path.write_text("models:\n  churn:\n    baseline: {events: 50000}\n")
    events = synthetic.write_jsonl(tmp_path / "events.jsonl", 150_000, seed=6,
                                   drift=synthetic.default_drift(100_000))
    summary = replay(load_config(cfg_path), events, tmp_path / "out", progress=False)
    assert summary.counted == 150_000
    windows = _read(tmp_path / "out" / "windows.jsonl")
    assert [w["window"]["first_line"] for w in windows] == list(range(50_001, 150_001, 10_000))
    assert all(_flagged(w) == set() for w in windows[:5])
    assert all(_flagged(w) == DRIFTED for w in windows[5:])


def test_diagnose_command(minimal_config: Path, tmp_path: Path, capsys):
    drift = synthetic.Drift(at=10_000, missing={"f03": 0.5})
    events = synthetic.write_jsonl(tmp_path / "events.jsonl", 20_000, seed=7, drift=drift)
    replay(load_config(minimal_config), events, tmp_path / "out", progress=False)
    assert main(["diagnose", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "feature_unavailable" in text and "f03" in text


# -- streams unlike the repo's generator ---------------------------------------------------

SHIFTABLE = [f"n{i}" for i in range(8)]


def _foreign_stream(path: Path, n: int, seed: int, shifts: dict[int, list[str]] | None = None
                    ) -> Path:
    """Sparse JSON with heavy tails, integer ties, a zero-inflated and a boolean feature,
    nulls, a 5,000-category Zipf feature, and optional mean shifts (1 sd) of the `n*`
    features from given event numbers on."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, 5001) ** 1.1
    sku = rng.choice(5000, n, p=zipf / zipf.sum())
    cols = {
        "latency": rng.standard_cauchy(n) * 5 + 100,          # Cauchy tails
        "amount": rng.lognormal(3, 1.2, n),
        "visits": rng.poisson(3, n).astype(float),            # integer ties
        "refund": np.where(rng.random(n) < 0.7, 0.0, rng.exponential(20, n)),
        "sparse": rng.normal(10, 2, n),
        "nullable": rng.normal(0, 1, n),
        **{f: rng.normal(0, 1, n) for f in SHIFTABLE},
    }
    for at, feats in (shifts or {}).items():
        for f in feats:
            cols[f][at:] += 1.0
    absent = rng.random(n) < 0.02
    null = rng.random(n) < 0.01
    flag = rng.random(n) < 0.3
    tier = rng.choice(["free", "pro", "team"], n, p=[0.6, 0.3, 0.1])
    with path.open("wb") as fh:
        for i in range(n):
            feats = {k: round(float(v[i]), 6) for k, v in cols.items()}
            feats["visits"] = int(cols["visits"][i])
            if absent[i]:
                del feats["sparse"]                          # the key is omitted
            if null[i]:
                feats["nullable"] = None
            feats["flag"] = bool(flag[i])
            feats["sku"] = f"sku-{sku[i]}"
            feats["tier"] = str(tier[i])
            fh.write(orjson.dumps({"model": "shop", "ts": 1_790_000_000 + i * 0.01,
                                   "features": feats}) + b"\n")
    return path


@pytest.fixture(scope="module")
def foreign_reference(tmp_path_factory) -> Path:
    from stream_monitor.config import ProfileConfig
    from stream_monitor.core.reference import build_reference
    tmp = tmp_path_factory.mktemp("foreign")
    train = _foreign_stream(tmp / "train.jsonl", 60_000, seed=100)
    ref = build_reference(train, "shop", ProfileConfig())
    assert ref.features["sparse"].absent_rate == pytest.approx(0.02, abs=0.003)
    assert ref.features["flag"].kind == "categorical"
    path = tmp / "shop.json"
    ref.save(path)
    return path


def _config(tmp_path: Path, reference: Path, extra: str = "") -> Path:
    path = tmp_path / "shop.yaml"
    path.write_text(f"{extra}models:\n  shop:\n    reference: {reference}\n")
    return path


def test_stationary_sparse_heavy_tailed_stream_raises_no_alert(foreign_reference, tmp_path):
    events = _foreign_stream(tmp_path / "live.jsonl", 100_000, seed=101)
    summary = replay(load_config(_config(tmp_path, foreign_reference)), events,
                     tmp_path / "out", progress=False)
    assert summary.counted == 100_000 and summary.windows == 10
    assert summary.alerts == 0, _read(tmp_path / "out" / "alerts.jsonl")[:3]
    for w in _read(tmp_path / "out" / "windows.jsonl"):
        assert _flagged(w) == set()
        sku = w["features"]["sku"]
        assert sku["scores"]["unseen_share"] < 0.03      # never-seen only, not "other"
        assert sku["stats"]["other"] > 5 * sku["stats"]["unseen"]


def test_stationary_stream_in_500_event_windows_raises_no_data_quality_alert(
        foreign_reference, tmp_path):
    # replay's batches of 10,000 lines span 20 windows: each window counts the faults
    # of its own events (issue 8 item 3)
    events = _foreign_stream(tmp_path / "live.jsonl", 100_000, seed=102)
    cfg = _config(tmp_path, foreign_reference, "defaults:\n  window: {events: 500}\n")
    summary = replay(load_config(cfg), events, tmp_path / "out", progress=False)
    assert summary.windows == 200
    alerts = _read(tmp_path / "out" / "alerts.jsonl")
    assert [a for a in alerts if a["labels"]["alertname"] == "DataQuality"] == []
    for w in _read(tmp_path / "out" / "windows.jsonl"):
        for name, f in w["features"].items():
            assert all(q["severity"] == "ok" for q in f["data_quality"].values()), (name, f)


def test_staggered_drift_updates_the_grouped_alert(foreign_reference, tmp_path):
    # three features shift mid-window at 25,000, two more mid-window at 45,000
    events = _foreign_stream(tmp_path / "live.jsonl", 80_000, seed=103,
                             shifts={25_000: ["n0", "n1", "n2"], 45_000: ["n3", "n4"]})
    replay(load_config(_config(tmp_path, foreign_reference)), events, tmp_path / "out",
           progress=False)
    grouped = [a for a in _read(tmp_path / "out" / "alerts.jsonl")
               if a["kind"] == "feature_drift" and "feature" not in a["labels"]]
    assert grouped and len({a["fingerprint"] for a in grouped}) == 1
    windows = [a["window"]["first_line"] for a in grouped]
    assert len(windows) == len(set(windows))                  # at most one per window
    first = {f["feature"] for f in grouped[0]["features"]}
    assert first == {"n0", "n1", "n2"}
    assert {f["feature"] for f in grouped[-1]["features"]} == {"n0", "n1", "n2", "n3", "n4"}
    assert grouped[-1]["status"] == "firing"
    assert grouped[-1]["window"]["first_line"] <= 50_001      # the first full window after
    assert all(a["annotations"]["features"] for a in grouped)


def _lines_one_by_one(path: Path) -> list[tuple[bytes, int]]:
    """The reference reading: line by line, numbered from 1, blank lines skipped."""
    out = []
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                out.append((line, lineno))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_block_reader_gives_the_lines_and_numbers_of_a_line_by_line_read(tmp_path, seed):
    from stream_monitor.io.replay import _batches
    rng = random.Random(seed)
    pieces = [b'{"a":1}'] * 6 + [b"", b"  ", b"\t", b"x" * 50, b"{}\r", b' {"b": 2} ', b"\r",
                                  b"abc\rdef"]
    path = tmp_path / "in.jsonl"
    for _ in range(100):
        lines = [rng.choice(pieces) for _ in range(rng.randint(0, 80))]
        path.write_bytes(b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b""))
        size, block = rng.randint(1, 7), rng.randint(1, 40)   # lines longer than blocks
        batches = list(_batches(path, size, block))
        assert all(len(lines) == size for lines, _, _ in batches[:-1])
        assert [(line, no) for lines, numbers, _ in batches
                for line, no in zip(lines, numbers, strict=True)] == _lines_one_by_one(path)


def test_replay_starts_without_the_kafka_and_prometheus_runtime(minimal_config, tmp_path):
    import subprocess
    import sys
    events = synthetic.write_jsonl(tmp_path / "in.jsonl", 50, seed=3)
    code = ("import sys; from stream_monitor.cli import main; "
            f"rc = main(['replay', '--quiet', '--config', {str(minimal_config)!r}, "
            f"'--input', {str(events)!r}, '--out', {str(tmp_path / 'out')!r}]); "
            "heavy = sorted(m for m in ('confluent_kafka', 'prometheus_client', 'scipy.stats',"
            " 'stream_monitor.kafka.runtime') if m in sys.modules); "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[-1] == "0 []"
