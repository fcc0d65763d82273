"""Deployment artefacts under deploy/: Prometheus config and rules, Alertmanager config,
Grafana provisioning and dashboard.

Validated with the real tools (promtool, amtool, Alertmanager), never mocked. They come
from the Debian packages `prometheus` and `prometheus-alertmanager`; when missing, these
tests fail (they do not skip) and say to run `.ci/install-system-deps.sh`.
Metric names used anywhere are checked against stream_monitor.metrics.METRIC_NAMES.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from stream_monitor.metrics import METRIC_NAMES

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "stream-monitor.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules" / "stream-monitor.rules.test.yml"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "stream-monitor.json"

INSTALL_HINT = ("run `.ci/install-system-deps.sh` (as root: apt packages prometheus and "
                "prometheus-alertmanager) to install promtool, amtool, prometheus and alertmanager")

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
NON_MONITOR_METRICS = frozenset({"up"})  # Prometheus' own scrape-health series

# Alerts the rules must define, and which of them come in warning + critical flavours.
REQUIRED_ALERTS = {
    "FeatureDrift", "DatasetDrift", "PredictionDrift", "DataQuality", "StreamMonitorDown",
    "StreamMonitorStalled", "StreamMonitorLagging", "StreamMonitorRejectsRising",
    "StreamMonitorNotReady",
}
TWO_SEVERITY_ALERTS = {"FeatureDrift", "DatasetDrift", "PredictionDrift", "DataQuality"}


# ----------------------------------------------------------------------------- helpers

def tool(name: str, *aliases: str) -> str:
    """Path of a system tool; fails (never skips) when it is not installed."""
    for candidate in (name, *aliases):
        path = shutil.which(candidate)
        if path:
            return path
    pytest.fail(f"`{name}` not found on PATH: {INSTALL_HINT}", pytrace=False)


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, (
        f"`{' '.join(cmd)}` exited with {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and",
                       "or", "unless", "offset", "bool", "inf", "nan", "atan2"})


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana variables allowed)."""
    e = _STRING.sub('""', expr)                       # string literals (label values)
    e = re.sub(r"\{[^}]*\}", " ", e)                  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                 # range / subquery selectors
    e = re.sub(r"\$\{[^}]*\}|\$\w+", " ", e)          # Grafana variables
    e = _GROUPING.sub(" ", e)                         # label lists of by/on/group_left...
    e = re.sub(r"\boffset\s+-?[\w.]+", " ", e)        # offset 5m
    names = set()
    for m in _IDENT.finditer(e):
        name, call = m.groups()
        if call or name.lower() in _KEYWORDS:         # functions, aggregations, keywords
            continue
        names.add(name)
    return names


def is_known_metric(name: str) -> bool:
    if name in METRIC_NAMES or name in NON_MONITOR_METRICS:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in METRIC_NAMES and not base.endswith("_total"):
            return True
    return False


def unknown(names) -> list[str]:
    return sorted(n for n in names if not is_known_metric(n))


def load_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict]:
    return [r for r in load_rules() if "alert" in r]


def duration_seconds(text: str | None) -> float:
    if not text:
        return 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", str(text))
    assert "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))   # collapsed rows nest their panels
    return out


def panel_exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def dashboard_exprs() -> list[tuple[str, str]]:
    panels = all_panels(dashboard()["panels"])
    return [(p.get("title", "?"), e) for p in panels for e in panel_exprs(p)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the extractor itself

def test_metric_name_extraction():
    expr = ('sum by (le, instance) (rate(stream_monitor_batch_duration_seconds_bucket{job="x",'
            'le!="+Inf"}[$__rate_interval])) / on (job) group_left(topic) up offset 5m '
            '> bool 0.99e1 and time() - foo_bar:rate5m{model=~"$model"} or vector(0)')
    assert metric_names(expr) == {"stream_monitor_batch_duration_seconds_bucket", "up",
                                  "foo_bar:rate5m"}
    assert unknown({"stream_monitor_batch_duration_seconds_count", "up"}) == []
    assert unknown({"stream_monitor_events_total_count", "stream_monitor_nope"}) == [
        "stream_monitor_events_total_count", "stream_monitor_nope"]


# ----------------------------------------------------------------------------- Prometheus

def test_promtool_check_config():
    # also loads the rule files matched by rule_files (so the glob must not pick up the
    # unit-test file, which is not a rule file)
    proc = run([tool("promtool"), "check", "config", str(PROM_CONFIG)])
    assert "1 rule files found" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_prometheus_config_contents():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "stream-monitor"]
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"][0]["targets"] == ["localhost:9108"]
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["localhost:9093"]
    matched = {p for pattern in cfg["rule_files"] for p in PROM_CONFIG.parent.glob(pattern)}
    assert matched == {RULES}, matched


def test_promtool_check_rules():
    run([tool("promtool"), "check", "rules", str(RULES)])


def test_promtool_test_rules():
    run([tool("promtool"), "test", "rules", str(RULES_TEST)], timeout=120)


def test_rules_have_severity_summary_description():
    rules = alert_rules()
    assert rules
    for rule in rules:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            assert str(annotations.get(key, "")).strip(), f"{name}: missing annotation {key}"
        assert len(annotations["description"]) > 80, f"{name}: description says too little"


def test_required_alerts_and_severities():
    rules = alert_rules()
    by_name: dict[str, list[dict]] = {}
    for rule in rules:
        by_name.setdefault(rule["alert"], []).append(rule)
    assert REQUIRED_ALERTS <= set(by_name), REQUIRED_ALERTS - set(by_name)
    for name in TWO_SEVERITY_ALERTS:
        severities = sorted(r["labels"]["severity"] for r in by_name[name])
        assert severities == ["critical", "warning"], (name, severities)
        for r in by_name[name]:
            # the monitor applies hysteresis itself; Prometheus must not add a long delay
            assert duration_seconds(r.get("for")) <= 60, (name, r.get("for"))
    assert by_name["StreamMonitorDown"][0]["labels"]["severity"] == "critical"
    assert 'up{job="stream-monitor"} == 0' in by_name["StreamMonitorDown"][0]["expr"]
    assert duration_seconds(by_name["StreamMonitorDown"][0]["for"]) == 120
    assert duration_seconds(by_name["StreamMonitorNotReady"][0]["for"]) == 300
    assert duration_seconds(by_name["StreamMonitorLagging"][0]["for"]) == 600
    assert by_name["StreamMonitorLagging"][0]["labels"]["severity"] == "warning"
    assert by_name["StreamMonitorRejectsRising"][0]["labels"]["severity"] == "warning"


def test_rules_use_only_exported_metrics():
    for rule in load_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule.get('alert') or rule.get('record')}: selects no metric?"
        assert unknown(names) == [], (rule.get("alert"), unknown(names))
    # anything that looks like one of ours, anywhere (annotation queries, comments, tests)
    for path in (RULES, RULES_TEST):
        mentioned = set(re.findall(r"\bstream_monitor_[a-z0-9_]+", path.read_text()))
        assert mentioned and unknown(mentioned) == [], (path.name, unknown(mentioned))
    series = [s["series"] for t in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for s in t["input_series"]]
    assert unknown({s.split("{")[0] for s in series}) == []


def test_rule_unit_tests_cover_every_alert():
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:
                assert alert.get("exp_annotations"), (case["alertname"], "no expected annotations")
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), f"alerts never tested firing: {names - firing}"
    assert names - quiet == set(), f"alerts never tested not firing: {names - quiet}"
    for name in TWO_SEVERITY_ALERTS:   # both flavours tested
        sev = {a["exp_labels"]["severity"] for t in tests for c in t.get("alert_rule_test", [])
               if c["alertname"] == name for a in c.get("exp_alerts") or []}
        assert sev == {"warning", "critical"}, (name, sev)


# ----------------------------------------------------------------------------- Alertmanager

def test_amtool_check_config():
    run([tool("amtool"), "check-config", str(AM_CONFIG)])


@pytest.mark.parametrize("labels, receiver", [
    (["alertname=FeatureDrift", "severity=critical", "model=churn", "feature=age"], "pager"),
    (["alertname=DataQuality", "severity=warning", "model=churn"], "ml-team"),
    (["alertname=StreamMonitorDown", "severity=critical"], "pager"),
    (["alertname=Unknown"], "ml-team"),
])
def test_alertmanager_routing(labels, receiver):
    run([tool("amtool"), "config", "routes", "test", f"--config.file={AM_CONFIG}",
         f"--verify.receivers={receiver}", *labels])


def test_alertmanager_config_contents():
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    assert cfg["route"]["group_by"] == ["alertname", "model"]
    assert {r["name"] for r in cfg["receivers"]} == {"pager", "ml-team"}
    urls = [w["url"] for r in cfg["receivers"] for w in r.get("webhook_configs", [])]
    assert urls and all(u.startswith("http://127.0.0.1:5001/") for u in urls)
    assert ["alertname", "model", "feature"] in [r["equal"] for r in cfg["inhibit_rules"]]


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory):
    """A real Alertmanager with deploy/alertmanager/alertmanager.yml on a free port."""
    binary = tool("alertmanager", "prometheus-alertmanager")
    port = free_port()
    data = tmp_path_factory.mktemp("alertmanager")
    log = open(data / "log", "w+")
    proc = subprocess.Popen(
        [binary, f"--config.file={AM_CONFIG}", f"--storage.path={data}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"alertmanager did not start:\n{log.read()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_alertmanager_inhibition(alertmanager):
    """What `equal` does with absent labels, checked on the real thing: a label absent on
    both sides counts as equal (model-level critical silences model-level warning), absent
    vs present does not."""
    base = {"job": "stream-monitor", "instance": "a:9108"}

    def alert(alertname, severity, **labels):
        return {"alertname": alertname, "severity": severity, **labels}

    fd = "FeatureDrift"

    cases = {  # name -> (labels, inhibited?)
        "feature critical": (alert(fd, "critical", model="churn", feature="age"), False),
        "same feature warning": (alert(fd, "warning", model="churn", feature="age"), True),
        "other feature warning":
            (alert(fd, "warning", model="churn", feature="plan"), False),
        "other model warning": (alert(fd, "warning", model="fraud", feature="age"), False),
        "model critical": (alert("DatasetDrift", "critical", model="churn"), False),
        # absent `feature` on both sides counts as equal
        "model warning, no feature": (alert("DatasetDrift", "warning", model="churn"), True),
        # absent on the critical, present on the warning: not equal
        "model warning with feature":
            (alert("DatasetDrift", "warning", model="churn", feature="age"), False),
        "other alertname": (alert("PredictionDrift", "warning", model="churn"), False),
        "down": (alert("StreamMonitorDown", "critical", instance="b:9108"), False),
        "down instance model alert": (alert("DataQuality", "warning", model="churn", feature="age",
                                            check="missing", instance="b:9108"), True),
        "lagging (no instance)":
            (alert("StreamMonitorLagging", "warning", topic="inferences", instance=None), False),
    }
    alerts = []
    for labels, _ in cases.values():
        merged = {k: v for k, v in {**base, **labels}.items() if v is not None}
        alerts.append({"labels": merged, "annotations": {"summary": "test", "description": "test"}})
    req = urllib.request.Request(f"{alertmanager}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200

    def key(labels):
        return tuple(sorted((k, v) for k, v in {**base, **labels}.items() if v is not None))

    want = {key(labels): inhibited for labels, inhibited in cases.values()}
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(f"{alertmanager}/api/v2/alerts", timeout=5) as r:
            got = {tuple(sorted(a["labels"].items())): bool(a["status"]["inhibitedBy"])
                   for a in json.load(r)}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    names = {key(labels): name for name, (labels, _) in cases.items()}
    wrong = {names.get(k, k): got.get(k) for k in set(want) | set(got) if got.get(k) != want.get(k)}
    assert not wrong, f"inhibited? got != expected for: {wrong}"


# ----------------------------------------------------------------------------- Grafana

def test_dashboard_is_valid_and_unique():
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    panels = all_panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        if p["type"] != "row":
            assert panel_exprs(p), f"panel {p['title']!r} has no query"
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_uses_only_exported_metrics():
    exprs = dashboard_exprs()
    assert exprs
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: {expr!r} selects no metric?"
        assert unknown(names) == [], f"panel {title!r}: unknown {unknown(names)} in {expr!r}"
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            names = set(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", query))
            assert names and unknown(names) == [], (var["name"], query)


def test_dashboard_queries_parse(tmp_path):
    """Every panel query is valid PromQL (variables substituted), via promtool."""
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for i, (_title, expr) in enumerate(dashboard_exprs()):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)   # $model, $feature: regex matchers
        rules.append({"record": f"dashboard:query:{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([tool("promtool"), "check", "rules", str(path)])


REQUIRED_PANELS = {
    # topic: (panel types or None for any, regex on the panel's queries, must follow $model)
    "throughput per model": (None, r"by \(model\) \(rate\(stream_monitor_events_total\b", True),
    "rejects by reason":
        (None, r"by \([^)]*reason[^)]*\) \(rate\(stream_monitor_rejects_total", False),
    "drifted-feature share": (None, r"stream_monitor_drifted_features_ratio\b", True),
    "feature drift score heatmap":
        ({"heatmap", "status-history"}, r"stream_monitor_feature_drift_score\b", True),
    "data quality ratios": (None, r"stream_monitor_data_quality_ratio\b", True),
    "consumer lag": (None, r"stream_monitor_consumer_lag_messages\b", False),
    "batch duration p99":
        (None, r"histogram_quantile\(0\.99, .*stream_monitor_batch_duration_seconds_bucket", False),
    "event lag": (None, r"stream_monitor_event_lag_seconds\b", True),
}


@pytest.mark.parametrize("topic", sorted(REQUIRED_PANELS))
def test_dashboard_has_required_panel(topic):
    types, pattern, per_model = REQUIRED_PANELS[topic]
    matches = [p for p in all_panels(dashboard()["panels"])
               if (types is None or p["type"] in types)
               and any(re.search(pattern, e) for e in panel_exprs(p))]
    assert matches, f"no panel for {topic}"
    if per_model:
        assert any('model=~"$model"' in e for p in matches for e in panel_exprs(p)), \
            f"{topic}: panel does not follow the $model variable"


def test_dashboard_model_variable():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query" and model["multi"] and model["includeAll"]
    assert "label_values(stream_monitor_events_total, model)" in json.dumps(model["query"])


def test_grafana_provisioning():
    provisioning = GRAFANA / "provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "stream-monitor.yml").read_text())
    assert provider["apiVersion"] == 1
    (p,) = provider["providers"]
    assert p["type"] == "file" and p["options"]["path"]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (ds,) = sources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")
    assert ds["isDefault"] is True   # the dashboard's datasource variable defaults to it
