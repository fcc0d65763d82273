"""Reference profiles: what "normal" looks like for one model.

A profile holds, per numeric feature, quantile bin edges (atoms in bins of their own)
with counts, moments, range, and the shares of events whose key was absent and whose
value was null; per categorical feature, the most frequent categories with counts, an
"other" bucket (seen in training, outside the top K), a Bloom filter of every training
category, the number of categories seen once (the Good-Turing rate of new values) and
the same absent / null shares; the same for the prediction and, when present, the
label. It is built from training data (`reference build`) or from the first events of
a stream (baseline), and stored as versioned JSON (schema_version 2; version 1 files
still load, judged as before: no absent share, every value outside the top K unseen).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream_monitor.config import FieldMapping, ProfileConfig
from stream_monitor.core.sketch import BloomFilter
from stream_monitor.core.stats import bin_index, profile_edges

SCHEMA_VERSION = 2
_READABLE_VERSIONS = (1, 2)


class ReferenceError(Exception):
    """A reference file or training input that cannot be used."""


def category_key(value: Any) -> str:
    """The string a categorical value is counted under (JSON spelling for booleans)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass
class NumericProfile:
    edges: np.ndarray          # inner bin edges, len = bins - 1
    counts: np.ndarray         # reference count per bin
    mean: float
    variance: float
    min: float
    max: float
    count: int                 # non-missing values
    missing_rate: float        # share of events without a value: key absent or null
    absent_rate: float = 0.0   # share of events whose key was absent (part of missing_rate)
    kind: str = field(default="numeric", init=False)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    @property
    def null_rate(self) -> float:
        """Share of events whose key was present with a null value."""
        return max(self.missing_rate - self.absent_rate, 0.0)

    @property
    def out_of_range_rate(self) -> float:
        """Chance that a new value from the reference distribution falls outside its range.

        For N exchangeable values, a new one is below the minimum or above the maximum
        with probability 2 / (N + 1) (continuous data; less with ties).
        """
        return 2.0 / (self.count + 1)

    @classmethod
    def from_values(cls, values: np.ndarray, bins: int, absent: int = 0) -> NumericProfile:
        """Profile of ``values`` (NaN = missing); ``absent`` of those had no key at all."""
        values = np.asarray(values, dtype=np.float64)
        present = values[~np.isnan(values)]
        n = present.size
        if n == 0:
            raise ReferenceError("no non-missing values to profile")
        edges = profile_edges(present, bins)
        counts = np.bincount(bin_index(edges, present), minlength=edges.size + 1)
        return cls(edges=edges, counts=counts.astype(np.int64), mean=float(present.mean()),
                   variance=float(present.var()), min=float(present.min()),
                   max=float(present.max()), count=int(n),
                   missing_rate=float(1 - n / values.size),
                   absent_rate=float(absent / values.size))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "numeric", "edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "mean": self.mean, "variance": self.variance, "min": self.min, "max": self.max,
                "count": self.count, "missing_rate": self.missing_rate,
                "absent_rate": self.absent_rate, "null_rate": self.null_rate}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NumericProfile:
        edges = np.asarray(d["edges"], dtype=np.float64)
        counts = np.asarray(d["counts"], dtype=np.int64)
        if counts.size != edges.size + 1 or np.any(np.diff(edges) <= 0):
            raise ReferenceError(
                "numeric profile needs increasing edges and len(counts) = len(edges)+1")
        return cls(edges=edges, counts=counts, mean=float(d["mean"]), variance=float(d["variance"]),
                   min=float(d["min"]), max=float(d["max"]), count=int(d["count"]),
                   missing_rate=float(d["missing_rate"]),
                   absent_rate=float(d.get("absent_rate", 0.0)))


@dataclass
class CategoricalProfile:
    categories: list[str]      # most frequent first, at most max_categories
    counts: np.ndarray         # count per category
    other: int                 # values outside `categories` (seen in training)
    count: int                 # non-missing values
    missing_rate: float        # share of events without a value: key absent or null
    absent_rate: float = 0.0   # share of events whose key was absent (part of missing_rate)
    # every training category (None: all of them are in `categories`, or a v1 file)
    seen: BloomFilter | None = None
    singletons: int | None = None   # categories seen exactly once (None: v1 file)
    kind: str = field(default="categorical", init=False)

    @property
    def other_share(self) -> float:
        return self.other / self.count if self.count else 0.0

    @property
    def null_rate(self) -> float:
        return max(self.missing_rate - self.absent_rate, 0.0)

    @property
    def unseen_rate(self) -> float:
        """Expected share of values never seen in training, were the stream unchanged.

        Good-Turing: the chance that the next value is new is about the share of training
        values whose category occurred once. A v1 reference has no membership filter, so
        every value outside the top K counts as unseen and `other_share` is the baseline.
        """
        if self.singletons is None:
            return self.other_share
        return self.singletons / self.count if self.count else 0.0

    @classmethod
    def from_counter(cls, counter: Counter, missing: int,
                     max_categories: int, absent: int = 0) -> CategoricalProfile:
        """Profile from category counts; ``absent`` of the ``missing`` events had no key."""
        total = sum(counter.values())
        if total == 0:
            raise ReferenceError("no non-missing values to profile")
        top = counter.most_common(max_categories)
        kept = sum(c for _, c in top)
        seen = BloomFilter.of(counter) if total > kept else None
        return cls(categories=[k for k, _ in top], counts=np.array([c for _, c in top], np.int64),
                   other=total - kept, count=total, missing_rate=missing / (total + missing),
                   absent_rate=absent / (total + missing), seen=seen,
                   singletons=sum(1 for c in counter.values() if c == 1))

    @classmethod
    def from_values(cls, values: Iterable[Any], max_categories: int,
                    absent: int = 0) -> CategoricalProfile:
        counter: Counter = Counter()
        missing = 0
        for v in values:
            if v is None:
                missing += 1
            else:
                counter[category_key(v)] += 1
        return cls.from_counter(counter, missing, max_categories, absent)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "categorical", "categories": self.categories,
                "counts": self.counts.tolist(), "other": self.other, "count": self.count,
                "missing_rate": self.missing_rate, "absent_rate": self.absent_rate,
                "null_rate": self.null_rate, "singletons": self.singletons,
                "seen": self.seen.to_json() if self.seen is not None else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CategoricalProfile:
        cats = [str(c) for c in d["categories"]]
        counts = np.asarray(d["counts"], dtype=np.int64)
        if counts.size != len(cats) or len(set(cats)) != len(cats):
            raise ReferenceError("categorical profile needs one count per distinct category")
        seen = BloomFilter.from_json(d["seen"]) if d.get("seen") else None
        singletons = d.get("singletons")
        return cls(categories=cats, counts=counts, other=int(d["other"]), count=int(d["count"]),
                   missing_rate=float(d["missing_rate"]),
                   absent_rate=float(d.get("absent_rate", 0.0)), seen=seen,
                   singletons=None if singletons is None else int(singletons))


Profile = NumericProfile | CategoricalProfile


def _profile_from_json(d: dict[str, Any]) -> Profile:
    if not isinstance(d, dict):
        raise ReferenceError(f"a profile must be an object, got {type(d).__name__}")
    if d.get("kind") == "numeric":
        return NumericProfile.from_json(d)
    if d.get("kind") == "categorical":
        return CategoricalProfile.from_json(d)
    raise ReferenceError(f"unknown profile kind {d.get('kind')!r}")


@dataclass
class Reference:
    """The reference of one model: per-feature profiles plus prediction and label."""

    model: str
    features: dict[str, Profile]
    prediction: Profile | None = None
    label: Profile | None = None
    events: int = 0
    source: str = ""
    created_at: str = ""
    # realized performance of the training data's predictions (performance.py), when it
    # has both predictions and labels
    performance: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "schema_version": SCHEMA_VERSION, "model": self.model, "events": self.events,
            "source": self.source, "created_at": self.created_at,
            "features": {k: p.to_json() for k, p in self.features.items()},
            "prediction": self.prediction.to_json() if self.prediction else None,
            "label": self.label.to_json() if self.label else None,
        }
        if self.performance is not None:
            out["performance"] = self.performance
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2))

    @classmethod
    def from_json(cls, d: Any, source: str = "<reference>") -> Reference:
        if not isinstance(d, dict):
            raise ReferenceError(f"{source}: expected a JSON object")
        version = d.get("schema_version")
        if version not in _READABLE_VERSIONS:
            raise ReferenceError(
                f"{source}: schema_version {version!r} is not supported "
                f"(expected one of {', '.join(map(str, _READABLE_VERSIONS))}; rebuild it "
                f"with `stream-monitor reference build`)")
        try:
            if not isinstance(d.get("features"), dict):
                raise ReferenceError("'features' must be an object of profiles")
            feats = {str(k): _profile_from_json(v) for k, v in d["features"].items()}
            pred = _profile_from_json(d["prediction"]) if d.get("prediction") else None
            label = _profile_from_json(d["label"]) if d.get("label") else None
        except (KeyError, TypeError, ValueError, AttributeError, ReferenceError) as exc:
            raise ReferenceError(f"{source}: malformed profile: {exc}") from None
        if not feats:
            raise ReferenceError(f"{source}: no features")
        return cls(model=str(d.get("model", "")), features=feats, prediction=pred, label=label,
                   events=int(d.get("events", 0)), source=str(d.get("source", "")),
                   created_at=str(d.get("created_at", "")),
                   performance=d.get("performance") if isinstance(d.get("performance"), dict)
                   else None)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ReferenceError(f"{path}: cannot read reference: {exc.strerror}") from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ReferenceError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_json(data, str(path))


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def infer_kind(values: Iterable[Any]) -> str:
    """Numbers are numeric; strings and booleans make a feature categorical."""
    seen_number = False
    for v in values:
        if v is None:
            continue
        if _is_number(v):
            seen_number = True
        else:
            return "categorical"
    return "numeric" if seen_number else "categorical"


class ReferenceBuilder:
    """Collects rows (feature dicts) and turns them into a Reference.

    Used for training files and for a stream's baseline; its memory is bounded by the
    number of rows it is given (the baseline size), never by stream length.
    """

    def __init__(self, model: str, profile: ProfileConfig,
                 kinds: dict[str, str] | None = None):
        self.model = model
        self.profile = profile
        self.kinds = dict(kinds or {})
        self.columns: dict[str, list[Any]] = {}
        self.predictions: list[Any] = []
        self.labels: list[Any] = []
        self.absent: Counter = Counter()    # per feature: rows without its key
        self.rows = 0

    def add(self, features: dict[str, Any], prediction: Any = None, label: Any = None) -> None:
        n = self.rows
        for name, value in features.items():
            col = self.columns.get(name)
            if col is None:
                col = self.columns[name] = [None] * n
                if n:
                    self.absent[name] = n
            col.append(value)
        self.rows += 1
        for name, col in self.columns.items():
            if len(col) < self.rows:
                col.append(None)
                self.absent[name] += 1
        self.predictions.append(prediction)
        self.labels.append(label)

    def _profile(self, values: list[Any], kind: str | None, absent: int = 0) -> Profile:
        kind = kind or infer_kind(values)
        if kind == "numeric":
            arr = np.array([float(v) if _is_number(v) else np.nan for v in values], np.float64)
            return NumericProfile.from_values(arr, self.profile.numeric_bins, absent)
        return CategoricalProfile.from_values(values, self.profile.max_categories, absent)

    def build(self, source: str = "") -> Reference:
        if self.rows == 0:
            raise ReferenceError(f"{source or self.model}: no events to build a reference from")
        features: dict[str, Profile] = {}
        for name, values in sorted(self.columns.items()):
            try:
                features[name] = self._profile(values, self.kinds.get(name),
                                               self.absent.get(name, 0))
            except ReferenceError as exc:
                raise ReferenceError(f"feature {name!r}: {exc}") from None
        pred = label = None
        if any(p is not None for p in self.predictions):
            pred = self._profile(self.predictions, None)
        if any(v is not None for v in self.labels):
            label = self._profile(self.labels, "categorical"
                                  if infer_kind(self.labels) == "categorical"
                                  or _few_distinct(self.labels) else "numeric")
        from stream_monitor.core.performance import (
            reference_performance,  # (performance imports this module)
        )
        return Reference(model=self.model, features=features, prediction=pred, label=label,
                         events=self.rows, source=source,
                         created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                         performance=reference_performance(self.predictions, self.labels,
                                                           label))


def _few_distinct(values: list[Any], limit: int = 20) -> bool:
    """Integer labels with few values are classes, not a regression target."""
    distinct = {v for v in values if v is not None}
    return len(distinct) <= limit and all(float(v).is_integer() for v in distinct if _is_number(v))


def iter_training_rows(path: Path, model: str, fields: FieldMapping
                       ) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """Yield (features, prediction, label) from a JSONL file of events or a CSV file.

    JSONL lines are inference events (lines of other models are skipped); a CSV has one
    column per feature plus optional `prediction` and `label` columns.
    """
    suffix = path.suffix.lower()
    try:
        fh = path.open("rb" if suffix != ".csv" else "r", newline=None)
    except OSError as exc:
        raise ReferenceError(f"{path}: cannot read input: {exc.strerror}") from None
    with fh:
        if suffix == ".csv":
            reader = csv.DictReader(fh)
            for row in reader:
                if None in row:
                    raise ReferenceError(f"{path}:{reader.line_num}: more cells than the "
                                         f"header has columns")
                feats = {k: _csv_value(v) for k, v in row.items()
                         if k not in (fields.prediction, fields.label)}
                yield (feats, _csv_value(row.get(fields.prediction)),
                       _csv_value(row.get(fields.label)))
            return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ReferenceError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            if not isinstance(ev, dict) or not isinstance(ev.get(fields.features), dict):
                raise ReferenceError(
                    f"{path}:{lineno}: expected an event object with a '{fields.features}' object")
            if ev.get(fields.model, model) != model:
                continue
            yield ev[fields.features], ev.get(fields.prediction), ev.get(fields.label)


def _csv_value(v: str | None) -> Any:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except ValueError:
        return v


def build_reference(path: str | Path, model: str, profile: ProfileConfig,
                    fields: FieldMapping | None = None,
                    kinds: dict[str, str] | None = None) -> Reference:
    path = Path(path)
    builder = ReferenceBuilder(model, profile, kinds)
    for feats, pred, label in iter_training_rows(path, model, fields or FieldMapping()):
        builder.add(feats, pred, label)
    return builder.build(source=str(path))
