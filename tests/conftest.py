"""Shared fixtures: synthetic training data and references built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_monitor.config import ProfileConfig
from stream_monitor.core.reference import build_reference
from stream_monitor.io import synthetic


@pytest.fixture(scope="session")
def training_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "train.jsonl"
    return synthetic.write_jsonl(path, 100_000, seed=1, labels=True)


@pytest.fixture(scope="session")
def churn_reference_file(training_file: Path, tmp_path_factory) -> Path:
    ref = build_reference(training_file, "churn", ProfileConfig())
    path = tmp_path_factory.mktemp("ref") / "churn.json"
    ref.save(path)
    return path


@pytest.fixture
def minimal_config(churn_reference_file: Path, tmp_path: Path) -> Path:
    """The smallest complete config: only the model and its reference (PRODUCT.md §4)."""
    path = tmp_path / "config.yaml"
    path.write_text(f"models:\n  churn:\n    reference: {churn_reference_file}\n")
    return path


@pytest.fixture(scope="session")
def kafka_broker():
    """A real Kafka-protocol broker (Tansu) on a free loopback port, for the session."""
    from stream_monitor.kafka.broker import EmbeddedBroker
    broker = EmbeddedBroker()
    broker.start()
    yield broker
    broker.stop()
