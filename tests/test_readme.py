"""What the README tells a first-time user, checked: the `run` walkthrough with a local
broker, the deploy configs working unchanged against a local monitor, and the alert
example (issue 10.11)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import yaml
from helpers import wait_until

from stream_monitor.alerting.policy import fingerprint
from stream_monitor.config import HttpConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 3)
    return README[start:end if end != -1 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_alert_example_fingerprint_is_that_of_the_alert_shown():
    text = _section("Event formats")
    example = orjson.loads(_blocks(text[text.index("**Alert event**"):], "json")[0])
    labels = example["labels"]
    assert "feature" in labels  # a per-feature alert ...
    assert example["fingerprint"] == fingerprint(labels["model"], labels["feature"],
                                                 example["kind"])
    # ... and the grouped alert's fingerprint, which the example used to show, is named apart
    grouped = fingerprint(labels["model"], None, example["kind"])
    assert grouped != example["fingerprint"] and grouped in text


def test_deploy_configs_point_at_a_local_monitor_with_default_ports():
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    scrape = next(j for j in prom["scrape_configs"] if j["job_name"] == "stream-monitor")
    targets = [t for sc in scrape["static_configs"] for t in sc["targets"]]
    assert targets == [f"localhost:{HttpConfig().port}"]  # what `run` serves by default
    am = [t for a in prom["alerting"]["alertmanagers"] for sc in a["static_configs"]
          for t in sc["targets"]]
    assert am == ["localhost:9093"]  # Alertmanager's own default listen port
    text = _section("Try `run` locally")
    assert f"localhost:{HttpConfig().port}" in text and "localhost:9093" in text
    assert "deploy/prometheus/prometheus.yml" in text
    assert "deploy/alertmanager/alertmanager.yml" in text


class _Proc:
    def __init__(self, argv: list[str], cwd: Path):
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                       daemon=True)
        self.reader.start()

    def text(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        finally:
            self.reader.join(5)


@pytest.mark.slow
@pytest.mark.integration
def test_try_run_locally_walkthrough(tmp_path):
    """The README's commands, in order, with two changes for a shared test machine: smaller
    sample files, and free ports instead of 9092/9108 (the config then names them)."""
    (block,) = _blocks(_section("Try `run` locally"), "bash")[:1]
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]
    assert [c[1] for c in commands] == ["sample", "reference", "broker", "check-config", "run"]
    cli = [sys.executable, "-m", "stream_monitor"]
    sample, build, broker_cmd, check, run_cmd = ([*cli, *c[1:]] for c in commands)
    subprocess.run(sample + ["--train", "20000", "--events", "40000", "--drift-at", "20000"],
                   cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(build, cwd=tmp_path, check=True, capture_output=True)
    broker = _Proc(broker_cmd + ["--port", "0", "--rate", "10000"], tmp_path)
    run = None
    try:
        wait_until(lambda: "Kafka broker" in broker.text(), 60, "the broker's address",
                   broker.text)
        address = re.search(r"at (127\.0\.0\.1:\d+)", broker.text()).group(1)
        config = tmp_path / "samples" / "config.yaml"
        config.write_text(config.read_text() + f"kafka: {{bootstrap.servers: '{address}'}}\n"
                          "http: {host: 127.0.0.1, port: 0}\n")
        checked = subprocess.run(check, cwd=tmp_path, capture_output=True, text=True)
        assert checked.returncode == 0 and "ok" in checked.stdout, checked.stderr
        run = _Proc(run_cmd, tmp_path)
        # both: a sequential detector can alert before the first window closes
        wait_until(lambda: "alert firing" in run.text() and "window closed" in run.text(), 90,
                   "an alert and a window from the fed stream",
                   lambda: run.text() + broker.text())
    finally:
        if run is not None:
            assert run.stop() == 0, run.text()
        assert broker.stop() == 0, broker.text()
    assert "window closed: model=churn" in run.text()
    assert "FeatureDrift model=churn" in run.text()
    assert "broker stopped" in broker.text()
