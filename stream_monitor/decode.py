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
from operator import attrgetter, itemgetter
from typing import Any, Union

import msgspec
import numpy as np
import orjson

from .config import DecodeConfig, FieldMapping
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
# fields the label join needs besides the columns (Decoder.outcomes turns them on)
OUTCOME_EXTRAS = ("event_id", "scores", "segment")
OUTCOME_KEYS = ("event_id", "prediction", "scores", "label", "segment", "model_version")
_OUTCOME_GETTERS = tuple((k, attrgetter(k)) for k in OUTCOME_KEYS)


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
        for codes in self.cat_codes:
            codes[msgspec.UNSET] = codes.missing

    def event_type(self, fields: FieldMapping, outcomes: bool = False) -> type:
        """A msgspec Struct that decodes this model's well-formed events in one C call.

        Unknown feature names are refused (so such events take the slow path, which
        records them as a schema change); absent features decode as UNSET.
        """
        unset = msgspec.UnsetType
        spec = [(f"n{i}", float | None | unset, msgspec.UNSET) for i in range(len(self.numeric))]
        spec += [(f"c{i}", str | None | unset, msgspec.UNSET)
                 for i in range(len(self.categorical))]
        spec += [(f"i{i}", Any, msgspec.UNSET) for i in range(len(self.expected) - len(spec))]
        names = self.numeric + self.categorical + sorted(
            self.expected - set(self.numeric) - set(self.categorical))
        features = msgspec.defstruct(
            f"{self.model}_features", spec, rename=dict(zip([f[0] for f in spec], names,
                                                            strict=True)),
            forbid_unknown_fields=True, gc=False)
        types = {"numeric": float | None, "categorical": str | None}
        event = msgspec.defstruct(
            f"{self.model}_event",
            [("features", features),
             ("ts", float | str | None, None),
             ("prediction", types[self.prediction.kind] if self.prediction else Any, None),
             ("label", types[self.label.kind] if self.label else Any, None),
             ("model_version", str | int | None, None)]
            # scores and segment stay raw JSON (parsed only for the few events that get
            # a label), which keeps the join's decoding cost to a few slices per event
            + ([("event_id", str | int | None, None), ("scores", msgspec.Raw, None),
                ("segment", msgspec.Raw, None)] if outcomes else []),
            rename={"features": fields.features, "ts": fields.ts,
                    "prediction": fields.prediction, "label": fields.label,
                    "model_version": fields.model_version,
                    **({k: getattr(fields, k) for k in OUTCOME_EXTRAS} if outcomes else {})},
            tag_field=fields.model, tag=self.model, gc=False)
        self._num_attr = _getter([f"n{i}" for i in range(len(self.numeric))], attrgetter)
        self._cat_attr = _getter([f"c{i}" for i in range(len(self.categorical))], attrgetter)
        return event

    @property
    def feature_names(self) -> list[str]:
        return self.numeric + self.categorical


def _column(name: str, profile: Any) -> Column | None:
    if profile is None:
        return None
    if isinstance(profile, CategoricalProfile):
        return Column(name, "categorical", CategoryCodes(profile.categories))
    return Column(name, "numeric")


def _getter(names: list[str], get=itemgetter):
    """A C-level getter returning a tuple of the named items (or attributes) in order."""
    if not names:
        return lambda obj: ()
    if len(names) == 1:
        one = get(names[0])
        return lambda obj: (one(obj),)
    return get(*names)


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
    # per-event raw values for the label join (performance monitoring on): lists keyed by
    # OUTCOME_KEYS, parallel to the rows; None when the decoder does not extract them
    outcomes: dict[str, list] | None = None

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
        self.outcomes = False  # also extract OUTCOME_KEYS per event (the label join)
        f = config.fields
        self._model_key, self._features_key, self._ts_key = f.model, f.features, f.ts
        self._version_key, self._pred_key, self._label_key = f.model_version, f.prediction, f.label

    def _fast_decoder(self):
        key = (*sorted(self.schemas), self.outcomes)
        if getattr(self, "_fast_key", None) != key:
            types = {self.schemas[m].event_type(self.config.fields, self.outcomes): m
                     for m in key[:-1]}
            # msgspec treats the tag of a lone tagged struct as optional; in a union it is
            # required, so a never-matching member keeps events without a model out
            never = msgspec.defstruct("_no_model", [], tag_field=self.config.fields.model,
                                      tag="\x00never")
            union = Union[(*types, never)]  # noqa: UP007
            self._fast = msgspec.json.Decoder(union).decode
            self._fast_types, self._fast_key = types, key
        return self._fast, self._fast_types

    def decode(self, messages: Sequence[bytes], positions: Sequence[int]) -> DecodedBatch:
        """Decode a batch: typed C decoding for well-formed events, the rest one by one."""
        if not self.schemas:
            return self._decode_slow(messages, positions)
        fast, types = self._fast_decoder()
        max_bytes = self.config.max_message_bytes
        by_type = {t: ([], [], []) for t in types}
        slow_msgs, slow_pos = [], []
        errors = (msgspec.ValidationError, msgspec.DecodeError)
        for pos, raw in zip(positions, messages, strict=True):
            try:
                if len(raw) > max_bytes:
                    raise msgspec.DecodeError
                ev = fast(raw)
            except errors:
                slow_msgs.append(raw)
                slow_pos.append(pos)
                continue
            bucket = by_type.get(type(ev))
            if bucket is None:  # the never-matching union member
                slow_msgs.append(raw)
                slow_pos.append(pos)
                continue
            p, e, r = bucket
            p.append(pos)
            e.append(ev)
            r.append(raw)
        out = self._decode_slow(slow_msgs, slow_pos) if slow_msgs else DecodedBatch(
            {}, [], 0)
        for t, (pos, evs, raws) in by_type.items():
            if not evs:
                continue
            model = types[t]
            batch = self._struct_columns(self.schemas[model], pos, evs, raws, out.rejects)
            if batch is None:
                continue
            other = out.models.get(model)
            out.models[model] = batch if other is None else _concat(batch, other)
        out.messages = len(messages)
        return out

    def _struct_columns(self, schema: ModelSchema, positions: list[int], evs: list,
                        raws: list[bytes], rejects: list[Reject]) -> ModelBatch | None:
        n = len(evs)
        n_num, n_cat = len(schema.numeric), len(schema.categorical)
        feats = [e.features for e in evs]
        bad = np.zeros(n, dtype=bool)
        reasons: dict[int, tuple[str, str]] = {}
        absent = np.zeros(n_num + n_cat, np.int64)
        violations = np.zeros(n_num + n_cat, np.int64)
        num_rows = list(map(schema._num_attr, feats))
        unset_cols: list[tuple[int, tuple]] = []  # columns with absent keys
        try:
            numeric = np.fromiter(chain.from_iterable(num_rows), np.float64,
                                  n * n_num).reshape(n, n_num)
        except TypeError:  # None (missing) or UNSET (absent) somewhere
            numeric = np.empty((n, n_num), np.float64)
            for j, col in enumerate(zip(*num_rows, strict=True)):
                if msgspec.UNSET in col:
                    unset_cols.append((j, col))
                numeric[:, j] = [np.nan if v is None or v is msgspec.UNSET else v for v in col]
        if n_num and np.isinf(numeric).any():
            for i, j in zip(*np.nonzero(np.isinf(numeric)), strict=True):
                self._invalid(int(i), NON_FINITE, f"{schema.numeric[j]}: {numeric[i, j]}", bad,
                              reasons)
                numeric[i, j] = np.nan
        categorical = np.empty((n, n_cat), np.int32)
        if n_cat:
            cols = zip(*map(schema._cat_attr, feats), strict=True)
            for j, (col, codes) in enumerate(zip(cols, schema.cat_codes, strict=True)):
                categorical[:, j] = np.fromiter(map(codes.__getitem__, col), np.int32, n)
                if msgspec.UNSET in col:
                    unset_cols.append((n_num + j, col))
        prediction = self._struct_optional(schema.prediction, [e.prediction for e in evs])
        label = self._struct_optional(schema.label, [e.label for e in evs])
        ts = self._timestamps([e.ts for e in evs], bad, reasons)
        for j, col in unset_cols:
            absent[j] = sum(1 for v, b in zip(col, bad, strict=True)
                            if v is msgspec.UNSET and not b)
        version = evs[-1].model_version
        pos = np.array(positions, np.int64)
        outcomes = None
        if self.outcomes:
            outcomes = {k: list(map(get, evs)) for k, get in _OUTCOME_GETTERS}
        if bad.any():
            keep = ~bad
            if outcomes is not None:
                outcomes = {k: [v for v, b in zip(vs, bad, strict=True) if not b]
                            for k, vs in outcomes.items()}
            for i in np.flatnonzero(bad):
                reason, detail = reasons[int(i)]
                rejects.append(Reject(positions[i], reason, raws[i], model=schema.model,
                                      feature=detail.split(":", 1)[0], detail=detail))
            numeric, categorical, ts, pos = numeric[keep], categorical[keep], ts[keep], pos[keep]
            prediction = None if prediction is None else prediction[keep]
            label = None if label is None else label[keep]
            raws = [r for r, k in zip(raws, keep, strict=True) if k]
        if pos.size == 0:
            return None
        return ModelBatch(model=schema.model, positions=pos, ts=ts, numeric=numeric,
                          categorical=categorical, prediction=prediction, label=label,
                          absent=absent, type_violations=violations,
                          model_version=None if version is None else str(version), raw=raws,
                          outcomes=outcomes)

    @staticmethod
    def _struct_optional(column: Column | None, values: list) -> np.ndarray | None:
        if column is None:
            return None
        if column.kind == "numeric":
            return np.array(values, dtype=np.float64)
        return np.fromiter(map(column.codes.__getitem__, values), np.int32, len(values))

    def _decode_slow(self, messages: Sequence[bytes], positions: Sequence[int]) -> DecodedBatch:
        rejects: list[Reject] = []
        groups: dict[str, list[tuple[int, dict, bytes]]] = {}
        loads, max_bytes = orjson.loads, self.config.max_message_bytes
        model_key, default_model = self._model_key, self.config.default_model
        schemas = self.schemas
        for pos, raw in zip(positions, messages, strict=True):
            if len(raw) > max_bytes:
                rejects.append(Reject(pos, TOO_LARGE, raw,
                                      detail=f"{len(raw)} bytes > {max_bytes}"))
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
        num_rows, cat_rows, some_absent = self._rows(schema, feats)

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

        # Schema counters cover the events that are kept, not the rejected ones.
        absent = np.zeros(n_num + n_cat, np.int64)
        kept = [f for f, b in zip(feats, bad, strict=True) if not b]
        if some_absent:
            for j, k in enumerate(schema.feature_names):
                absent[j] = sum(1 for f in kept if k not in f)
        # This is the slow path (the typed decoder refuses unknown fields), so every kept
        # event is checked for fields the reference does not know.
        unexpected_events, unexpected_names = 0, Counter()
        expected = schema.expected
        for f in kept:
            extra = f.keys() - expected
            if extra:
                unexpected_events += 1
                if len(unexpected_names) < _MAX_UNEXPECTED_NAMES:
                    unexpected_names.update(str(k)[:100] for k in extra)

        version = group[-1][1].get(self._version_key)
        positions = np.fromiter((g[0] for g in group), np.int64, len(group))
        raw = [g[2] for g in group]
        outcomes = None
        if self.outcomes:
            fm = self.config.fields
            outcomes = {k: [g[1].get(getattr(fm, k)) for g, b in zip(group, bad, strict=True)
                            if not b] for k in OUTCOME_KEYS}
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
                          model_version=None if version is None else str(version), raw=raw,
                          outcomes=outcomes)

    @staticmethod
    def _rows(schema: ModelSchema, feats: list[dict]) -> tuple[list, list, bool]:
        """Feature tuples per event, and whether some key was absent (the slower path)."""
        try:
            return list(map(schema._num_get, feats)), list(map(schema._cat_get, feats)), False
        except KeyError:
            pass
        num_rows, cat_rows = [], []
        for f in feats:
            num_rows.append(tuple(f.get(k) for k in schema.numeric))
            cat_rows.append(tuple(f.get(k) for k in schema.categorical))
        return num_rows, cat_rows, True

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
        if types == {str} and min(map(len, col)) >= 19:  # full date and time
            try:
                stamps = np.array([s[:-1] if s[-1:] == "Z" else s for s in col],
                                  dtype="datetime64[us]")
                if not np.isnat(stamps).any():
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


def _concat(a: ModelBatch, b: ModelBatch) -> ModelBatch:
    """Join the fast and slow parts of a model's batch, back in input order."""
    positions = np.concatenate([a.positions, b.positions])
    order = np.argsort(positions, kind="stable")

    def cat(x, y):
        return None if x is None or y is None else np.concatenate([x, y])[order]

    raw = a.raw + b.raw
    return ModelBatch(
        model=a.model, positions=positions[order], ts=cat(a.ts, b.ts),
        numeric=cat(a.numeric, b.numeric), categorical=cat(a.categorical, b.categorical),
        prediction=cat(a.prediction, b.prediction), label=cat(a.label, b.label),
        absent=a.absent + b.absent, type_violations=a.type_violations + b.type_violations,
        unexpected_events=a.unexpected_events + b.unexpected_events,
        unexpected_names=a.unexpected_names + b.unexpected_names,
        model_version=b.model_version or a.model_version, raw=[raw[i] for i in order],
        outcomes=None if a.outcomes is None or b.outcomes is None else {
            k: [both[i] for i in order] for k in a.outcomes
            for both in (a.outcomes[k] + b.outcomes[k],)})


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
