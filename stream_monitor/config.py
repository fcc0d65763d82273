"""Configuration: the YAML contract, its defaults and its validation.

Every key has a documented default except ``models``; unknown keys are errors. A
mistake is reported as one line per problem: the key path, the bad value and what
was expected (``ConfigError``). Per-feature settings are resolved here, once, from
``defaults`` -> model -> feature overrides, so the engine never looks things up.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FeatureKind = Literal["numeric", "categorical"]

# "wasserstein" was offered until reference format 2: binned, it was biased 2.5-5x on
# heavy-tailed and skewed data (see README, methods), so it is no longer a method.
NUMERIC_METHODS = ("psi", "jensen_shannon", "ks", "mean_shift")
CATEGORICAL_METHODS = ("psi", "jensen_shannon")
DATA_QUALITY_CHECKS = (
    "missing", "out_of_range", "unseen_categories", "type_violations", "schema", "stuck",
)


class ConfigError(Exception):
    """A configuration that cannot be used; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(Strict):
    """Scores at or above ``warning`` warn, at or above ``critical`` are critical."""

    warning: float = Field(ge=0)
    critical: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.critical < self.warning:
            raise ValueError(f"critical ({self.critical}) must be >= warning ({self.warning})")
        return self

    def severity(self, value: float) -> int:
        if value != value:  # nan: nothing to judge
            return 0
        if value >= self.critical:
            return 2
        if value >= self.warning:
            return 1
        return 0


class DriftRule(Strict):
    """Which method's score sets a feature's drift severity, and its thresholds."""

    method: str
    warning: float = Field(ge=0)
    critical: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> DriftRule:
        if self.critical < self.warning:
            raise ValueError(f"critical ({self.critical}) must be >= warning ({self.warning})")
        return self

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(warning=self.warning, critical=self.critical)


class DataQualityThresholds(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    missing: Thresholds = Thresholds(warning=0.05, critical=0.2)
    out_of_range: Thresholds = Thresholds(warning=0.02, critical=0.1)
    unseen_categories: Thresholds = Thresholds(warning=0.05, critical=0.2)
    type_violations: Thresholds = Thresholds(warning=0.01, critical=0.05)
    # `schema` would shadow a BaseModel attribute, hence the alias
    schema_: Thresholds = Field(default=Thresholds(warning=0.01, critical=0.1), alias="schema")
    stuck: Thresholds = Thresholds(warning=1.0, critical=1.0)

    def for_check(self, check: str) -> Thresholds:
        return self.schema_ if check == "schema" else getattr(self, check)


class WindowConfig(Strict):
    """Tumbling windows: by event count, or by event time with allowed lateness."""

    events: int | None = Field(default=None, gt=0)
    seconds: float | None = Field(default=None, gt=0)
    allowed_lateness: float = Field(default=0.0, ge=0)
    # event-time windows: an event further ahead than this of the wall clock, or of the
    # stream (the median time of the model's last 15 events), is a future_event reject,
    # so one bad clock cannot push the watermark past every later event
    max_future: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _one_kind(self) -> WindowConfig:
        if (self.events is None) == (self.seconds is None):
            raise ValueError("give exactly one of 'events' or 'seconds'")
        return self


class ProfileConfig(Strict):
    """How reference profiles are built (by `reference build` and from a baseline)."""

    numeric_bins: int = Field(default=50, ge=2, le=1000)
    max_categories: int = Field(default=1000, ge=1, le=100_000)


class AlertingConfig(Strict):
    fire_after: int = Field(default=1, ge=1)
    resolve_after: int = Field(default=3, ge=1)
    group_min_features: int = Field(default=3, ge=2)
    dataset_drift: Thresholds = Thresholds(warning=0.3, critical=0.5)


class DetectorConfig(Strict):
    """A feature's sequential detector (see detectors.py); `none` in YAML switches it off."""

    method: Literal["cusum", "page_hinkley"] = "cusum"
    # allowance per block in block-standard-deviations: shifts smaller than this are
    # tolerated, larger ones accumulate evidence
    k: float = Field(default=0.5, ge=0.05, le=5)
    # expected run length without drift, in blocks per feature: the false-alarm target
    arl: float = Field(default=1e6, ge=10, le=1e12)


# a feature's or model's `detector:`: settings, or "none" to switch it off
DetectorSetting = DetectorConfig | Literal["none"]


# -- performance monitoring (label join, realized/estimated performance, retraining) --------


class JoinConfig(Strict):
    """Bounds of one model's join buffer (predictions and labels waiting for each other)."""

    max_predictions: int = Field(default=200_000, ge=1)
    max_labels: int = Field(default=100_000, ge=1)
    max_age: float = Field(default=7 * 86400.0, gt=0)  # seconds of event time


class DropThresholds(Strict):
    """Degradation of the alert metric against its reference, absolute and relative."""

    absolute: Thresholds | None = Thresholds(warning=0.05, critical=0.10)
    relative: Thresholds | None = Thresholds(warning=0.10, critical=0.25)


class LabelShiftConfig(Strict):
    absolute: Thresholds = Thresholds(warning=0.05, critical=0.10)   # rate difference
    relative: Thresholds = Thresholds(warning=0.25, critical=0.50)   # rate ratio - 1
    mean_shift: Thresholds = Thresholds(warning=0.2, critical=0.5)   # regression, in ref sd


class SegmentsConfig(Strict):
    fields: list[str] = []
    max_values: int = Field(default=20, ge=1, le=1000)   # per field; the rest is cut
    min_labels: int = Field(default=100, ge=1)           # per segment and window


class RetrainConfig(Strict):
    after_windows: int | None = Field(default=3, ge=1)     # performance alert lasting N windows
    every_labels: int | None = Field(default=None, ge=1)   # N new joined labels
    on_schema_change: bool = True


class PerformanceConfig(Strict):
    task: Literal["auto", "classification", "regression"] = "auto"
    positive: str | None = None          # positive class (binary); inferred when absent
    threshold: float = Field(default=0.5, gt=0, lt=1)  # a probability prediction's cut
    window: int = Field(default=2000, ge=10)            # joined labels per window
    reference_windows: int = Field(default=5, ge=1)     # when the reference has no figure
    min_labels: int = Field(default=200, ge=1)          # a flushed partial window's minimum
    metric: str | None = None            # alert metric; accuracy / mae by default
    drop: DropThresholds = DropThresholds()
    significance: float = Field(default=0.001, gt=0, lt=1)
    concept_drift: Literal["adwin", "ddm", "hddm_a", "page_hinkley", "off"] = "adwin"
    drift_delta: float = Field(default=1e-5, gt=0, lt=1)
    label_shift: LabelShiftConfig = LabelShiftConfig()
    segments: SegmentsConfig = SegmentsConfig()
    retrain: RetrainConfig = RetrainConfig()
    join: JoinConfig = JoinConfig()
    estimate: bool = True                # CBPE estimates from scores
    estimate_window: int = Field(default=10_000, ge=10)  # predictions per estimate window


class Defaults(Strict):
    window: WindowConfig = WindowConfig(events=10_000)
    block: int = Field(default=1000, ge=100, le=1_000_000)
    detector: DetectorSetting = DetectorConfig()
    min_events: int = Field(default=200, ge=1)
    significance: float = Field(default=0.01, gt=0, lt=1)
    numeric: DriftRule = DriftRule(method="psi", warning=0.1, critical=0.25)
    categorical: DriftRule = DriftRule(method="psi", warning=0.1, critical=0.25)
    data_quality: DataQualityThresholds = DataQualityThresholds()
    profile: ProfileConfig = ProfileConfig()
    alerting: AlertingConfig = AlertingConfig()
    performance: PerformanceConfig = PerformanceConfig()


class FeatureOverride(Strict):
    kind: FeatureKind | None = None
    drift: DriftRule | None = None
    data_quality: DataQualityThresholds | None = None
    ignore: bool = False
    detector: DetectorSetting | None = None


class BaselineConfig(Strict):
    events: int = Field(gt=0, le=10_000_000)


class ModelConfig(Strict):
    reference: Path | None = None
    baseline: BaselineConfig | None = None
    window: WindowConfig | None = None
    block: int | None = Field(default=None, ge=100, le=1_000_000)
    detector: DetectorSetting | None = None
    min_events: int | None = Field(default=None, ge=1)
    numeric: DriftRule | None = None
    categorical: DriftRule | None = None
    data_quality: DataQualityThresholds | None = None
    alerting: AlertingConfig | None = None
    performance: PerformanceConfig | None = None
    features: dict[str, FeatureOverride] = {}

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.reference is None) == (self.baseline is None):
            raise ValueError("give exactly one of 'reference' (a file) or 'baseline' ({events: N})")
        return self


class FieldMapping(Strict):
    """Where each part of an inference event lives (top-level keys of the JSON object)."""

    model: str = "model"
    model_version: str = "model_version"
    event_id: str = "event_id"
    ts: str = "ts"
    features: str = "features"
    prediction: str = "prediction"
    scores: str = "scores"
    label: str = "label"
    segment: str = "segment"


class DecodeConfig(Strict):
    max_message_bytes: int = Field(default=1_000_000, gt=0)
    invalid_values: Literal["reject", "missing"] = "reject"
    fields: FieldMapping = FieldMapping()
    # events that name no model go to this one (single-model topics)
    default_model: str | None = None


class Topics(Strict):
    inferences: list[str] = Field(default=["inferences"], min_length=1)
    labels: str | None = None
    alerts: str = "model-alerts"
    dead_letter: str = "model-events-dlq"
    retrain: str = "model-retrain"       # retraining requests (performance monitoring)
    windows: str | None = None           # closed windows' reports (replay's windows.jsonl)
    # exactly-once: per-model state snapshots, compacted, key = model; default
    # `<group.id>-changelog` (see `changelog_topic`)
    changelog: str | None = None
    # scale-out: partial windows and watermarks between instances (internal, keyed by
    # model); default `<group.id>-partials` (see `partials_topic`)
    partials: str | None = None

    @field_validator("inferences", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class HttpConfig(Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65535)


class MetricsConfig(Strict):
    max_models: int = Field(default=50, ge=1)
    max_features_per_model: int = Field(default=200, ge=1)
    max_reasons: int = Field(default=50, ge=1)


class ConsumerConfig(Strict):
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    poll_timeout: float = Field(default=0.5, gt=0)
    # where `run` consumes the next batch while it applies the current one: a child
    # process (kafka/fetch_process.py), a thread of its own process, or nowhere (none);
    # README "Running it as a sidecar" and "Benchmarks" say which is faster where
    prefetch: Literal["process", "thread", "none"] = "process"


class DeliveryConfig(Strict):
    """How `run` delivers dead letters and alert events, and how long it waits for them."""

    shutdown_grace: float = Field(default=20.0, gt=0, le=3600)  # SIGTERM -> exit, at most
    retry_backoff_max: float = Field(default=30.0, gt=0)        # failed delivery: 1 s doubling
    stall_after: float = Field(default=30.0, gt=0)   # unready when an output waits longer
    max_pending: int = Field(default=50_000, ge=1)   # outputs waiting: stop fetching beyond


class CheckpointInterval(Strict):
    """A checkpoint (one Kafka transaction) is committed after this many messages or
    seconds, whichever comes first, once anything was consumed since the last one."""

    events: int = Field(default=100_000, ge=1)
    seconds: float = Field(default=2.0, gt=0, le=3600)


class CheckpointConfig(Strict):
    interval: CheckpointInterval = CheckpointInterval()
    restore_timeout: float = Field(default=60.0, gt=0)  # reading the changelog, at most


class ProcessingConfig(Strict):
    """`run`'s processing guarantee (README: Processing guarantees)."""

    # exactly_once: state, offsets and outputs committed in one Kafka transaction;
    # at_least_once: for brokers without transactions (a crash may count twice)
    guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    # transactional.id = `<prefix>-<group.instance.id or host name>`; prefix: group.id
    transactional_id: str | None = Field(default=None, min_length=1)


class ScaleOutConfig(Strict):
    """Several instances share a model's partitions; partial event-time windows are merged
    by the owner of the model's partition of `topics.partials` (kafka/partials.py)."""

    enabled: bool = False
    # a partition whose instance accepted no event of a model for this long (wall clock)
    # no longer holds that model's windows open (like Flink's `withIdleness`)
    idle_timeout: float = Field(default=30.0, gt=0)
    # partitions of `topics.partials` (created when absent): how many instances can
    # share the merging of models; a model's windows are always merged by one
    partitions: int = Field(default=6, ge=1, le=10_000)


class AlertmanagerConfig(Strict):
    """Direct push of alert events to Alertmanager's v2 API (off unless `url` is set)."""

    url: str | None = None  # e.g. http://localhost:9093 ; off when absent
    timeout: float = Field(default=5.0, gt=0)


# Client settings a `kafka:` section is merged over (a key given there wins). A fresh
# monitor starts at the newest messages (`latest`): it judges current traffic instead of
# working through all retained history and alerting on old data; a restarted one resumes
# from its group's committed offsets either way. 6 s is the smallest session timeout an
# Apache Kafka broker accepts by default (group.min.session.timeout.ms) and lets a group
# join quickly (see the README: a fresh start is ready in about 3 s on the embedded broker).
KAFKA_DEFAULTS: dict[str, str | int | float | bool] = {
    "bootstrap.servers": "localhost:9092",
    "group.id": "stream-monitor",
    "auto.offset.reset": "latest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 2000,
}


class Config(Strict):
    kafka: dict[str, str | int | float | bool] = dict(KAFKA_DEFAULTS)
    topics: Topics = Topics()
    http: HttpConfig = HttpConfig()
    metrics: MetricsConfig = MetricsConfig()
    consumer: ConsumerConfig = ConsumerConfig()
    decode: DecodeConfig = DecodeConfig()
    alertmanager: AlertmanagerConfig = AlertmanagerConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    processing: ProcessingConfig = ProcessingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    scale_out: ScaleOutConfig = ScaleOutConfig()
    defaults: Defaults = Defaults()
    models: dict[str, ModelConfig] = Field(min_length=1)

    # Filled by load_config: references are resolved relative to the config file, and
    # errors found later (references, client settings) name the file.
    base_dir: Path = Path(".")
    source: str = "<config>"

    @field_validator("kafka", mode="after")
    @classmethod
    def _merge_kafka_defaults(cls, v: dict[str, Any]) -> dict[str, Any]:
        # merged, not replaced: a section with only bootstrap.servers keeps group.id etc.
        return {**KAFKA_DEFAULTS, **v}


def changelog_topic(cfg: Config) -> str:
    """The changelog topic of exactly-once state: configured, or named from the group."""
    return cfg.topics.changelog or f"{cfg.kafka.get('group.id', 'stream-monitor')}-changelog"


def partials_topic(cfg: Config) -> str:
    """Scale-out's internal topic of partial windows: configured, or named from the group."""
    return cfg.topics.partials or f"{cfg.kafka.get('group.id', 'stream-monitor')}-partials"


def transactional_id(cfg: Config, host: str | None = None) -> str:
    """Stable per instance: a restarted instance aborts its crashed predecessor's open
    transaction at once (`init_transactions`), instead of readers waiting for the
    transaction timeout; distinct instances of one group must not share it."""
    import socket
    prefix = cfg.processing.transactional_id or str(cfg.kafka.get("group.id", "stream-monitor"))
    suffix = cfg.kafka.get("group.instance.id") or host or socket.gethostname()
    return f"{prefix}-{suffix}"


# Keys whose values are never printed (librdkafka's sasl.password, ssl.key.password,
# sasl.oauthbearer.client.secret, ssl.keystore.password, sasl.jaas.config, ...).
_SECRET_KEY = re.compile(r"pass|secret|token|credential|jaas|private|pem|\.key\b", re.I)


def _format_errors(err: ValidationError, source: str) -> list[str]:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-")) or "<top>"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if _SECRET_KEY.search(path):
            shown = "<redacted>"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the config schema)"
        elif e["type"] == "missing":
            msg = "required key is missing"
            shown = ""
        lines.append(f"{source}: {path}: {msg}" + (f" (got {shown})" if shown else ""))
    return lines


def _guarantee_problems(cfg: Config, source: str) -> list[str]:
    """Client settings that would silently break exactly-once: the sidecar sets them."""
    if cfg.processing.guarantee != "exactly_once":
        return []
    problems = []
    if "transactional.id" in cfg.kafka:
        problems.append(f"{source}: kafka.transactional.id: set by the monitor in exactly_once "
                        "mode (use processing.transactional_id for its prefix)")
    level = str(cfg.kafka.get("isolation.level", "read_committed"))
    if level != "read_committed":
        problems.append(f"{source}: kafka.isolation.level: exactly_once reads with "
                        f"read_committed (got {level!r}; or set processing.guarantee: "
                        "at_least_once)")
    return problems


def _method_problems(data: dict[str, Any], source: str) -> list[str]:
    """Drift methods that do not exist or do not fit the kind, read from the raw document.

    Works on the unvalidated mapping (skipping anything malformed, which pydantic reports)
    so that these mistakes are reported in the same pass as every other one.
    """
    def rule_method(rule: Any) -> str | None:
        m = rule.get("method") if isinstance(rule, dict) else None
        return m if isinstance(m, str) else None

    def check(where: str, rule: Any, allowed: tuple[str, ...]) -> None:
        method = rule_method(rule)
        if method is not None and method not in allowed:
            problems.append(f"{source}: {where}.method: unknown method {method!r} "
                            f"(expected one of {', '.join(dict.fromkeys(allowed))})")

    problems: list[str] = []
    defaults = data.get("defaults")
    scopes = [("defaults", defaults)]
    models = data.get("models")
    if isinstance(models, dict):
        scopes += [(f"models.{name}", m) for name, m in models.items()]
    for where, scope in scopes:
        if not isinstance(scope, dict):
            continue
        check(f"{where}.numeric", scope.get("numeric"), NUMERIC_METHODS)
        check(f"{where}.categorical", scope.get("categorical"), CATEGORICAL_METHODS)
        features = scope.get("features") if where != "defaults" else None
        if not isinstance(features, dict):
            continue
        for fname, fo in features.items():
            if not isinstance(fo, dict):
                continue
            allowed = {"categorical": CATEGORICAL_METHODS, "numeric": NUMERIC_METHODS}.get(
                fo.get("kind") if isinstance(fo.get("kind"), str) else "",
                NUMERIC_METHODS + CATEGORICAL_METHODS)
            check(f"{where}.features.{fname}.drift", fo.get("drift"), allowed)
    return problems


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a parsed YAML document; raises ConfigError with one line per problem.

    Every problem of the document is reported at once (not the first only).
    """
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: <top>: expected a mapping with at least 'models'"])
    problems = [f"{source}: {key}: unknown key (not part of the config schema)"
                for key in ("base_dir", "source") if key in data]
    data = {k: v for k, v in data.items() if k not in ("base_dir", "source")}
    cfg = None
    try:
        cfg = Config.model_validate({**data, "base_dir": base_dir or Path("."),
                                     "source": source})
    except ValidationError as err:
        problems += _format_errors(err, source)
    problems += sorted(set(_method_problems(data, source)))
    if cfg is not None:
        problems += _guarantee_problems(cfg, source)
        if cfg.scale_out.enabled and cfg.processing.guarantee != "exactly_once":
            problems.append(f"{source}: scale_out.enabled: partial windows travel in the "
                            "checkpoint transactions; needs processing.guarantee: "
                            "exactly_once")
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def read_document(path: str | Path) -> Any:
    """Read a YAML config file into plain data; ConfigError (one line) if unreadable."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read config: not a UTF-8 text file"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", exc)
        raise ConfigError([f"{path}:{where}: invalid YAML: {problem}"]) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file; references resolve relative to it."""
    path = Path(path)
    return parse_config(read_document(path), str(path), path.parent)


class FeatureSettings(BaseModel):
    """Resolved settings of one feature of one model."""

    model_config = ConfigDict(frozen=True)
    kind: FeatureKind
    drift: DriftRule
    data_quality: DataQualityThresholds


class ModelSettings(BaseModel):
    """Resolved settings of one model (features are resolved against its reference)."""

    model_config = ConfigDict(frozen=True)
    name: str
    window: WindowConfig
    min_events: int
    significance: float
    numeric: DriftRule
    categorical: DriftRule
    data_quality: DataQualityThresholds
    alerting: AlertingConfig
    profile: ProfileConfig
    overrides: dict[str, FeatureOverride]
    block: int = 1000
    detector: DetectorSetting = DetectorConfig()

    def detector_for(self, name: str) -> DetectorConfig | None:
        """The detector settings of one feature, None when switched off."""
        o = self.overrides.get(name)
        d = o.detector if o is not None and o.detector is not None else self.detector
        return None if d == "none" else d

    def feature(self, name: str, kind: FeatureKind) -> FeatureSettings:
        o = self.overrides.get(name)
        kind = (o.kind if o and o.kind else kind)
        default = self.numeric if kind == "numeric" else self.categorical
        drift = o.drift if o and o.drift else default
        dq = overlay(self.data_quality, o.data_quality if o else None)
        return FeatureSettings(kind=kind, drift=drift, data_quality=dq)


def overlay(base: BaseModel, override: BaseModel | None) -> BaseModel:
    """`base` with the keys `override` sets explicitly: overrides add to defaults."""
    if override is None:
        return base
    update = {}
    for name in override.model_fields_set:
        value = getattr(override, name)
        inner = getattr(base, name)
        update[name] = overlay(inner, value) if isinstance(inner, Strict) and isinstance(
            value, Strict) and not isinstance(inner, Thresholds) else value
    return base.model_copy(update=update)


def performance_settings(cfg: Config, name: str) -> PerformanceConfig:
    """A model's performance settings: defaults with the model's explicit keys on top."""
    return overlay(cfg.defaults.performance, cfg.models[name].performance)


def model_settings(cfg: Config, name: str) -> ModelSettings:
    m, d = cfg.models[name], cfg.defaults
    return ModelSettings(
        name=name,
        window=m.window or d.window,
        min_events=m.min_events or d.min_events,
        significance=d.significance,
        numeric=m.numeric or d.numeric,
        categorical=m.categorical or d.categorical,
        data_quality=overlay(d.data_quality, m.data_quality),
        alerting=overlay(d.alerting, m.alerting),
        profile=d.profile,
        overrides=m.features,
        block=m.block or d.block,
        detector=m.detector if m.detector is not None else d.detector,
    )
