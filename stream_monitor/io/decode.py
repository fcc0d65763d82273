"""Decode: raw message bytes of a batch -> one columnar batch per model, plus rejects.

`Decoder.decode` is the single entry point, so its strategy can change without touching
the engine. Every valid event is decoded by msgspec into a typed struct generated from
its model's reference (booleans, integers, nulls, absent keys and unseen categories
included; closed categorical features as a `Literal` of the reference's categories, an
event with another category decoded again by the plain type), the structs are flattened
in one C-level pass, the numeric values packed to float64 in one call, and the columns
written into column-major arrays allocated once per batch; only malformed events or
events of an unknown shape take the per-event orjson path, which finds out exactly what
is wrong with them. Missing values stay missing (NaN
/ a missing code), never zero. Data-quality facts (absent keys, type violations,
unexpected fields) are kept per event, so a window gets those of its own events. Every
message that cannot be used becomes a `Reject` with a reason: nothing is dropped silently.
"""

from __future__ import annotations

import functools
import math
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, islice, repeat
from operator import itemgetter
from typing import Annotated, Any, Literal, Union

import msgspec
import numpy as np
import orjson

from stream_monitor.config import DecodeConfig, FieldMapping
from stream_monitor.core.reference import CategoricalProfile, Reference, category_key

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
FUTURE = "future_event"
PROCESSING_ERROR = "processing_error"
REASONS = (TOO_LARGE, NOT_JSON, NOT_OBJECT, NO_MODEL, UNKNOWN_MODEL, BAD_FEATURES,
           WRONG_TYPE, NON_FINITE, BAD_TIMESTAMP, LATE, FUTURE, PROCESSING_ERROR)

# Plausible event times (epoch seconds): 1970-01-01 up to (excluding) 2100-01-01. Outside
# it a timestamp is a bad_timestamp reject: milliseconds sent as seconds, a year 9999
# placeholder, or a value no date library can format at window close.
TS_MIN, TS_MAX = 0.0, 4_102_444_800.0
TOO_DEEP = "nested deeper than the decoder's limit (about 1,000 levels)"

_NUMBER_TYPES = frozenset({int, float, type(None)})
_CATEGORY_TYPES = frozenset({str, type(None)})
_MAX_UNEXPECTED_NAMES = 50
# fields the label join needs besides the columns (Decoder.outcomes turns them on)
OUTCOME_EXTRAS = ("event_id", "scores", "segment")
OUTCOME_KEYS = ("event_id", "prediction", "scores", "label", "segment", "model_version")
# outcome fields that are null in most events: the typed path keeps only its chunks that
# have a value (`_TypedColumns.add_outcomes`)
_RARE_OUTCOMES = ("label", "scores", "segment")

# The typed decoder fills an absent numeric key with this NaN (a quiet NaN with a payload
# no JSON number can produce), so absent and null both land in the float column as NaN
# and the absent ones are found afterwards by their bits, for the whole batch at once.
_ABSENT_BITS = 0x7FF8_0000_00AB_5E47
ABSENT_NAN = struct.unpack("<d", struct.pack("<Q", _ABSENT_BITS))[0]
# The NaN `np.array` makes of a null (the typed path's nulls get the same bits)
_NULL_NAN = float(np.array([None], np.float64)[0])
_CHUNK = 1024   # messages decoded and turned into columns at a time (cache-sized)
# Codes the typed path's category lookup gives before they are resolved per column.
_NOT_FOUND, _ABSENT_CODE = -1, -2
# Share of a batch's messages a model's events may fail their Literal type (and be decoded
# twice) before that model is decoded by its plain type only.
_LITERAL_MISSES = 0.02


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
    """category -> code: the reference's top categories 0..K-1, then 'other' (seen in
    training outside the top K, per the reference's membership filter), 'unseen' (never
    seen) and 'missing' (None).

    A value outside the top K is looked up in the filter once and remembered (up to
    `_MEMO` values, so memory stays bounded), so repeats are plain dict hits.
    """

    _MEMO = 16_384

    def __init__(self, categories: Sequence[str], seen: Any = None):
        super().__init__((c, i) for i, c in enumerate(categories))
        self.other = len(categories)
        self.unseen = len(categories) + 1
        self.missing = len(categories) + 2
        self.seen = seen
        self._memo = 0
        self[None] = self.missing

    def __missing__(self, key: Any) -> int:
        if self.seen is None or type(key) is not str:
            return self.unseen
        code = self.other if key in self.seen else self.unseen
        if self._memo < self._MEMO:
            self[key] = code
            self._memo += 1
        return code

    def unknown(self, values: Sequence[Any], lookup: dict | None = None) -> np.ndarray:
        """Codes of values outside the reference's top categories (typed path, in bulk):
        'other' or 'unseen' by the membership filter. Strings looked up are also added to
        the typed path's `lookup` (within the memo's bound), so repeats stay in C."""
        codes = np.fromiter(map(self.get, values, repeat(_NOT_FOUND)), np.int32, len(values))
        new = np.flatnonzero(codes == _NOT_FOUND)
        if new.size:    # not met before: the filter tested for all of them at once
            fresh = [values[i] for i in new.tolist()]
            keys = list(dict.fromkeys(v for v in fresh if type(v) is str))
            found = dict.fromkeys(keys, self.unseen)
            if keys and self.seen is not None:
                seen = self.seen.contains_many(keys)
                found = dict(zip(keys, np.where(seen, self.other, self.unseen).tolist(),
                                 strict=True))
            codes[new] = [found.get(v, self.unseen) if type(v) is str else self.unseen
                          for v in fresh]
            for key in keys[:max(self._MEMO - self._memo, 0)]:  # as `__missing__` does
                self[key] = found[key]
                self._memo += 1
        if lookup is not None and self._memo < self._MEMO:
            lookup.update((v, c) for v, c in zip(values, codes.tolist(), strict=True)
                          if type(v) is str)
        return codes

    @property
    def int_keyed(self) -> bool:
        """Whether the categories are integers spelled as strings ("1", "2", ...): then the
        typed decoder takes JSON integers for this column, and otherwise JSON booleans
        (a dict cannot tell True from 1, so one column takes one of the two)."""
        cats = [k for k in self if type(k) is str]
        return bool(cats) and all(_canonical_int(k) for k in cats)

    def fast_lookup(self) -> dict:
        """category (or alias) -> code for the typed path: booleans or integers map to
        the category they are counted under (`category_key`), UNSET to the absent marker,
        anything else is left out so that `dict.get(v, _NOT_FOUND)` finds it unknown."""
        out = {k: v for k, v in self.items() if type(k) is str}
        if self.int_keyed:
            out.update((int(k), v) for k, v in list(out.items()))
        else:
            for flag in (True, False):
                if category_key(flag) in out:
                    out[flag] = out[category_key(flag)]
        out[None] = self.missing
        out[msgspec.UNSET] = _ABSENT_CODE
        return out


def _canonical_int(s: str) -> bool:
    try:
        return str(int(s)) == s
    except ValueError:
        return False


@dataclass
class Column:
    """How one value column (feature, prediction or label) is read."""

    name: str
    kind: str                           # numeric | categorical
    codes: CategoryCodes | None = None  # categorical only
    lookup: dict | None = None          # the typed path's lookup (CategoryCodes.fast_lookup)


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
        self.cat_codes = [CategoryCodes(reference.features[n].categories,
                                        reference.features[n].seen) for n in self.categorical]
        self.expected = frozenset(reference.features)  # ignored features are expected too
        self.prediction = _column("prediction", reference.prediction)
        self.label = _column("label", reference.label)
        self._num_get = _getter(self.numeric)
        self._cat_get = _getter(self.categorical)
        self._fast_codes = [codes.fast_lookup() for codes in self.cat_codes]
        # numeric columns that have carried a null: packed by `_packer` as truth values,
        # their nulls found among the false ones, then packed again as float64
        self._nullable: set[int] = set()
        self._packers: dict[int, struct.Struct] = {}   # `_packer`, per number of rows
        # the order of the feature keys in events (`learn_key_order`); None: not known yet
        self.key_order: tuple[str, ...] | None = None
        # categorical features whose every training category is in the reference's list
        # (no 'other'): `event_type(literal=True)` decodes them as a Literal of those
        self._closed = {j: tuple(reference.features[n].categories)
                        for j, (n, c) in enumerate(zip(self.categorical, self.cat_codes,
                                                       strict=True))
                        if reference.features[n].other == 0 and not c.int_keyed}
        # outcome fields the label join does not need for this model (set by the
        # pipeline): the typed decoder skips them like unknown keys, they stay None
        self.outcome_skip: frozenset[str] = frozenset()

    def event_type(self, fields: FieldMapping, outcomes: bool = False,
                   literal: bool = False) -> type:
        """A msgspec Struct that decodes this model's well-formed events in one C call.

        Every valid value decodes here: numbers (integers too) or null for numeric
        features, strings, null and booleans (integers where the reference's categories
        are integers) for categorical ones; an absent numeric key decodes as the
        `ABSENT_NAN` marker, an absent categorical key as UNSET. Unknown feature names are
        refused (so such events take the slow path, which records them as a schema
        change), as are wrong types, which the slow path rejects with their reason.

        With `literal`, the categorical features of `_closed` take only the reference's
        categories (a `Literal`): msgspec then returns its own string objects, so no
        string is made or freed per value and the code lookup finds them by identity
        with their hash cached. An event with another category fails that type and is
        decoded again by the type without `literal` (`Decoder._typed_chunk`).
        """
        unset = msgspec.UnsetType
        closed = self._closed if literal else {}

        def category_type(codes: CategoryCodes, j: int = -1):
            if j in closed:
                return Union[Literal[closed[j]], bool, None, unset]  # noqa: UP007
            return (str | int | None | unset) if codes.int_keyed else (
                str | bool | None | unset)

        spec = [(f"n{i}", float | None, ABSENT_NAN) for i in range(len(self.numeric))]
        spec += [(f"c{i}", category_type(c, i), msgspec.UNSET)
                 for i, c in enumerate(self.cat_codes)]
        spec += [(f"i{i}", Any, msgspec.UNSET) for i in range(len(self.expected) - len(spec))]
        names = self.numeric + self.categorical + sorted(
            self.expected - set(self.numeric) - set(self.categorical))
        # Fields in the order producers write the keys (`key_order`, learned from an
        # event), the others after them: msgspec looks a key up from the field after the
        # last one found, so in that order each key is found at once. Measured on 25
        # features: 1.26 vs 1.52 us an event to decode against alphabetical order.
        rank = {k: i for i, k in enumerate(self.key_order or ())}
        perm = sorted(range(len(spec)), key=lambda i: rank.get(names[i], len(rank)))
        spec, names = [spec[i] for i in perm], [names[i] for i in perm]
        where = {j: pos for pos, j in enumerate(perm)}    # column -> field position
        n_num, n_cat = len(self.numeric), len(self.categorical)
        self._num_pos = [where[j] for j in range(n_num)]
        self._cat_pos = [where[n_num + j] for j in range(n_cat)]
        self._kinds = ["n" if j < n_num else "c" if j < n_num + n_cat else "i" for j in perm]
        self._packers.clear()
        features = msgspec.defstruct(
            f"{self.model}_features", spec, rename=dict(zip([f[0] for f in spec], names,
                                                            strict=True)),
            forbid_unknown_fields=True, gc=False)

        def column_type(column: Column | None):
            if column is None:
                return Any
            if column.kind == "numeric":
                return float | None
            return category_type(column.codes)

        # field order matters: `_struct_columns` reads the fields by position
        event = msgspec.defstruct(
            f"{self.model}_event",
            [("features", features),
             ("ts", float | str | None, None),
             ("prediction", column_type(self.prediction), None),
             ("label", column_type(self.label), None),
             ("model_version", str | int | None, None)]
            # scores and segment stay raw JSON (parsed only for the few events that get
            # a label), which keeps the join's decoding cost to a few slices per event;
            # the fields of `outcome_skip` are left out (their keys are skipped like any
            # unknown key): two fewer values per event to make, flatten and free
            + ([f for f in (("event_id", str | int | None, None), ("scores", msgspec.Raw, None),
                            ("segment", msgspec.Raw, None)) if f[0] not in self.outcome_skip]
               if outcomes else []),
            rename={"features": fields.features, "ts": fields.ts,
                    "prediction": fields.prediction, "label": fields.label,
                    # without the label join only the last event's version is used,
                    # read from its message (`Decoder._version_of`): no string per event
                    "model_version": fields.model_version if outcomes
                    else "__unused_model_version__",
                    **({k: getattr(fields, k) for k in OUTCOME_EXTRAS
                        if k not in self.outcome_skip} if outcomes else {})},
            tag_field=fields.model, tag=self.model, gc=False)
        self._n_fields = len(spec)
        return event

    @property
    def feature_names(self) -> list[str]:
        return self.numeric + self.categorical

    def learn_key_order(self, raw: bytes, features_key: str) -> None:
        """Remember the order of the feature keys in this event (once): `event_type`
        orders its fields so. Nothing learned (an empty order) when it cannot be read."""
        try:
            feats = orjson.loads(raw).get(features_key)
        except (orjson.JSONDecodeError, AttributeError):
            feats = None
        known = self.expected
        self.key_order = tuple(k for k in feats if k in known) if type(feats) is dict else ()

    @staticmethod
    def _select(positions: list[int]) -> slice | np.ndarray:
        """Rows of the packed fields for these positions: a slice (a view) when they are
        consecutive, else an index (a copy)."""
        if positions == list(range(positions[0], positions[0] + len(positions))):
            return slice(positions[0], positions[0] + len(positions))
        return np.array(positions, np.intp)

    def _packer(self, rows: int) -> struct.Struct:
        """Packs `rows` flattened feature structs (`event_type`'s field order, categorical
        values already replaced by their codes) in one C call, eight bytes a field:
        numeric fields as float64 ('d': a float keeps its bits, NaN payloads included),
        category codes as int64 ('q'), any other field as a one-byte truth value ('?'
        takes any object) and padding. A numeric field that carries nulls is packed as
        its truth value too (None is false: the few false ones are the candidate nulls,
        `_struct_columns`). The chunk's numeric and categorical matrices are then views
        of the packed bytes (field by row, event by column). A null where a 'd' is raises
        struct.error. Measured: 0.30 vs 0.40 us an event for 20 columns by slices and
        `np.fromiter`; codes packed here vs `np.fromiter` over the looked-up codes, 6 vs
        13 ns a value."""
        packer = self._packers.get(rows)
        if packer is None:
            if len(self._packers) >= 16:    # chunk sizes seen: a few; keep it bounded
                self._packers.clear()
            nullable = {self._num_pos[j] for j in self._nullable}
            row = "".join("?7x" if k != "c" and (k == "i" or pos in nullable)
                          else "d" if k == "n" else "q" for pos, k in enumerate(self._kinds))
            packer = self._packers[rows] = struct.Struct("<" + row * rows)
            self._num_rows = self._select(self._num_pos) if self._num_pos else None
            self._cat_rows = self._select(self._cat_pos) if self._cat_pos else None
        return packer


def _column(name: str, profile: Any) -> Column | None:
    if profile is None:
        return None
    if isinstance(profile, CategoricalProfile):
        return Column(name, "categorical", CategoryCodes(profile.categories, profile.seen))
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
    """The usable events of one model in one batch, as columns.

    Data-quality facts are kept per event (row), like the values, so that cutting the
    batch at a window boundary (`take`) gives each window the faults of its own events.
    """

    model: str
    positions: np.ndarray               # int64, input line numbers or offsets
    ts: np.ndarray                      # float64 epoch seconds (NaN when absent)
    numeric: np.ndarray                 # (n, n_numeric) float64, NaN = missing
    categorical: np.ndarray             # (n, n_categorical) int32 codes
    prediction: np.ndarray | None = None
    label: np.ndarray | None = None
    # (n, n_features) bool: the feature's key was absent from the event; None = none was
    absent_rows: np.ndarray | None = None
    # (n, n_features) int: values of the wrong type. A rejected event has no row: its
    # violations are carried by the next kept event of the batch (the last one at the end)
    violation_rows: np.ndarray | None = None
    # (n,) object: the names of fields the reference does not know, or None per event
    unexpected_rows: np.ndarray | None = None
    # rejected events' (positions, violation rows), until `Decoder.decode` gives them to
    # the next kept event
    dropped: tuple[np.ndarray, np.ndarray] | None = None
    model_version: str | None = None
    raw: list[bytes] = field(default_factory=list)  # message bytes, kept for late rejects
    # per-event raw values for the label join (performance monitoring on): lists keyed by
    # OUTCOME_KEYS, parallel to the rows; None when the decoder does not extract them. The
    # typed path keeps the event ids as `JoinedIds` and leaves out "prediction" when the
    # numeric `prediction` column holds them: `outcome_lists` gives every field as a list
    outcomes: dict[str, Any] | None = None
    # what the typed decoder knows of the outcomes, gathered while they are in the CPU
    # cache: (the distinct model versions, every prediction a float: True / False / None
    # unknown); None when not known (rows of the per-event path)
    outcome_facts: tuple[set, bool | None] | None = None
    # (n, n_numeric) int64: each numeric value's slot in the engine's counts (its bin, or
    # its column's missing slot), set by the engine once per batch and shared with the
    # sequential detectors; None until then
    slots: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.positions.size)

    @property
    def n_features(self) -> int:
        return int(self.numeric.shape[1] + self.categorical.shape[1])

    @property
    def absent(self) -> np.ndarray:
        """Per feature: events whose key was absent."""
        if self.absent_rows is None:
            return np.zeros(self.n_features, np.int64)
        return self.absent_rows.sum(axis=0, dtype=np.int64)

    @property
    def type_violations(self) -> np.ndarray:
        """Per feature: values that had a wrong type."""
        if self.violation_rows is None:
            return np.zeros(self.n_features, np.int64)
        return self.violation_rows.sum(axis=0, dtype=np.int64)

    @property
    def unexpected_events(self) -> int:
        """Events carrying fields not in the reference."""
        if self.unexpected_rows is None:
            return 0
        return int(np.count_nonzero(self.unexpected_rows != None))  # noqa: E711

    @property
    def unexpected_names(self) -> Counter:
        """How often each unexpected field name was seen (at most 50 distinct names)."""
        names: Counter = Counter()
        if self.unexpected_rows is not None:
            for extra in self.unexpected_rows:
                if extra and len(names) < _MAX_UNEXPECTED_NAMES:
                    names.update(extra)
        return names

    def take(self, index: np.ndarray | slice) -> ModelBatch:
        """A sub-batch (a window's share), with the data-quality facts of its events."""

        def rows(x):
            return None if x is None else x[index]

        return ModelBatch(
            model=self.model, positions=self.positions[index], ts=self.ts[index],
            numeric=self.numeric[index], categorical=self.categorical[index],
            prediction=rows(self.prediction), label=rows(self.label),
            absent_rows=rows(self.absent_rows), violation_rows=rows(self.violation_rows),
            unexpected_rows=rows(self.unexpected_rows), model_version=self.model_version,
            slots=rows(self.slots))


class _TypedColumns:
    """One model's columns of a batch on the typed path, filled chunk by chunk.

    The arrays are allocated once per batch, column-major (each column contiguous, the
    engine's layout), so the chunks need no joining and the engine no transposing copy.
    Absent categorical values keep the `_ABSENT_CODE` marker until the batch is taken.
    """

    def __init__(self, schema: ModelSchema, cap: int, outcomes: bool):
        self.schema = schema
        self.numeric = np.empty((len(schema.numeric), cap), np.float64)
        self.categorical = np.empty((len(schema.categorical), cap), np.int32)
        self.ts = np.empty(cap, np.float64)
        self.positions = np.empty(cap, np.int64)
        self.prediction: np.ndarray | None = None
        self.label: np.ndarray | None = None
        self.raw: list[bytes] = []
        self.outcomes = {k: [] for k in OUTCOME_KEYS} if outcomes else None
        self.version: Any = None
        self.versions: set = set()   # distinct model versions (outcomes only)
        # the outcomes kept compact, so that the chunk's per-event objects are freed while
        # in the CPU cache (`add_outcomes`): event ids per chunk, rare fields' values
        self.id_parts: list[str | list] = []
        # per chunk, (rows, its one version or the list of its versions): the batch's
        # list is made once by `_outcomes` (a list grown chunk by chunk is reallocated
        # and copied at every chunk)
        self.version_parts: list[tuple[int, Any]] = []
        self.rare: dict[str, list[tuple[int, list]]] = {k: [] for k in _RARE_OUTCOMES}
        self.fill = 0

    def put(self, name: str, lo: int, hi: int, values: np.ndarray | None) -> None:
        """Rows lo..hi-1 of an optional column (prediction, label)."""
        if values is None:
            return
        col = getattr(self, name)
        if col is None:
            col = np.empty(self.positions.size, values.dtype)
            setattr(self, name, col)
        col[lo:hi] = values

    def add_outcomes(self, outcomes: dict[str, list], lo: int, hi: int) -> None:
        """A chunk's outcome fields (rows lo..hi-1, rejected events left out), kept so
        that few of its objects outlive the chunk: the event ids as one string with a
        NUL between them (when they are strings without a NUL: `JoinedIds`), only the
        chunks that have a label, scores or segment, one version object for every row
        when the chunk has one version, and no prediction list when the numeric
        `prediction` column holds the predictions (`outcome_lists` makes it)."""
        n = hi - lo
        if not n:
            return
        versions = outcomes["model_version"]
        first = versions[0]
        if versions.count(first) == n:  # one version (the usual case): one object
            self.versions.add(first)
            self.version_parts.append((n, first))
        else:
            self.versions.update(versions)
            self.version_parts.append((n, versions))
        if "prediction" in outcomes:
            self.outcomes["prediction"] += outcomes["prediction"]
        for k in _RARE_OUTCOMES:
            values = outcomes.get(k)   # absent: not decoded (`outcome_skip`), all None
            if values is not None and values.count(None) != n:
                self.rare[k].append((lo, values))
        ids = outcomes["event_id"]
        try:
            text = "\x00".join(ids)    # TypeError: an id that is not a string
        except TypeError:
            text = None
        self.id_parts.append(ids if text is None or text.count("\x00") != n - 1 else text)

    def _outcomes(self, n: int) -> dict[str, Any]:
        """The batch's outcome fields (`add_outcomes`'s parts put together)."""
        out = self.outcomes
        pred = self.schema.prediction
        if pred is not None and pred.kind == "numeric":
            del out["prediction"]   # the column holds them (`outcome_lists`)
        if len(self.versions) == 1:    # one version in the batch: one list, made at once
            out["model_version"] = [next(iter(self.versions))] * n
        else:
            out["model_version"] = list(chain.from_iterable(
                repeat(v, k) if type(v) is not list else v for k, v in self.version_parts))
        for k, parts in self.rare.items():
            col = [None] * n
            for at, values in parts:
                col[at:at + len(values)] = values
            out[k] = col
        parts = self.id_parts
        if all(type(p) is str for p in parts):
            out["event_id"] = JoinedIds("\x00".join(parts), n)
        else:
            out["event_id"] = list(chain.from_iterable(
                p.split("\x00") if type(p) is str else p for p in parts))
        return out

    def drop(self, lo: int, hi: int, keep: np.ndarray) -> int:
        """Keep only the rows lo..hi-1 marked in `keep`; returns the new end."""
        end = lo + int(keep.sum())
        for rows in (self.numeric, self.categorical):
            rows[:, lo:end] = rows[:, lo:hi][:, keep]
        for col in (self.ts, self.positions, self.prediction, self.label):
            if col is not None:
                col[lo:end] = col[lo:hi][keep]
        return end

    def batch(self) -> ModelBatch | None:
        """The filled rows as a `ModelBatch` (None when every event was rejected)."""
        n = self.fill
        if n == 0:
            return None
        numeric, categorical = self.numeric[:, :n], self.categorical[:, :n]
        absent_num = numeric.view(np.uint64) == _ABSENT_BITS
        absent_cat = categorical == _ABSENT_CODE
        absent_rows = None
        if absent_cat.any():
            for j, codes in enumerate(self.schema.cat_codes):
                categorical[j, absent_cat[j]] = codes.missing
            absent_rows = np.concatenate([absent_num, absent_cat]).T
        elif absent_num.any():
            absent_rows = np.concatenate([absent_num, absent_cat]).T
        version = self.version
        prediction = None if self.prediction is None else self.prediction[:n]
        facts = outcomes = None
        if self.outcomes is not None:  # typed numeric predictions are floats or None (NaN)
            pred = self.schema.prediction
            facts = (self.versions,
                     bool(not np.isnan(prediction).any()) if pred is not None
                     and pred.kind == "numeric" else False if pred is not None else None)
            outcomes = self._outcomes(n)
        return ModelBatch(model=self.schema.model, positions=self.positions[:n],
                          ts=self.ts[:n], numeric=numeric.T, categorical=categorical.T,
                          prediction=prediction,
                          label=None if self.label is None else self.label[:n],
                          absent_rows=absent_rows,
                          model_version=None if version is None else str(version),
                          raw=self.raw, outcomes=outcomes, outcome_facts=facts)


class JoinedIds:
    """A typed batch's event ids as one string, a NUL between two ids (none holds one):
    the decoder keeps them so, so that each id's string is freed while in the CPU cache;
    the label join hashes them from this string (`join._joined_keys`). `tolist()` gives
    the ids back."""

    __slots__ = ("text", "n")

    def __init__(self, text: str, n: int):
        self.text, self.n = text, n

    def __len__(self) -> int:
        return self.n

    def tolist(self) -> list[str]:
        return self.text.split("\x00") if self.n else []


def outcome_lists(batch: ModelBatch) -> dict[str, list] | None:
    """`batch.outcomes` with every field a list of the events' values, as the per-event
    path gives them: the typed path's event ids (`JoinedIds`) split, and its predictions,
    when the numeric `prediction` column holds them (floats, NaN for null), made from it."""
    out = batch.outcomes
    if out is None or ("prediction" in out and type(out["event_id"]) is not JoinedIds):
        return out
    out = dict(out)
    if type(out["event_id"]) is JoinedIds:
        out["event_id"] = out["event_id"].tolist()
    if "prediction" not in out:
        col = batch.prediction
        out["prediction"] = [None] * len(batch) if col is None else [
            None if v != v else v for v in col.tolist()]
    return out


def _feature_codes(lookup: dict, codes: CategoryCodes, col: list) -> Sequence[int]:
    """Category codes of a typed feature column, as Python ints (for `_packer`): one
    C-level dict lookup per value; the unknown ones resolved by `codes`, absent ones left
    as `_ABSENT_CODE`."""
    if len(col) > 1:
        try:    # every value known (the common case): one C call for all the lookups
            return itemgetter(*col)(lookup)
        except KeyError:
            pass
    # 24 vs 45 ns a value, but `get` gives the unknown ones a code
    out = np.fromiter(map(lookup.get, col, repeat(_NOT_FOUND)), np.int32, len(col))
    unknown = np.flatnonzero(out == _NOT_FOUND)
    if unknown.size:
        out[unknown] = codes.unknown([col[i] for i in unknown.tolist()], lookup)
    return out.tolist()


@functools.lru_cache(maxsize=16)
def _doubles(n: int) -> struct.Struct:
    """Packs n floats to float64 in one C call (6 ns a value; `np.array` over a list of
    floats, 16)."""
    return struct.Struct(f"<{n}d")


def _floats(values: list) -> np.ndarray | None:
    """A list of floats as float64 in one C call; None when a value is not a float (a
    null, a string): the caller's general path then handles the list."""
    try:
        return np.frombuffer(_doubles(len(values)).pack(*values), np.float64)
    except struct.error:
        return None


@dataclass
class DecodedBatch:
    models: dict[str, ModelBatch]
    rejects: list[Reject]
    messages: int
    # events of models still collecting their baseline: (position, event, raw bytes)
    pending: dict[str, list[tuple[int, dict, bytes]]] = field(default_factory=dict)
    # per model: type violations of rejected events after its last kept event (summed per
    # feature), for the model's next kept event, in a later batch (`pipeline.Monitor`)
    carry: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return sum(len(b) for b in self.models.values())


class Decoder:
    """Turns batches of raw messages into per-model columnar batches."""

    def __init__(self, schemas: dict[str, ModelSchema], config: DecodeConfig):
        self.schemas = schemas
        self.config = config
        self.pending: set[str] = set()  # models whose reference is still being collected
        self.typed = True  # False: every event through the per-event path (tests compare)
        self.outcomes = False  # also extract OUTCOME_KEYS per event (the label join)
        # models whose events failed their Literal type too often (`_LITERAL_MISSES`):
        # decoded by the plain type only from then on
        self._plain: set[str] = set()
        self._misses: Counter = Counter()  # per model, in the current batch
        f = config.fields
        self._model_key, self._features_key, self._ts_key = f.model, f.features, f.ts
        self._version_key, self._pred_key, self._label_key = f.model_version, f.prediction, f.label
        self._version_of = msgspec.json.Decoder(msgspec.defstruct(
            "_version", [("model_version", Any, None)], rename={"model_version": f.model_version}
        )).decode

    def _fast_decoder(self):
        """The typed decoder and its struct types (type -> model). Models with closed
        categorical features (`ModelSchema._closed`) are decoded with their `literal`
        type first; `self._general` (None when no model has one) is the decoder of the
        plain types, for the events with a category outside the reference."""
        models = sorted(self.schemas)
        key = (*models, self.outcomes,
               tuple(sorted(self.schemas[m].outcome_skip) for m in models),
               tuple(sorted(self._plain)), tuple(self.schemas[m].key_order for m in models))
        if getattr(self, "_fast_key", None) != key:
            fields = self.config.fields
            plain = {self.schemas[m].event_type(fields, self.outcomes): m for m in models}
            literal = {self.schemas[m].event_type(fields, self.outcomes, literal=True): m
                       for m in models
                       if self.schemas[m]._closed and m not in self._plain}
            # msgspec treats the tag of a lone tagged struct as optional; in a union it is
            # required, so a never-matching member keeps events without a model out. Its
            # one field takes no value (an int >= 1 and <= 0), so it never decodes: every
            # event the decoder returns is of a model's type (`_typed_chunk` relies on it)
            never = msgspec.defstruct(
                "_no_model", [("__never__", Annotated[int, msgspec.Meta(ge=1, le=0)])],
                tag_field=fields.model, tag="\x00never")

            def decoder(types):
                return msgspec.json.Decoder(Union[(*types, never)]).decode  # noqa: UP007

            general = decoder(plain)
            fast = {t: m for t, m in plain.items() if m not in literal.values()}
            fast.update(literal)
            self._fast = decoder(fast) if literal else general
            self._general = general if literal else None
            self._fast_types, self._fast_key = {**plain, **literal}, key
            # the model when there is one: an event decoded without error is then its
            self._single = models[0] if len(models) == 1 else None
        return self._fast, self._fast_types

    def decode(self, messages: Sequence[bytes], positions: Sequence[int]) -> DecodedBatch:
        """Decode a batch: typed C decoding for every valid event, the rest one by one."""
        if not self.schemas or not self.typed:
            return _settle(self._decode_slow(messages, positions))
        fast, types = self._fast_decoder()
        msgs = messages if type(messages) is list else list(messages)
        n = len(msgs)
        pos = (np.arange(positions.start, positions.stop, positions.step, dtype=np.int64)
               if type(positions) is range else np.asarray(positions, dtype=np.int64))
        if pos.shape != (n,):
            raise ValueError("decode: one position per message")
        max_bytes = self.config.max_message_bytes
        todo = msgs
        if n and max(map(len, msgs)) > max_bytes:  # too large: never parsed (slow path)
            todo = [m if len(m) <= max_bytes else b"" for m in msgs]
        builders: dict[str, _TypedColumns] = {}
        slow: list[int] = []
        deep: list[int] = []
        rejects: list[Reject] = []
        # Decode and build columns chunk by chunk: the objects msgspec creates are still
        # in the CPU cache when they are turned into columns, and freed memory is reused
        # hot by the next chunk (measured: 10-15% faster than one pass over 10,000). The
        # columns go straight into arrays allocated once per batch and model.
        for lo in range(0, n, _CHUNK):
            hi = min(lo + _CHUNK, n)
            evs, groups = self._typed_chunk(fast, types, todo, lo, hi, slow, deep)
            for model, index in groups:
                if index is None:
                    g_pos, g_evs, g_raw = pos[lo:hi], evs, msgs[lo:hi]
                else:
                    idx = index.tolist()
                    g_pos = pos[lo:hi][index]
                    g_evs = [evs[i] for i in idx]
                    g_raw = [msgs[lo + i] for i in idx]
                into = builders.get(model)
                if into is None:
                    into = builders[model] = _TypedColumns(self.schemas[model], n, self.outcomes)
                    if into.schema.key_order is None:   # the next batch decodes in it
                        into.schema.learn_key_order(g_raw[0], self._features_key)
                self._struct_columns(into, g_pos, g_evs, g_raw, rejects)
            del evs, groups
        if slow:
            out = self._decode_slow([msgs[i] for i in slow], pos[slow].tolist())
        else:
            out = DecodedBatch({}, [], 0)
        out.rejects += rejects
        out.rejects += [Reject(int(pos[i]), NOT_JSON, msgs[i], detail=TOO_DEEP) for i in deep]
        for model, misses in self._misses.items():
            if misses > n * _LITERAL_MISSES:    # a second decoding for too many events
                self._plain.add(model)
        self._misses.clear()
        for model, into in builders.items():
            batch = into.batch()
            if batch is None:
                continue
            other = out.models.get(model)
            out.models[model] = batch if other is None else _concat(batch, other)
        out.messages = n
        return _settle(out)

    def _typed_chunk(self, fast, types: dict, todo: list, lo: int, hi: int,
                     slow: list[int], deep: list[int]
                     ) -> tuple[list, list[tuple[str, np.ndarray | None]]]:
        """Decode messages lo..hi-1 with the typed decoder: the structs, and per model the
        indices of its events in the chunk (None: all of them); the indices in the batch
        of the messages it could not decode are added to `slow`, those nested too deep
        to decode at all to `deep`."""
        evs: list = []
        m = hi - lo
        # msgspec raises UnicodeDecodeError on invalid UTF-8 inside a string (the slow
        # path rejects it as not_json) and RecursionError on deep nesting
        errors = (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError)
        # One C-level map; a message that fails stops it, is set aside for the slow path,
        # and the map resumes after it, so a bad event costs time for itself only.
        general = self._general
        failed = False
        while len(evs) < m:
            try:
                evs.extend(map(fast, islice(todo, lo + len(evs), hi)))
            except errors:
                ev = None
                if general is not None:     # a category outside the reference's list?
                    try:
                        ev = general(todo[lo + len(evs)])
                        self._misses[types[type(ev)]] += 1
                    except errors:
                        pass
                    except RecursionError:
                        deep.append(lo + len(evs))
                failed = failed or ev is None
                evs.append(ev)
            except RecursionError:
                deep.append(lo + len(evs))
                evs.append(None)
                failed = True
        if not failed and self._single is not None:
            return evs, [(self._single, None)]  # one model, every event typed (44 ns an event)
        kinds = list(map(type, evs))
        model = types.get(kinds[0])
        if model is not None and kinds.count(kinds[0]) == m:
            return evs, [(model, None)]  # the common case: all typed, one model
        models = list(dict.fromkeys(types.values()))
        ids = {t: models.index(model) for t, model in types.items()}
        which = np.fromiter(map(ids.get, kinds, repeat(-1)), np.int64, m)
        if deep:
            which[[i - lo for i in deep if lo <= i < hi]] = -2
        slow += (np.flatnonzero(which == -1) + lo).tolist()
        return evs, [(model, np.flatnonzero(which == k)) for k, model in enumerate(models)
                     if (which == k).any()]

    def _struct_columns(self, into: _TypedColumns, positions: np.ndarray, evs: list,
                        raws: list[bytes], rejects: list[Reject]) -> None:
        """Columns from typed structs, written into the batch's arrays at `into.fill`: one
        C-level pass flattens the events and one their features, the category codes are
        written over the categorical values of that list, and one `struct.pack` turns the
        numeric values and the codes into the bytes that the chunk's numeric and
        categorical matrices are strided views of (`ModelSchema._packer`)."""
        schema = into.schema
        n = len(evs)
        raws_all = raws
        lo, hi = into.fill, into.fill + n
        n_num, n_cat = len(schema.numeric), len(schema.categorical)
        num_pos, cat_pos = schema._num_pos, schema._cat_pos     # field of each column
        astuple = msgspec.structs.astuple
        # event fields by position, as in `event_type` (one pass: three attribute getters
        # cost 25 ns an event each, a slice of this list 2)
        # the event type's fields: the five of the columns, then the outcome fields it
        # decodes (`ModelSchema.event_type`: those of `outcome_skip` are left out)
        names = type(evs[0]).__struct_fields__ if evs else ()
        nf = len(names) or 5
        top = list(chain.from_iterable(map(astuple, evs)))
        flat = list(chain.from_iterable(map(astuple, top[0::nf])))
        width = schema._n_fields
        bad = np.zeros(n, dtype=bool)
        reasons: dict[int, tuple[str, str]] = {}
        for lookup, codes, p in zip(schema._fast_codes, schema.cat_codes, cat_pos, strict=True):
            flat[p::width] = _feature_codes(lookup, codes, flat[p::width])
        numeric = into.numeric[:, lo:hi]
        categorical = into.categorical[:, lo:hi]
        nullable = schema._nullable
        packer = schema._packer(n)
        try:
            # every numeric value and code of the chunk in one C call (`_packer`)
            packed = packer.pack(*flat)
        except struct.error:    # a null in a column not known to carry nulls (yet)
            packed = None
        if packed is not None:
            fields = np.ndarray((width, n), np.float64, packed, 0, (8, 8 * width))
            if n_num:
                numeric[:] = fields[schema._num_rows]
            if n_cat:
                categorical[:] = fields.view(np.int64)[schema._cat_rows]
            for j in nullable:  # columns that carry nulls: packed as truth values
                p = num_pos[j]
                truth = np.ndarray(n, np.bool_, packed, 8 * p, 8 * width)
                for i in np.flatnonzero(~truth).tolist():   # None, or a zero
                    if flat[i * width + p] is None:
                        flat[i * width + p] = _NULL_NAN
                numeric[j] = np.frombuffer(_doubles(n).pack(*flat[p::width]), np.float64)
        else:           # the columns with a null become `nullable`: the next chunk packs
            for j, p in enumerate(num_pos):
                values = flat[p::width]
                if j not in nullable and None in values:
                    nullable.add(j)
                    schema._packers.clear()
                numeric[j] = np.array(values, np.float64)   # None -> NaN
            for j, p in enumerate(cat_pos):
                categorical[j] = flat[p::width]
        if n_num and np.isinf(numeric).any():
            for j, i in zip(*np.nonzero(np.isinf(numeric)), strict=True):
                self._invalid(int(i), NON_FINITE, f"{schema.numeric[j]}: {numeric[j, i]}", bad,
                              reasons)
                numeric[j, i] = np.nan
        del flat
        ts_values = top[1::nf]
        pred_values = None if schema.prediction is None else top[2::nf]
        label_values = None if schema.label is None else top[3::nf]
        into.put("prediction", lo, hi, self._struct_optional(schema.prediction, pred_values))
        into.put("label", lo, hi, self._struct_optional(schema.label, label_values))
        ts, values = into.ts[lo:hi], _floats(ts_values)
        if values is None:  # nulls or date strings: the general path
            ts[:] = self._timestamps(ts_values, bad, reasons)
        else:               # epoch seconds (the common case)
            ts[:] = values
            self._plausible(ts, bad, reasons)
        into.positions[lo:hi] = positions
        outcomes = None
        if self.outcomes:  # event fields by position, as in `event_type`
            # no prediction list when the numeric column holds them (`outcome_lists`)
            column = schema.prediction is not None and schema.prediction.kind == "numeric"
            # nor lists of the fields the event type does not decode (`outcome_skip`:
            # every value None; `add_outcomes` leaves them out)
            outcomes = {k: top[i::nf] for i, k in enumerate(names[2:], start=2)
                        if k != "prediction" or not column}
        if bad.any():
            keep = ~bad
            if outcomes is not None:
                outcomes = {k: [v for v, b in zip(vs, bad, strict=True) if not b]
                            for k, vs in outcomes.items()}
            for i in np.flatnonzero(bad):
                reason, detail = reasons[int(i)]
                rejects.append(Reject(int(positions[i]), reason, raws[i], model=schema.model,
                                      feature=detail.split(":", 1)[0], detail=detail))
            raws = [r for r, k in zip(raws, keep, strict=True) if k]
            hi = into.drop(lo, hi, keep)
        if hi > lo:     # the last event's model_version
            into.version = (top[4 - nf] if self.outcomes
                            else self._version_of(raws_all[-1]).model_version)
        into.raw += raws
        if outcomes is not None:  # while the chunk's objects are in the CPU cache
            into.add_outcomes(outcomes, lo, hi)
        into.fill = hi

    @staticmethod
    def _lookup(lookup: dict, codes: CategoryCodes, col: list, absent: np.ndarray) -> np.ndarray:
        """Category codes of a typed column: one C-level dict lookup per value, then the
        absent and unknown ones fixed up with numpy."""
        out = np.fromiter(map(lookup.get, col, repeat(_NOT_FOUND)), np.int32, len(col))
        if out.min(initial=0) < 0:
            np.equal(out, _ABSENT_CODE, out=absent)
            out[absent] = codes.missing
            unknown = np.flatnonzero(out == _NOT_FOUND)
            if unknown.size:
                out[unknown] = codes.unknown([col[i] for i in unknown.tolist()], lookup)
        return out

    @staticmethod
    def _struct_optional(column: Column | None, values: list) -> np.ndarray | None:
        if column is None:
            return None
        if column.kind == "numeric":
            out = _floats(values)   # all floats (the common case), else None -> NaN
            return np.array(values, dtype=np.float64) if out is None else out
        if column.lookup is None:
            column.lookup = column.codes.fast_lookup()
        return Decoder._lookup(column.lookup, column.codes, values, np.zeros(len(values), bool))

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
                rejects.append(_unparsable(pos, raw, exc, model_key, self._features_key))
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
        violations = np.zeros((len(group), n_num + n_cat), np.int64)  # per event, feature

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
        absent_rows = None
        if some_absent:
            absent_rows = np.array([[k not in f for k in schema.feature_names] for f in feats],
                                   dtype=bool).reshape(len(feats), n_num + n_cat)
        # This is the slow path (the typed decoder refuses unknown fields), so every event
        # is checked for fields the reference does not know.
        unexpected_rows = None
        expected = schema.expected
        for i, f in enumerate(feats):
            extra = f.keys() - expected
            if extra:
                if unexpected_rows is None:
                    unexpected_rows = np.full(len(feats), None, dtype=object)
                unexpected_rows[i] = tuple(str(k)[:100] for k in extra)
        violation_rows = violations if violations.any() else None

        version = group[-1][1].get(self._version_key)
        positions = all_positions = np.fromiter((g[0] for g in group), np.int64, len(group))
        raw = [g[2] for g in group]
        dropped = None
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
            absent_rows = None if absent_rows is None else absent_rows[keep]
            unexpected_rows = None if unexpected_rows is None else unexpected_rows[keep]
            if violation_rows is not None:
                dropped = (all_positions[bad], violation_rows[bad])
                violation_rows = violation_rows[keep]
        if positions.size == 0 and dropped is None:
            return None
        return ModelBatch(model=model, positions=positions, ts=ts, numeric=numeric,
                          categorical=categorical, prediction=prediction, label=label,
                          absent_rows=absent_rows, violation_rows=violation_rows,
                          unexpected_rows=unexpected_rows, dropped=dropped,
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
                violations[i, j] += 1
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
                violations[i, j] += 1
                self._invalid(i, WRONG_TYPE, f"{name}: expected a category, got {t.__name__}",
                              bad, reasons)
        return out

    def _optional(self, column: Column | None, group: list, key: str, bad: np.ndarray,
                  reasons: dict) -> np.ndarray | None:
        if column is None:
            return None
        col = tuple(g[1].get(key) for g in group)
        scratch = np.zeros((len(col), 1), np.int64)
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
            return self._plausible(np.array(col, dtype=np.float64), bad, reasons)
        if types == {str} and min(map(len, col)) >= 19:  # full date and time
            try:
                stamps = np.array([s[:-1] if s[-1:] == "Z" else s for s in col],
                                  dtype="datetime64[us]")
                if not np.isnat(stamps).any():
                    return self._plausible(stamps.astype(np.int64) / 1e6, bad, reasons)
            except ValueError:
                pass  # offsets like +02:00 or odd spellings: parse one by one below
        out = np.empty(len(col), np.float64)
        for i, v in enumerate(col):
            out[i] = parse_timestamp(v)
            if out[i] != out[i] and v is not None:
                self._invalid(i, BAD_TIMESTAMP, f"ts: cannot parse {str(v)[:40]!r}", bad, reasons)
                if self.config.invalid_values == "missing":
                    out[i] = np.nan
        return self._plausible(out, bad, reasons)

    def _plausible(self, ts: np.ndarray, bad: np.ndarray, reasons: dict) -> np.ndarray:
        """Reject event times outside [TS_MIN, TS_MAX) (and inf) as bad_timestamp."""
        with np.errstate(invalid="ignore"):
            out = ~((ts >= TS_MIN) & (ts < TS_MAX)) & ~np.isnan(ts)
        if out.any():
            for i in np.flatnonzero(out):
                self._invalid(int(i), BAD_TIMESTAMP, f"ts: {ts[i]:.6g} is outside the "
                              "plausible range 1970-01-01 .. 2100-01-01", bad, reasons)
                ts[i] = np.nan
        return ts


def _settle(decoded: DecodedBatch) -> DecodedBatch:
    """Give each rejected event's type violations to the next kept event of its model in
    the batch, so they count in that event's window; those after the model's last kept
    event go to `decoded.carry` (the next kept event is in a later batch: where batches
    end must not decide which window counts them); drop the batches left without any
    kept event."""
    for model, b in list(decoded.models.items()):
        if b.dropped is None:
            continue
        where, rows = b.dropped
        b.dropped = None
        to = np.searchsorted(b.positions, where)
        after = to >= len(b)
        if after.any():
            decoded.carry[model] = rows[after].sum(axis=0)
        if len(b) == 0:
            del decoded.models[model]
            continue
        if not after.all():
            if b.violation_rows is None:
                b.violation_rows = np.zeros((len(b), b.n_features), np.int64)
            np.add.at(b.violation_rows, to[~after], rows[~after])
    return decoded


def _join(parts: list[ModelBatch]) -> ModelBatch:
    """Consecutive pieces of one model's typed batch, in input order, as one batch."""

    def cat(name):
        xs = [getattr(p, name) for p in parts]
        if all(x is None for x in xs):
            return None
        if any(x is None for x in xs):  # rows facts: None means "none" for that piece
            proto = next(x for x in xs if x is not None)
            xs = [np.zeros((len(p), *proto.shape[1:]), proto.dtype) if x is None else x
                  for p, x in zip(parts, xs, strict=True)]
        return np.concatenate(xs)

    last = parts[-1]
    lists = [outcome_lists(p) for p in parts]
    return ModelBatch(
        model=last.model, positions=cat("positions"), ts=cat("ts"), numeric=cat("numeric"),
        categorical=cat("categorical"), prediction=cat("prediction"), label=cat("label"),
        absent_rows=cat("absent_rows"), violation_rows=cat("violation_rows"),
        unexpected_rows=cat("unexpected_rows"), dropped=None,
        model_version=last.model_version, raw=list(chain.from_iterable(p.raw for p in parts)),
        outcomes=None if last.outcomes is None else {
            k: list(chain.from_iterable(p[k] for p in lists)) for k in OUTCOME_KEYS},
        outcome_facts=None if any(p.outcome_facts is None for p in parts) else (
            set().union(*(p.outcome_facts[0] for p in parts)),
            None if any(p.outcome_facts[1] is None for p in parts) else
            all(p.outcome_facts[1] for p in parts)))


def _concat(a: ModelBatch, b: ModelBatch) -> ModelBatch:
    """Join the fast and slow parts of a model's batch, back in input order."""
    positions = np.concatenate([a.positions, b.positions])
    order = np.argsort(positions, kind="stable")

    def cat(x, y):
        return None if x is None or y is None else np.concatenate([x, y])[order]

    def rows(x, y, n_x, n_y, shape, fill):
        if x is None and y is None:
            return None
        x = np.full((n_x, *shape), fill) if x is None else x
        y = np.full((n_y, *shape), fill) if y is None else y
        return np.concatenate([x, y])[order]

    raw = a.raw + b.raw
    na, nb, nf = len(a), len(b), a.n_features
    out_a, out_b = outcome_lists(a), outcome_lists(b)
    return ModelBatch(
        model=a.model, positions=positions[order], ts=cat(a.ts, b.ts),
        numeric=cat(a.numeric, b.numeric), categorical=cat(a.categorical, b.categorical),
        prediction=cat(a.prediction, b.prediction), label=cat(a.label, b.label),
        absent_rows=rows(a.absent_rows, b.absent_rows, na, nb, (nf,), False),
        violation_rows=rows(a.violation_rows, b.violation_rows, na, nb, (nf,), 0),
        unexpected_rows=rows(a.unexpected_rows, b.unexpected_rows, na, nb, (), None),
        dropped=_join_dropped(a.dropped, b.dropped),
        model_version=b.model_version or a.model_version, raw=[raw[i] for i in order],
        outcomes=None if a.outcomes is None or b.outcomes is None else {
            k: [both[i] for i in order] for k in OUTCOME_KEYS
            for both in (out_a[k] + out_b[k],)})


def _unparsable(pos: int, raw: bytes, exc: Exception, model_key: str,
                features_key: str) -> Reject:
    """A message orjson refuses: non_finite when it is JSON but for NaN, Infinity or a
    number beyond float range (Python's json reads those), not_json otherwise."""
    import json
    detail = str(exc)[:200]
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return Reject(pos, NOT_JSON, raw, detail=detail)
    feature, model = None, None
    feats = doc.get(features_key) if type(doc) is dict else None
    if type(doc) is dict and type(doc.get(model_key)) is str:
        model = doc[model_key][:100]
    if type(feats) is dict:
        feature = next((str(k)[:100] for k, v in feats.items()
                        if type(v) is float and not math.isfinite(v)), None)
    return Reject(pos, NON_FINITE, raw, model=model, feature=feature,
                  detail=f"{feature or 'a value'}: NaN, Infinity or a number beyond the "
                         "float range")


def _join_dropped(a, b):
    if a is None or b is None:
        return a or b
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


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
