"""Shared setup for the benchmarks: a synthetic workload and a monitor for it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from stream_monitor import synthetic
from stream_monitor.config import ProfileConfig, parse_config
from stream_monitor.pipeline import Monitor
from stream_monitor.reference import build_reference


def workload(n: int, seed: int = 2) -> list[bytes]:
    """n JSON inference events: 20 numeric + 5 categorical features, ~650-700 bytes."""
    return [m for chunk in synthetic.generate(n, seed=seed) for m in chunk]


def monitor(window_events: int = 10_000) -> Monitor:
    """A monitor with the default settings and a reference built from 50k training events."""
    tmp = Path(tempfile.mkdtemp(prefix="sm-bench-"))
    train = synthetic.write_jsonl(tmp / "train.jsonl", 50_000, seed=1)
    ref = build_reference(train, "churn", ProfileConfig())
    ref_path = tmp / "churn.json"
    ref.save(ref_path)
    cfg = parse_config({"defaults": {"window": {"events": window_events}},
                        "models": {"churn": {"reference": str(ref_path)}}})
    return Monitor(cfg)
