"""Deployment artefacts under deploy/: Prometheus config and rules, Alertmanager config,
Grafana provisioning and dashboard.

Validated with the real tools (promtool, amtool, Alertmanager), never mocked. They come
from the Debian packages `prometheus` and `prometheus-alertmanager`; when missing, these
tests fail (they do not skip) and say to run `.ci/install-system-deps.sh`.
Metric names used anywhere are checked against stream_monitor.io.metrics.METRIC_NAMES.
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

from stream_monitor.io.metrics import METRIC_NAMES

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


# ============================================================================ shipping it
# The container image, the top-level compose stack and the Kubernetes manifests (issue 14).
# No container engine runs here or in CI: each artefact is checked with a validator that
# carries its own schema (the Compose specification's JSON schema and Debian's
# `docker-compose config`; `kubectl kustomize`, the Kubernetes schemas bundled in the PyPI
# package kubernetes-validate and prometheus-operator's CRD schemas), and everything the
# artefacts point at (mounted files, configs, rules, ports, probes) is checked for real.

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "kubernetes"
K8S_OVERLAYS = [K8S / "base", K8S / "overlays" / "example"]
SCHEMAS = REPO / "tests" / "schemas"
README = REPO / "README.md"

METRICS_PORT = 9108          # the documented default of http.port
CONFIG_PATH = "/etc/stream-monitor/config.yaml"
K8S_VERSIONS = ("1.27.0", "1.33.0")   # an old and a recent Kubernetes API

DEPLOY_HINT = ("run `.ci/install-system-deps.sh` (Debian packages docker-compose and, when "
               "kubectl is missing, kubernetes-client)")


def deploy_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"`{name}` not found on PATH: {DEPLOY_HINT}", pytrace=False)
    return path


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts (short syntax)."""
    out = []
    for vol in service.get("volumes", []):
        source, target = vol.split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((REPO / source).resolve(), target))
    return out


def container_tree(service: dict, root: Path) -> Path:
    """The service's bind mounts copied into `root` at their container paths, so that the
    real tools can read the configs exactly as the container sees them."""
    for source, target in bind_mounts(service):
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copy(source, dest)
    return root


def check_config(path: Path) -> subprocess.CompletedProcess:
    exe = REPO / ".venv" / "bin" / "stream-monitor"
    cmd = [str(exe)] if exe.exists() else [shutil.which("python3") or "python3", "-m",
                                           "stream_monitor"]
    return subprocess.run([*cmd, "check-config", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


# ----------------------------------------------------------------------------- Dockerfile

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) per build stage; continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM" and stages[-1] and any(k == "FROM" for k, _ in stages[-1]):
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def dockerfile_args() -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in dockerfile_stages()[0] if k == "ARG" and "=" in a)


def instructions(stage, keyword) -> list[str]:
    return [rest for k, rest in stage if k == keyword]


def test_dockerfile_multi_stage_pinned_base():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a build stage and a small final one"
    base = dockerfile_args()["PYTHON_IMAGE"]
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    assert m, f"base image not pinned to a patch release of a slim Python: {base}"
    requires = re.search(r'requires-python = ">=(\d+)\.(\d+)"',
                         (REPO / "pyproject.toml").read_text()).groups()
    assert tuple(map(int, m.groups()[:2])) >= tuple(map(int, requires))
    for stage in stages:
        (image,) = instructions(stage, "FROM")
        assert image.split()[0] == "${PYTHON_IMAGE}", image   # every stage on the pinned base


def test_dockerfile_final_stage_small_non_root_no_compilers():
    final = dockerfile_stages()[-1]
    runs = " ".join(instructions(final, "RUN"))
    for word in ("apt-get", "apk", "gcc", "build-essential", "pip install", "pip wheel"):
        assert word not in runs, f"final stage installs something: {word}"
    (copy,) = [c for c in instructions(final, "COPY") if c.startswith("--from=")]
    assert copy.split()[1:] == ["/opt/stream-monitor", "/opt/stream-monitor"]
    (user,) = instructions(final, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot can check it)"
    build_runs = " ".join(instructions(dockerfile_stages()[0], "RUN"))
    assert "--only-binary=:all:" in build_runs, "dependencies from wheels only: no compiler"


def test_dockerfile_entrypoint_port_healthcheck():
    final = dockerfile_stages()[-1]
    (entrypoint,) = instructions(final, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["stream-monitor"]
    scripts = re.search(r"\[project\.scripts\]\n(.*?)\n\n", (REPO / "pyproject.toml").read_text(),
                        re.S).group(1)
    assert 'stream-monitor = "stream_monitor.cli:main"' in scripts
    (cmd,) = instructions(final, "CMD")
    assert json.loads(cmd) == ["run", "--config", CONFIG_PATH]
    assert instructions(final, "EXPOSE") == [str(METRICS_PORT)]
    from stream_monitor.config import HttpConfig
    assert HttpConfig().port == METRICS_PORT
    (health,) = instructions(final, "HEALTHCHECK")
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in health
    probe = json.loads(health[health.index("CMD") + 3:].strip())
    assert probe[:2] == ["python", "-c"]
    # the probe's Python is valid and fails (non-zero) when nothing answers
    port = free_port()
    code = probe[2].replace(str(METRICS_PORT), str(port))
    proc = subprocess.run(["python3", "-c", code], capture_output=True, timeout=30)
    assert proc.returncode != 0 and b"Connection refused" in proc.stderr, proc.stderr


def test_docker_build_context_has_what_the_image_copies():
    """.dockerignore is an allow-list; every COPY source of the build is in it, and it holds
    what pyproject.toml needs to build the package (its readme, the package directory)."""
    lines = [x.strip() for x in DOCKERIGNORE.read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "*", "allow-list: exclude everything, then name what the build needs"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    copied = set()
    for stage in dockerfile_stages():
        for c in instructions(stage, "COPY"):
            if not c.startswith("--from="):
                copied.update(p.rstrip("/").removeprefix("./") for p in c.split()[:-1])
    assert copied and copied <= allowed, copied - allowed
    for path in copied:
        assert (REPO / path).exists(), path
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'readme = "([^"]+)"', pyproject).group(1) in copied
    assert "stream_monitor" in copied


# ----------------------------------------------------------------------------- compose

def test_compose_validates_against_the_compose_spec():
    """The Compose specification's own JSON schema (tests/schemas/compose-spec.json)."""
    import jsonschema
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
              for e in validator.iter_errors(compose())]
    assert not errors, errors
    broken = compose()
    broken["services"]["stream-monitor"]["helthcheck"] = broken["services"]["stream-monitor"].pop(
        "healthcheck")
    assert list(validator.iter_errors(broken)), "the schema validator cannot fail?"


def test_docker_compose_config(tmp_path):
    """Debian's docker-compose client parses and validates the file (no engine needed)."""
    exe = deploy_tool("docker-compose")
    run([exe, "--project-directory", str(REPO), "-f", str(COMPOSE), "config", "--quiet"])
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy",
                                                  "condition: service_healty", 1))
    proc = subprocess.run([exe, "--project-directory", str(REPO), "-f", str(broken), "config",
                           "--quiet"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0, "docker-compose config accepted a broken file"


def test_compose_services():
    svc = services()
    assert set(svc) == {"kafka", "kafka-init", "stream-monitor", "traffic", "webhook-logger",
                        "alertmanager", "prometheus", "grafana"}
    assert svc["kafka"]["image"].startswith("apache/kafka:")   # the official image
    env = svc["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, single node
    for name, s in svc.items():
        image = s.get("image", "")
        assert s.get("build") or re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin {image}"
    assert svc["stream-monitor"]["build"] == "."
    for name in ("stream-monitor", "traffic", "webhook-logger"):
        assert svc[name]["image"] == svc["stream-monitor"]["image"]   # one image, built once


def test_compose_depends_on_and_healthchecks():
    svc = services()
    for name, s in svc.items():
        for dep, cond in s.get("depends_on", {}).items():
            assert dep in svc, f"{name} depends on unknown {dep}"
            condition = cond["condition"]
            if condition == "service_healthy":
                assert not svc[dep].get("healthcheck", {}).get("disable"), (name, dep)
                assert svc[dep].get("healthcheck", {}).get("test"), (name, dep)
            elif condition == "service_completed_successfully":
                assert svc[dep].get("restart") == "no", f"{dep} is one-shot"
    mon = svc["stream-monitor"]
    assert f"http://127.0.0.1:{METRICS_PORT}/readyz" in " ".join(mon["healthcheck"]["test"])
    assert mon["depends_on"] == {"kafka-init": {"condition": "service_completed_successfully"}}
    assert svc["kafka-init"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert svc["traffic"]["depends_on"]["stream-monitor"]["condition"] == "service_healthy"
    assert svc["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_compose_mounted_files_exist_and_volumes_declared():
    doc = compose()
    named = set(doc.get("volumes", {}))
    for name, s in doc["services"].items():
        for vol in s.get("volumes", []):
            source, target = vol.split(":")[:2]
            assert target.startswith("/"), (name, vol)
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: mounts missing {source}"
            else:
                assert source in named, f"{name}: volume {source} not declared"
        if s.get("build"):
            assert (REPO / s["build"] / "Dockerfile").exists()
    # data that should survive a restart lives in named volumes
    assert named == {"kafka-data", "prometheus-data", "alertmanager-data", "grafana-data"}
    kafka_env = doc["services"]["kafka"]["environment"]
    assert f"kafka-data:{kafka_env['KAFKA_LOG_DIRS']}" in doc["services"]["kafka"]["volumes"]


def test_compose_monitor_config_passes_check_config():
    mon = services()["stream-monitor"]
    (source,) = [s for s, t in bind_mounts(mon) if t == CONFIG_PATH]
    assert mon["command"] == ["run", "--config", CONFIG_PATH]
    proc = check_config(source)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok (2 model(s): churn, fraud)" in proc.stdout


def compose_monitor_config():
    from stream_monitor.config import load_config
    return load_config(COMPOSE_DIR / "stream-monitor.yaml")


def created_topics() -> dict[str, int]:
    script = COMPOSE_DIR / "create-topics.sh"
    run(["bash", "-n", str(script)])
    proc = run(["bash", "-c", f'eval "$(sed -n "/^TOPICS=(/,/^)/p" {script})"; '
                              'printf "%s\\n" "${TOPICS[@]}"'])
    topics = {}
    for line in proc.stdout.splitlines():
        name, partitions = line.split()[:2]
        topics[name] = int(partitions)
    return topics


def test_compose_creates_every_topic_the_monitor_uses():
    cfg = compose_monitor_config()
    named = set()
    for value in cfg.topics.model_dump().values():   # every topic field, new ones included
        if isinstance(value, str):
            named.add(value)
        elif isinstance(value, list):
            named.update(value)
    topics = created_topics()
    assert named and named <= set(topics), f"not created by kafka-init: {named - set(topics)}"
    svc = services()
    assert svc["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert svc["kafka-init"]["image"] == svc["kafka"]["image"]
    (script,) = [t for _, t in bind_mounts(svc["kafka-init"])]
    assert svc["kafka-init"]["entrypoint"] == ["/bin/bash", script]
    # the traffic generator writes to the monitor's inference topic on the compose broker
    cmd = svc["traffic"]["command"]
    assert cmd[0] == "generate"
    assert cmd[cmd.index("--topic") + 1] in cfg.topics.inferences
    bootstrap = cfg.kafka["bootstrap.servers"]
    assert cmd[cmd.index("--bootstrap-servers") + 1] == bootstrap == "kafka:9092"
    assert "PLAINTEXT://kafka:9092" in svc["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert cfg.http.port == METRICS_PORT and cfg.http.host == "0.0.0.0"


def differences(a, b, path=""):
    """Paths where two parsed YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}/{i}")]
    return [] if a == b else [(path, a, b)]


def test_compose_prometheus_loads_the_repository_rules(tmp_path):
    """Prometheus as its container sees it: promtool on the mounted layout."""
    prom = services()["prometheus"]
    root = container_tree(prom, tmp_path)
    config = root / "etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    proc = run([tool("promtool"), "check", "config", str(config)])
    assert "1 rule files found" in proc.stdout + proc.stderr
    (rules,) = (root / "etc/prometheus").glob("rules/*.rules.yml")
    assert rules.read_text() == RULES.read_text()
    # the same config as deploy/prometheus, but for the targets (compose service names)
    diff = differences(yaml.safe_load(PROM_CONFIG.read_text()), yaml.safe_load(config.read_text()))
    assert {p for p, _, _ in diff} == {
        "/alerting/alertmanagers/0/static_configs/0/targets/0",
        "/scrape_configs/0/static_configs/0/targets/0"}, diff
    cfg = yaml.safe_load(config.read_text())
    assert cfg["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"stream-monitor:{METRICS_PORT}"]
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"]


def test_compose_alertmanager_routes_to_the_webhook_logger(tmp_path):
    svc = services()
    am = svc["alertmanager"]
    root = container_tree(am, tmp_path)
    config = root / "etc/alertmanager/alertmanager.yml"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in am["command"]
    run([tool("amtool"), "check-config", str(config)])
    diff = differences(yaml.safe_load(AM_CONFIG.read_text()), yaml.safe_load(config.read_text()))
    assert diff and all(p.endswith("/url") for p, _, _ in diff), diff
    logger = svc["webhook-logger"]
    port = logger["command"][logger["command"].index("--port") + 1]
    for _, ours, theirs in diff:
        assert ours.startswith("http://127.0.0.1:5001/")
        assert theirs == ours.replace("127.0.0.1:5001", f"webhook-logger:{port}")
    (script,) = [t for _, t in bind_mounts(logger)]
    assert logger["entrypoint"] == ["python", script]


def test_compose_grafana_provisions_the_dashboard(tmp_path):
    graf = services()["grafana"]
    root = container_tree(graf, tmp_path)
    provisioning = root / "etc/grafana/provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards/stream-monitor.yml").read_text())[
        "providers"]
    dashboards = root / provider["options"]["path"].lstrip("/")
    assert (dashboards / DASHBOARD.name).read_text() == DASHBOARD.read_text()
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (root / home.lstrip("/")).exists()
    compose_ds = provisioning / "datasources/prometheus.yml"
    diff = differences(
        yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text()),
        yaml.safe_load(compose_ds.read_text()))
    assert diff == [("/datasources/0/url", "http://localhost:9090", "http://prometheus:9090")]


def test_webhook_logger_logs_each_alert(tmp_path):
    """The compose stack's webhook receiver, run for real, fed a real Alertmanager
    notification body."""
    port = free_port()
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(["python3", str(COMPOSE_DIR / "webhook_logger.py"), "--host",
                             "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        body = {"version": "4", "status": "firing", "receiver": "pager", "alerts": [
            {"status": "firing", "labels": {"alertname": "FeatureDrift", "severity": "critical",
                                            "model": "churn", "feature": "f01", "job": "x"},
             "annotations": {"summary": "churn: f01 drifted"}},
            {"status": "resolved", "labels": {"alertname": "DatasetDrift", "severity": "warning",
                                              "model": "fraud"}, "annotations": {}}]}
        req = urllib.request.Request(f"{url}/pager", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        bad = urllib.request.Request(f"{url}/pager", data=b"not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=5)
        assert err.value.code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    log.seek(0)
    lines = log.read().splitlines()
    assert any(" /pager firing FeatureDrift severity=critical model=churn feature=f01 job=x | "
               "churn: f01 drifted" in x for x in lines), lines
    assert any(" /pager resolved DatasetDrift severity=warning model=fraud" in x for x in lines)
    assert proc.returncode == 0, "SIGTERM: clean exit (PID 1 in its container)"


@pytest.mark.slow
def test_generate_produces_drifting_traffic(kafka_broker):
    """`stream-monitor generate` (the compose stack's traffic service) against the real
    broker: both models, valid events, and the drift it announces after --drift-after."""
    import numpy as np
    from confluent_kafka import Consumer

    from stream_monitor.io.decode import Decoder  # noqa: F401  (the package imports cleanly)
    topic = f"generate-{free_port()}"
    kafka_broker.create_topics({topic: 1})
    exe = REPO / ".venv" / "bin" / "stream-monitor"
    proc = subprocess.run([str(exe), "generate", "--bootstrap-servers",
                           kafka_broker.bootstrap_servers, "--topic", topic, "--rate", "1000",
                           "--drift-after", "2", "--duration", "4", "--report-every", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "drift starts now" in proc.stderr and "stopped:" in proc.stderr
    consumer = Consumer({"bootstrap.servers": kafka_broker.bootstrap_servers,
                         "group.id": f"g-{topic}", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    events = []
    deadline = time.monotonic() + 30
    produced = int(re.search(r"stopped: (\d+) events produced", proc.stderr).group(1))
    try:
        while len(events) < produced and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 1.0):
                if not msg.error():
                    events.append(json.loads(msg.value()))
    finally:
        consumer.close()
    assert produced >= 2000 and len(events) == produced
    by_model: dict[str, list[dict]] = {}
    for e in events:
        by_model.setdefault(e["model"], []).append(e)
    assert set(by_model) == {"churn", "fraud"}
    for evs in by_model.values():
        evs.sort(key=lambda e: int(e["event_id"].rsplit("-", 1)[1]))
    churn, fraud = by_model["churn"], by_model["fraud"]
    at = int(1000 / 2 * 2)    # per-model rate x drift-after: the first drifted event's index
    f01 = np.array([e["features"]["f01"] for e in churn])
    sd = np.std(f01[:at])
    assert (f01[at:].mean() - f01[:at].mean()) / sd > 0.5          # the covariate shift
    missing = np.array([e["features"]["f07"] is None for e in fraud])
    assert missing[:at].mean() == 0 and missing[at:].mean() > 0.5   # a feature goes missing


# ----------------------------------------------------------------------------- Kubernetes

_BUILDS: dict[Path, list[dict]] = {}


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`: the manifests a user applies (cached per directory)."""
    if directory not in _BUILDS:
        proc = run([deploy_tool("kubectl"), "kustomize", str(directory)], timeout=120)
        _BUILDS[directory] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _BUILDS[directory]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def crd_validator(kind: str):
    import jsonschema
    path = SCHEMAS / f"monitoring.coreos.com_{kind.lower()}s.yaml"
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def validate_k8s(doc: dict) -> list[str]:
    """Errors of one manifest: the Kubernetes API schemas (strict: unknown fields are
    errors) for built-in kinds, prometheus-operator's CRD schemas for its kinds."""
    import kubernetes_validate
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        return [f"{doc['kind']} {'/'.join(map(str, e.path))}: {e.message}"
                for e in crd_validator(doc["kind"]).iter_errors(doc)]
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']} (Kubernetes {version}): {exc.message} at "
                          f"{'/'.join(map(str, exc.path))}")
    return errors


@pytest.mark.parametrize("directory", K8S_OVERLAYS, ids=lambda p: p.name)
def test_kustomize_builds_and_manifests_validate(directory):
    docs = kustomize(directory)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "PrometheusRule", "Service", "ServiceMonitor"]
    errors = [e for d in docs for e in validate_k8s(d)]
    assert not errors, errors


def test_kubernetes_validators_can_fail():
    (deployment,) = of_kind(kustomize(K8S / "base"), "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][1]["livenessprobe"] = {}
    assert validate_k8s(broken), "strict Kubernetes validation accepted an unknown field"
    (rule,) = of_kind(kustomize(K8S / "base"), "PrometheusRule")
    broken = json.loads(json.dumps(rule))
    broken["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    assert validate_k8s(broken), "the PrometheusRule schema accepted a bad duration"


def sidecar(docs: list[dict]) -> tuple[dict, dict]:
    (deployment,) = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "stream-monitor"]
    return pod, container


def test_kubernetes_sidecar_ports_probes_and_resources():
    docs = kustomize(K8S / "overlays" / "example")
    pod, mon = sidecar(docs)
    names = [c["name"] for c in pod["containers"]]
    assert names == ["model-server", "stream-monitor"], "a model server and the sidecar"
    (port,) = mon["ports"]
    assert port == {"name": "metrics", "containerPort": METRICS_PORT}
    assert mon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert mon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert mon["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert mon["args"][:2] == ["run", "--config"]
    for c in (*pod["initContainers"], mon):
        res = c["resources"]
        for what in ("cpu", "memory"):
            assert res["requests"][what] and res["limits"][what], (c["name"], what)
        assert c["securityContext"]["runAsUser"] == 10001   # the image's USER
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mib = {"Mi": 1, "Gi": 1024}
    req = int(mon["resources"]["requests"]["memory"][:-2]) * mib[mon["resources"]["requests"][
        "memory"][-2:]]
    lim = int(mon["resources"]["limits"]["memory"][:-2]) * mib[mon["resources"]["limits"][
        "memory"][-2:]]
    assert 1.25 * MEASURED_RSS_MIB <= req and 2 * MEASURED_RSS_MIB <= lim, "sized from the RSS"
    final = dockerfile_stages()[-1]
    assert instructions(final, "USER") == ["10001:10001"]
    # the Service and ServiceMonitor scrape that port, as the job the alert rules expect
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": METRICS_PORT,
                                         "targetPort": "metrics"}]
    assert service["spec"]["selector"].items() <= pod_labels(docs).items()
    (smon,) = of_kind(docs, "ServiceMonitor")
    assert smon["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = smon["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "stream-monitor"} in endpoint["relabelings"]
    assert 'job="stream-monitor"' in RULES.read_text()


# Peak RSS of `stream-monitor run` measured with the compose config (two models, 2,000
# events/s; benchmarks/memory.py gives the engine's part): README "Deploy". The request
# leaves 25% headroom, the limit twice the measured figure.
MEASURED_RSS_MIB = 181


def pod_labels(docs: list[dict]) -> dict:
    (deployment,) = of_kind(docs, "Deployment")
    return deployment["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("directory", K8S_OVERLAYS, ids=lambda p: p.name)
def test_kubernetes_config_renders_with_the_secret_and_passes_check_config(directory, tmp_path):
    """The ConfigMap's config, rendered by the init container's own script with SASL
    credentials from the Secret's environment, passes `stream-monitor check-config`."""
    docs = kustomize(directory)
    pod, mon = sidecar(docs)
    (configmap,) = of_kind(docs, "ConfigMap")
    (init,) = pod["initContainers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    template_volume = [n for n, v in volumes.items() if "configMap" in v]
    assert [volumes[n]["configMap"]["name"] for n in template_volume] == [
        configmap["metadata"]["name"]]
    rendered_volume = [n for n, v in volumes.items() if "emptyDir" in v and n in mounts]
    assert [volumes[n]["emptyDir"].get("medium") for n in rendered_volume] == ["Memory"]
    # the script, its arguments mapped from the mount paths to temporary directories
    command = init["command"]
    assert command[:2] == ["python", "-c"]
    src, dst = command[3], command[4]
    template_dir, rendered_dir = mounts[template_volume[0]], mounts[rendered_volume[0]]
    assert src == f"{template_dir}/config.yaml" and dst.startswith(rendered_dir + "/")
    (tmp_path / "template").mkdir()
    (tmp_path / "rendered").mkdir()
    (tmp_path / "template" / "config.yaml").write_text(configmap["data"]["config.yaml"])
    out = tmp_path / "rendered" / Path(dst).name
    env = {"PATH": "/usr/bin:/bin", "KAFKA_SASL_USERNAME": "monitor",
           "KAFKA_SASL_PASSWORD": "s3cret: with 'quotes'"}
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"]}
    assert set(secret_refs) == {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"}
    assert {r["name"] for r in secret_refs.values()} == {"stream-monitor-kafka"}
    assert {r["key"] for r in secret_refs.values()} == {"username", "password"}
    python = str(REPO / ".venv" / "bin" / "python")
    proc = subprocess.run([python, "-c", command[2], str(tmp_path / "template" / "config.yaml"),
                           str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import os
    assert os.stat(out).st_mode & 0o777 == 0o600, "credentials readable by the owner only"
    rendered = yaml.safe_load(out.read_text())
    assert rendered["kafka"]["sasl.username"] == "monitor"
    assert rendered["kafka"]["sasl.password"] == env["KAFKA_SASL_PASSWORD"]
    original = yaml.safe_load(configmap["data"]["config.yaml"])
    assert {k: v for k, v in rendered["kafka"].items() if not k.startswith("sasl.u")
            and k != "sasl.password"} == original["kafka"]
    assert "sasl.password" not in configmap["data"]["config.yaml"], "no secret in the ConfigMap"
    proc = check_config(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the sidecar reads what the init container wrote
    assert mon["args"] == ["run", "--config", dst]
    assert {m["mountPath"] for m in mon["volumeMounts"]} == {rendered_dir, "/tmp"}
    cfg = yaml.safe_load(configmap["data"]["config.yaml"])
    assert cfg["http"]["port"] == METRICS_PORT


def test_prometheusrule_holds_exactly_the_tested_rules(tmp_path):
    """The PrometheusRule is generated from the rules file (byte for byte what the script
    writes), holds the same rules after `kubectl kustomize`, and passes the repository's
    `promtool test rules` cases when Prometheus loads its spec."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("render_prometheusrule",
                                                  K8S / "render_prometheusrule.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.RULES == RULES
    committed = render.OUT.read_text()
    assert committed == render.render(RULES.read_text()), (
        "deploy/kubernetes/base/prometheusrule.yaml is stale: run "
        "`python deploy/kubernetes/render_prometheusrule.py`")
    rules_doc = yaml.safe_load(RULES.read_text())
    assert yaml.safe_load(committed)["spec"] == rules_doc
    for directory in K8S_OVERLAYS:
        (rule,) = of_kind(kustomize(directory), "PrometheusRule")
        assert rule["spec"] == rules_doc, directory
    # promtool's unit tests against the rules as the PrometheusRule holds them
    (rule,) = of_kind(kustomize(K8S / "overlays" / "example"), "PrometheusRule")
    (tmp_path / "k8s.rules.yml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    tests = yaml.safe_load(RULES_TEST.read_text())
    tests["rule_files"] = ["k8s.rules.yml"]
    (tmp_path / "k8s.rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = run([tool("promtool"), "test", "rules", str(tmp_path / "k8s.rules.test.yml")],
               timeout=120)
    assert "SUCCESS" in proc.stdout + proc.stderr
    # and a change to the rules would be caught
    assert render.render(RULES.read_text().replace("for: 2m", "for: 3m")) != committed


def test_kubernetes_overlay_settings():
    base, example = (kustomize(d) for d in K8S_OVERLAYS)
    assert all(d["metadata"].get("namespace") == "ml-serving" for d in example)
    (dep,) = of_kind(example, "Deployment")
    assert dep["spec"]["replicas"] == 3
    inferences = yaml.safe_load(of_kind(example, "ConfigMap")[0]["data"]["config.yaml"])
    partitions_note = (K8S / "overlays/example/kustomization.yaml").read_text()
    assert "partition" in partitions_note
    assert inferences["kafka"]["security.protocol"] == "SASL_SSL"
    images = {c["image"] for d in (base, example) for c in
              sidecar(d)[0]["containers"] + sidecar(d)[0]["initContainers"]}
    assert all(":" in i and not i.endswith(":latest") for i in images), images


# ----------------------------------------------------------------------------- README

def readme_deploy() -> str:
    text = README.read_text()
    start = text.index("\n## Deploy\n")
    return text[start:text.index("\n## ", start + 5)]


def test_readme_deploy_section_matches_the_artefacts():
    doc = readme_deploy()
    for needed in ("/metrics", "/healthz", "/readyz", f"`{METRICS_PORT}`", CONFIG_PATH,
                   "10001", "docker compose up --build", "stream-monitor-kafka",
                   "`username`", "`password`", "stream-monitor-config",
                   "python deploy/kubernetes/render_prometheusrule.py",
                   "kubectl apply -k deploy/kubernetes/overlays/example",
                   dockerfile_args()["PYTHON_IMAGE"]):
        assert needed in doc, needed
    svc = services()
    # every published port, with its service, is in the table
    for name, s in svc.items():
        for mapping in s.get("ports", []):
            host, container = mapping.split(":")
            assert host == container or name == "kafka", mapping
            row = next((r for r in doc.splitlines() if r.startswith(f"| `{name}` |")), "")
            assert f"localhost:{host}" in row, (name, host)
    for topic in created_topics():
        assert f"`{topic}`" in doc, topic
    cmd = svc["traffic"]["command"]
    rate = int(float(cmd[cmd.index("--rate") + 1]))
    drift_after = cmd[cmd.index("--drift-after") + 1]
    assert f"{rate:,} events/s" in doc and f"drift after {drift_after} s" in doc
    cfg = compose_monitor_config()
    assert f"first {cfg.models['churn'].baseline.events:,} events" in doc
    assert f"windows of {cfg.defaults.window.events:,} events" in doc
    _, mon = sidecar(kustomize(K8S / "base"))
    res = mon["resources"]
    assert (f"requests of {res['requests']['memory']} and {res['requests']['cpu']}" in doc
            and f"limits of {res['limits']['memory']} and {res['limits']['cpu']} CPU" in doc)
    assert f"{MEASURED_RSS_MIB} MB at its peak" in doc


@pytest.mark.slow
def test_compose_monitor_detects_the_generators_drift(kafka_broker, tmp_path):
    """The compose stack's pairing, run for real on the embedded broker (only the broker
    address, topic names and HTTP port changed): `stream-monitor run` with
    deploy/compose/stream-monitor.yaml and `stream-monitor generate`. Silent on the windows
    before the drift (event-count based, so timing does not matter); then exactly the
    injected drift: churn's shifted features and fraud's missing f07."""
    suffix = free_port()
    cfg = yaml.safe_load((COMPOSE_DIR / "stream-monitor.yaml").read_text())
    topics = {k: (f"{v[0]}-{suffix}" if isinstance(v, list) else f"{v}-{suffix}")
              for k, v in cfg["topics"].items()}
    kafka_broker.create_topics({t: (3 if k == "inferences" else 1) for k, t in topics.items()})
    topics["inferences"] = [topics["inferences"]]
    cfg["topics"] = topics
    cfg["kafka"].update({"bootstrap.servers": kafka_broker.bootstrap_servers,
                         "group.id": f"compose-{suffix}", "session.timeout.ms": 6000})
    port = free_port()
    cfg["http"] = {"host": "127.0.0.1", "port": port}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    exe = str(REPO / ".venv" / "bin" / "stream-monitor")
    log = open(tmp_path / "monitor.log", "w+")
    mon = subprocess.Popen([exe, "run", "--config", str(config), "--log-level", "warning"],
                           stdout=log, stderr=subprocess.STDOUT)
    gen = None
    url = f"http://127.0.0.1:{port}"

    def metrics() -> tuple[dict[str, float], set[tuple[str, ...]]]:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            text = r.read().decode()
        windows = {m[0]: float(m[1]) for m in re.findall(
            r'^stream_monitor_windows_closed_total\{model="(\w+)"\} (\S+)$', text, re.M)}
        flagged = set()
        severity = r'^stream_monitor_(feature_drift|data_quality)_severity\{(.*)\} (\S+)$'
        for m in re.finditer(severity, text, re.M):
            if float(m.group(3)) > 0:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                flagged.add((labels["model"], labels["feature"], labels.get("check", "drift")))
        return windows, flagged

    def probe(command: list[str]) -> int:
        """A healthcheck command of the Dockerfile or the compose file, run here."""
        assert command[:2] == ["python", "-c"], command
        code = command[2].replace(f"127.0.0.1:{METRICS_PORT}", f"127.0.0.1:{port}")
        return subprocess.run(["python3", "-c", code], capture_output=True, timeout=30).returncode

    readiness = services()["stream-monitor"]["healthcheck"]["test"][1:]   # after "CMD"
    health = instructions(dockerfile_stages()[-1], "HEALTHCHECK")[0]
    liveness = json.loads(health[health.index("CMD") + 3:].strip())
    try:
        deadline = time.monotonic() + 60
        while probe(readiness) != 0:   # what compose waits for before starting the traffic
            assert mon.poll() is None and time.monotonic() < deadline, "monitor not ready"
            time.sleep(0.3)
        assert probe(liveness) == 0
        gen = subprocess.Popen([exe, "generate", "--bootstrap-servers",
                                kafka_broker.bootstrap_servers, "--topic",
                                topics["inferences"][0], "--rate", "8000", "--drift-after", "10",
                                "--report-every", "0"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        # baseline 20,000 events per model, then windows of 5,000: the drift starts at event
        # 40,000 of each model (4,000/s x 10 s), so windows 1-3 are drift-free by construction
        # (window 4 is too, but events of 3 partitions interleave a little at its end).
        expected = {("churn", f, "drift") for f in ("f01", "f04", "f09", "plan")} | {
            ("fraud", "f07", "missing")}
        seen_quiet, flagged = False, set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            windows, flagged = metrics()
            done = min(windows.get("churn", 0), windows.get("fraud", 0))
            if max(windows.values(), default=0) <= 3:
                assert flagged == set(), f"false alarm before the drift: {flagged}"
                seen_quiet = seen_quiet or done >= 1
            elif done >= 7:
                break
            time.sleep(0.2)
        assert seen_quiet, "never saw a drift-free window"
        assert flagged == expected
    finally:
        for proc in (gen, mon):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
        log.seek(0)
        output = log.read()
    assert mon.returncode == 0, output
