"""Decode: raw message bytes of a batch -> one columnar batch per model, plus rejects.

`decode_batch` is the single entry point, so its strategy can change without touching
the engine. Values are pulled out with C-level helpers (orjson, itemgetter, zip, map)
and converted to numpy columns once per batch; a per-event Python path runs only for
the events of a batch that need it (absent keys, wrong types, unexpected fields).
Missing values stay missing (NaN / a missing code), never zero. Every message that
cannot be used becomes a `Reject` with a reason: nothing is dropped silently.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from .config import DecodeConfig
from .reference import CategoricalProfile, Reference, category_key

# Reject reasons (also the `reason` label of stream_monitor_rejects_total).
TOO_LARGE = "too_large"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
NO_MODEL = "no_model"
UNKNOWN_MODEL = "unknown_model"
BAD_FEATURES = "features_not_object"
WRONG_TYPE = "wrong_type"
NON_FINITE = "non_finite"
BAD_TIMESTAMP = "bad_timestamp"
LATE = "late_event"
REASONS = (TOO_LARGE, NOT_JSON, NOT_OBJECT, NO_MODEL, UNKNOWN_MODEL, BAD_FEATURES,
           WRONG_TYPE, NON_FINITE, BAD_TIMESTAMP, LATE)

_NUMBER_TYPES = frozenset({int, float, type(None)})
_CATEGORY_TYPES = frozenset({str, type(None)})
_MAX_UNEXPECTED_NAMES = 50


@dataclass
class Reject:
    """A message that could not be used, kept with why and where it came from."""

    position: int               # input line number (replay) or offset (Kafka)
    reason: str
    raw: bytes
    model: str | None = None
    feature: str | None = None
    detail: str = ""


class CategoryCodes(dict):
    """category -> code; unknown categories get the 'unseen' code, None the missing one."""

    def __init__(self, categories: Sequence[str]):
        super().__init__((c, i) for i, c in enumerate(categories))
        self.unseen = len(categories)
        self.missing = len(categories) + 1
        self[None] = self.missing

    def __missing__(self, key: Any) -> int:
        return self.unseen


@dataclass
class Column:
    """How one value column (feature, prediction or label) is read."""

    name: str
    kind: str                           # numeric | categorical
    codes: CategoryCodes | None = None  # categorical only


class ModelSchema:
    """The columns of one model, in the fixed order of the engine's arrays."""

    def __init__(self, model: str, reference: Reference, kinds: dict[str, str],
                 ignored: set[str] = frozenset()):
        self.model = model
        names = [n for n in reference.features if n not in ignored]
        self.numeric = [n for n in names if kinds.get(n, reference.features[n].kind) == "numeric"]
        self.categorical = [n for n in names
                            if kinds.get(n, reference.features[n].kind) == "categorical"]
        for n in self.categorical:
            if not isinstance(reference.features[n], CategoricalProfile):
                raise ValueError(f"feature {n!r} is numeric in the reference of {model!r}")
        self.cat_codes = [CategoryCodes(reference.features[n].categories) for n in self.categorical]
        self.expected = frozenset(reference.features)  # ignored features are expected too
        self.prediction = _column("prediction", reference.prediction)
        self.label = _column("label", reference.label)
        self._num_get = _getter(self.numeric)
        self._cat_get = _getter(self.categorical)

    @property
    def feature_names(self) -> list[str]:
        return self.numeric + self.categorical


def _column(name: str, profile: Any) -> Column | None:
    if profile is None:
        return None
    if isinstance(profile, CategoricalProfile):
        return Column(name, "categorical", CategoryCodes(profile.categories))
    return Column(name, "numeric")


def _getter(names: list[str]):
    if not names:
        return lambda d: ()
    if len(names) == 1:
        name = names[0]
        return lambda d: (d[name],)
    return itemgetter(*names)


@dataclass
class ModelBatch:
    """The usable events of one model in one batch, as columns."""

    model: str
    positions: np.ndarray               # int64, input line numbers or offsets
    ts: np.ndarray                      # float64 epoch seconds (NaN when absent)
    numeric: np.ndarray                 # (n, n_numeric) float64, NaN = missing
    categorical: np.ndarray             # (n, n_categorical) int32 codes
    prediction: np.ndarray | None = None
    label: np.ndarray | None = None
    absent: np.ndarray | None = None    # (n_features,) events whose key was absent
    type_violations: np.ndarray | None = None  # (n_features,) values that had a wrong type
    unexpected_events: int = 0          # events carrying fields not in the reference
    unexpected_names: Counter = field(default_factory=Counter)
    model_version: str | None = None
    raw: list[bytes] = field(default_factory=list)  # message bytes, kept for late rejects

    def __len__(self) -> int:
        return int(self.positions.size)

    def take(self, index: np.ndarray | slice) -> ModelBatch:
        """A sub-batch (a window's share); per-batch counters go to the first piece only."""
        return ModelBatch(
            model=self.model, positions=self.positions[index], ts=self.ts[index],
            numeric=self.numeric[index], categorical=self.categorical[index],
            prediction=None if self.prediction is None else self.prediction[index],
            label=None if self.label is None else self.label[index],
            model_version=self.model_version)


@dataclass
class DecodedBatch:
    models: dict[str, ModelBatch]
    rejects: list[Reject]
    messages: int
    # events of models still collecting their baseline: (position, event, raw bytes)
    pending: dict[str, list[tuple[int, dict, bytes]]] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return sum(len(b) for b in self.models.values())


class Decoder:
    """Turns batches of raw messages into per-model columnar batches."""

    def __init__(self, schemas: dict[str, ModelSchema], config: DecodeConfig):
        self.schemas = schemas
        self.config = config
        self.pending: set[str] = set()  # models whose reference is still being collected
        f = config.fields
        self._model_key, self._features_key, self._ts_key = f.model, f.features, f.ts
        self._version_key, self._pred_key, self._label_key = f.model_version, f.prediction, f.label

    def decode(self, messages: Sequence[bytes], positions: Sequence[int]) -> DecodedBatch:
        rejects: list[Reject] = []
        groups: dict[str, list[tuple[int, dict, bytes]]] = {}
        loads, max_bytes = orjson.loads, self.config.max_message_bytes
        model_key, default_model = self._model_key, self.config.default_model
        schemas = self.schemas
        for pos, raw in zip(positions, messages, strict=True):
            if len(raw) > max_bytes:
                rejects.append(Reject(pos, TOO_LARGE, raw, detail=f"{len(raw)} bytes > {max_bytes}"))
                continue
            try:
                ev = loads(raw)
            except orjson.JSONDecodeError as exc:
                rejects.append(Reject(pos, NOT_JSON, raw, detail=str(exc)))
                continue
            if type(ev) is not dict:
                rejects.append(Reject(pos, NOT_OBJECT, raw, detail=type(ev).__name__))
                continue
            model = ev.get(model_key, default_model)
            if type(model) is not str:
                rejects.append(Reject(pos, NO_MODEL, raw, detail=f"no string '{model_key}' field"))
                continue
            group = groups.get(model)
            if group is None:
                if model not in schemas and model not in self.pending:
                    rejects.append(Reject(pos, UNKNOWN_MODEL, raw, model=model[:100]))
                    continue
                group = groups[model] = []
            group.append((pos, ev, raw))
        batches, pending = {}, {}
        for model, group in groups.items():
            if model not in schemas:
                pending[model] = group
                continue
            batch = self._columns(schemas[model], group, rejects)
            if batch is not None:
                batches[model] = batch
        return DecodedBatch(batches, rejects, len(messages), pending)

    # -- per model -------------------------------------------------------------------

    def _columns(self, schema: ModelSchema, group: list[tuple[int, dict, bytes]],
                 rejects: list[Reject]) -> ModelBatch | None:
        model = schema.model
        fkey = self._features_key
        feats = [g[1].get(fkey) for g in group]
        if set(map(type, feats)) != {dict}:
            keep = []
            for g, f in zip(group, feats, strict=True):
                if type(f) is dict:
                    keep.append(g)
                else:
                    rejects.append(Reject(g[0], BAD_FEATURES, g[2], model=model,
                                          detail=f"'{fkey}' is {type(f).__name__}"))
            group = keep
            feats = [g[1][fkey] for g in group]
        if not group:
            return None
        n_num, n_cat = len(schema.numeric), len(schema.categorical)
        absent = np.zeros(n_num + n_cat, np.int64)
        num_rows, cat_rows = self._rows(schema, feats, absent)

        bad = np.zeros(len(group), dtype=bool)     # rows to reject
        reasons: dict[int, tuple[str, str]] = {}
        violations = np.zeros(n_num + n_cat, np.int64)

        numeric = self._numeric_matrix(schema.numeric, num_rows, len(group), bad, reasons,
                                       violations, 0)
        categorical = np.empty((len(group), n_cat), np.int32)
        if n_cat:
            cat_cols = list(zip(*cat_rows, strict=True))
            for j, (col, codes) in enumerate(zip(cat_cols, schema.cat_codes, strict=True)):
                categorical[:, j] = self._codes(schema.categorical[j], col, codes, bad, reasons,
                                                violations, n_num + j)

        prediction = self._optional(schema.prediction, group, self._pred_key, bad, reasons)
        label = self._optional(schema.label, group, self._label_key, bad, reasons)
        ts = self._timestamps([g[1].get(self._ts_key) for g in group], bad, reasons)

        unexpected_events, unexpected_names = 0, Counter()
        expected = schema.expected
        lens = np.fromiter(map(len, feats), np.int64, len(feats))
        # Only events with more keys than expected (or a batch with absent keys, where
        # an extra key can hide behind a missing one) can carry unexpected fields.
        suspects = np.arange(len(feats)) if absent.any() else np.flatnonzero(lens > len(expected))
        for i in suspects:
            extra = feats[i].keys() - expected
            if extra:
                unexpected_events += 1
                if len(unexpected_names) < _MAX_UNEXPECTED_NAMES:
                    unexpected_names.update(str(k)[:100] for k in extra)

        version = group[-1][1].get(self._version_key)
        positions = np.fromiter((g[0] for g in group), np.int64, len(group))
        raw = [g[2] for g in group]
        if bad.any():
            for i in np.flatnonzero(bad):
                reason, detail = reasons[int(i)]
                feature = detail.split(":", 1)[0] if detail else None
                rejects.append(Reject(group[i][0], reason, group[i][2], model=model,
                                      feature=feature, detail=detail))
            keep = ~bad
            numeric, categorical, ts, positions = (numeric[keep], categorical[keep], ts[keep],
                                                   positions[keep])
            prediction = None if prediction is None else prediction[keep]
            label = None if label is None else label[keep]
            raw = [r for r, k in zip(raw, keep, strict=True) if k]
        if positions.size == 0:
            return None
        return ModelBatch(model=model, positions=positions, ts=ts, numeric=numeric,
                          categorical=categorical, prediction=prediction, label=label,
                          absent=absent, type_violations=violations,
                          unexpected_events=unexpected_events, unexpected_names=unexpected_names,
                          model_version=None if version is None else str(version), raw=raw)

    @staticmethod
    def _rows(schema: ModelSchema, feats: list[dict], absent: np.ndarray):
        """Feature tuples per event; the slow path runs only when a key is absent."""
        try:
            return list(map(schema._num_get, feats)), list(map(schema._cat_get, feats))
        except KeyError:
            pass
        num_rows, cat_rows = [], []
        for f in feats:
            num_rows.append(tuple(f.get(k) for k in schema.numeric))
            cat_rows.append(tuple(f.get(k) for k in schema.categorical))
        for j, k in enumerate(schema.feature_names):
            absent[j] = sum(1 for f in feats if k not in f)
        return num_rows, cat_rows

    def _numeric_matrix(self, names: list[str], rows: list[tuple], n: int, bad: np.ndarray,
                        reasons: dict, violations: np.ndarray, offset: int) -> np.ndarray:
        if not names:
            return np.empty((n, 0), np.float64)
        if set(map(type, chain.from_iterable(rows))) <= _NUMBER_TYPES:
            matrix = np.array(rows, dtype=np.float64)  # None -> NaN (missing)
        else:
            matrix = np.empty((n, len(names)), np.float64)
            for j, col in enumerate(zip(*rows, strict=True)):
                matrix[:, j] = self._numeric_column(names[j], col, bad, reasons, violations,
                                                    offset + j)
        if not np.isfinite(matrix[~np.isnan(matrix)]).all():
            for i, j in zip(*np.nonzero(np.isinf(matrix)), strict=True):
                self._invalid(int(i), NON_FINITE, f"{names[j]}: {matrix[i, j]}", bad, reasons)
                matrix[i, j] = np.nan
        return matrix

    def _numeric_column(self, name: str, col: tuple, bad: np.ndarray, reasons: dict,
                        violations: np.ndarray, j: int) -> np.ndarray:
        out = np.empty(len(col), np.float64)
        for i, v in enumerate(col):
            t = type(v)
            if t is float or t is int:
                out[i] = v
            elif v is None:
                out[i] = np.nan
            else:
                out[i] = np.nan
                violations[j] += 1
                self._invalid(i, WRONG_TYPE, f"{name}: expected a number, got {t.__name__}",
                              bad, reasons)
        return out

    def _codes(self, name: str, col: tuple, codes: CategoryCodes, bad: np.ndarray, reasons: dict,
               violations: np.ndarray, j: int) -> np.ndarray:
        if set(map(type, col)) <= _CATEGORY_TYPES:
            return np.fromiter(map(codes.__getitem__, col), np.int32, len(col))
        out = np.empty(len(col), np.int32)
        for i, v in enumerate(col):
            t = type(v)
            if t is str or v is None:
                out[i] = codes[v]
            elif t is bool or t is int or (t is float and math.isfinite(v)):
                out[i] = codes[category_key(v)]
            else:
                out[i] = codes.missing
                violations[j] += 1
                self._invalid(i, WRONG_TYPE, f"{name}: expected a category, got {t.__name__}",
                              bad, reasons)
        return out

    def _optional(self, column: Column | None, group: list, key: str, bad: np.ndarray,
                  reasons: dict) -> np.ndarray | None:
        if column is None:
            return None
        col = tuple(g[1].get(key) for g in group)
        scratch = np.zeros(1, np.int64)
        if column.kind == "numeric":
            if set(map(type, col)) <= _NUMBER_TYPES:
                return np.array(col, dtype=np.float64)
            return self._numeric_column(column.name, col, bad, reasons, scratch, 0)
        return self._codes(column.name, col, column.codes, bad, reasons, scratch, 0)

    def _invalid(self, i: int, reason: str, detail: str, bad: np.ndarray, reasons: dict) -> None:
        if self.config.invalid_values == "missing" and reason in (WRONG_TYPE, NON_FINITE):
            return  # the value is kept as missing and counted as a type violation
        if not bad[i]:
            bad[i] = True
            reasons[i] = (reason, detail)

    def _timestamps(self, col: list, bad: np.ndarray, reasons: dict) -> np.ndarray:
        types = set(map(type, col))
        if types <= _NUMBER_TYPES:
            return np.array(col, dtype=np.float64)
        if types == {str}:
            try:
                stamps = np.array([s[:-1] if s[-1:] == "Z" else s for s in col],
                                  dtype="datetime64[us]")
                return stamps.astype(np.int64) / 1e6
            except ValueError:
                pass  # offsets like +02:00 or odd spellings: parse one by one below
        out = np.empty(len(col), np.float64)
        for i, v in enumerate(col):
            out[i] = parse_timestamp(v)
            if out[i] != out[i] and v is not None:
                self._invalid(i, BAD_TIMESTAMP, f"ts: cannot parse {str(v)[:40]!r}", bad, reasons)
                if self.config.invalid_values == "missing":
                    out[i] = np.nan
        return out


def parse_timestamp(v: Any) -> float:
    """Epoch seconds from epoch seconds or an ISO-8601 string; NaN when unusable."""
    if type(v) in (int, float):
        return float(v) if math.isfinite(v) else math.nan
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            return math.nan
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    return math.nan
