"""Performance: joined (prediction, label) pairs -> performance windows and findings.

Owns, per model: the join buffer (`join.JoinBuffer`), windows by count of joined labels
per model version, the reference performance, a sequential concept-drift detector on
the error stream, label shift, confidence-based estimates (CBPE) and segment slices.
Each closed window becomes one report (a `performance.jsonl` line); its findings go
through the same `AlertPolicy` as the drift findings (kinds `performance`,
`concept_drift`, `label_shift`), with a diagnosis that tells concept drift from data
drift and from pipeline faults using the policy's state of the model's input alerts.

Window statistics are exact and vectorised per window (`perfstats`); only the join and
the per-pair value conversion run per labelled event.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress, count, islice
from operator import attrgetter, itemgetter
from types import SimpleNamespace
from typing import Any

import numpy as np

from stream_monitor.alerting.policy import AlertPolicy, Finding, fingerprint
from stream_monitor.config import (
    Config,
    ConfigError,
    PerformanceConfig,
    Thresholds,
    performance_settings,
)
from stream_monitor.core import perfstats as ps
from stream_monitor.core.evaluate import SEVERITY_NAMES, _iso
from stream_monitor.core.join import JoinBuffer, LabelEvent, Pair, PairColumns, as_json
from stream_monitor.core.reference import (
    CategoricalProfile,
    NumericProfile,
    Reference,
    category_key,
)

CLASSIFICATION_METRICS = ("accuracy", "log_loss")
REGRESSION_METRICS = ("mae", "rmse", "mape")
HIGHER_IS_BETTER = {"accuracy"}
_POSITIVE_NAMES = ("1", "true", "yes", "positive", "pos")
_NEGATIVE_OF = {"1": "0", "true": "false", "yes": "no", "positive": "negative", "pos": "neg"}
MISSING_SEGMENT = "(missing)"
OTHER_SEGMENT = "(other)"
MAX_CLASSES = 100
_FIELDS = [itemgetter(i) for i in range(8)]  # the fields of a joined pair (join.Pair)
_MODEL = attrgetter("model")

# Input-side alert kinds the diagnosis reads from the policy: pipeline faults (retraining
# cannot fix them) and input drift.
PIPELINE_FAULTS = {
    "missing_values": ("feature_unavailable", "restore the upstream source of the feature "
                                              "(values are missing)"),
    "stuck_feature": ("stale_feature", "the feature is frozen at one value: fix the stale "
                                       "cache or failed lookup"),
    "schema_change": ("schema_change", "fields appeared or disappeared: fix the producer or "
                                       "rebuild the reference for the new schema"),
    "type_violations": ("schema_change", "values arrive with the wrong type: fix the producer"),
    "out_of_range": ("feature_recalibration", "a unit or scale change upstream: restore the "
                                              "feature's units"),
}
INPUT_DRIFT = ("feature_drift", "dataset_drift")


def performance_enabled(config: Config) -> bool:
    """Labels can arrive: a labels topic, or a model with a `performance` section."""
    return bool(config.topics.labels) or any(m.performance is not None
                                             for m in config.models.values())


def severity_of(value: float, thresholds: Thresholds | None) -> int:
    return 0 if thresholds is None or value != value else thresholds.severity(value)


@dataclass
class _RefStats:
    """The reference performance of a model, pooled over its first labelled windows."""

    windows: int = 0
    source: str = "first_windows"
    metric_sums: Counter = field(default_factory=Counter)
    metric_counts: Counter = field(default_factory=Counter)
    loss_n: int = 0
    loss_s1: float = 0.0
    loss_s2: float = 0.0
    label_k: Counter = field(default_factory=Counter)   # class index -> count
    label_n: int = 0
    pred_pos: int = 0
    label_s1: float = 0.0
    label_s2: float = 0.0
    segments: dict = field(default_factory=dict)         # (field, value) -> [n, correct]
    file_rate: float | None = None                       # positive rate of the reference file
    file_n: int = 0
    file_ppr: float | None = None

    def metrics(self) -> dict[str, float]:
        return {k: self.metric_sums[k] / self.metric_counts[k] for k in self.metric_sums
                if self.metric_counts[k]}

    @property
    def loss_mean(self) -> float:
        return self.loss_s1 / self.loss_n if self.loss_n else math.nan

    @property
    def loss_var(self) -> float:
        if self.loss_n < 2:
            return 0.0
        m = self.loss_mean
        return max(self.loss_s2 / self.loss_n - m * m, 0.0)


class _Window:
    """An open performance window: its pairs as blocks of columns (`PairColumns`, one
    per batch of labels), `n` pairs in all."""

    def __init__(self, blocks: list[PairColumns] | None = None, index: int = 0):
        self.blocks: list[PairColumns] = blocks or []
        self.n = sum(map(len, self.blocks))
        self.index = index

    def __getattr__(self, name: str) -> Any:
        # a snapshot of the older format (kafka/state.py restores attributes as they were
        # saved): the pairs as a list of tuples, made blocks at the first use
        legacy = self.__dict__.get("pairs")
        if name in ("blocks", "n") and legacy is not None:
            del self.__dict__["pairs"]
            self.blocks = [PairColumns.from_pairs(legacy)] if legacy else []
            self.n = len(legacy)
            return getattr(self, name)
        raise AttributeError(name)

    @property
    def pairs(self) -> list[Pair]:
        """The window's pairs as tuples (to read; the window keeps columns)."""
        return PairColumns.concat(self.blocks).pairs()

    def __deepcopy__(self, memo: dict) -> _Window:
        # the per-batch checkpoint: blocks are never changed once made (their parsed
        # scores and segment dicts are only read), so the list of blocks is copied, not
        # the up to `window` pairs in them
        return _Window(list(self.blocks), self.index)


class ModelPerformance:
    """Join buffer, performance windows, reference, detector and segments of one model."""

    def __init__(self, model: str, settings: PerformanceConfig, reference: Reference | None,
                 where: str = ""):
        self.model = model
        self.s = settings
        self.buffer = JoinBuffer(settings.join)
        self.buffer.keep_segment = bool(settings.segments.fields)
        self.reference = reference
        self.task = settings.task if settings.task != "auto" else _task_from(reference)
        self.classes: dict[str, int] = {}
        self.positive: int | None = None
        self.metric = settings.metric
        if self.metric is not None:
            allowed = CLASSIFICATION_METRICS + REGRESSION_METRICS
            if self.metric not in allowed:
                raise ConfigError([f"{where}performance.metric: unknown metric {self.metric!r} "
                                   f"(expected one of {', '.join(allowed)})"])
        self.windows: dict[str | None, _Window] = {}
        self.ref = _RefStats()
        self.detector = None
        self.file_reference = getattr(reference, "performance", None)
        self.segment_ref_windows = 0
        self.ref_errors: list[np.ndarray] = []  # reference windows' errors (regression)
        self.ref_error_scale = 1.0
        self.segment_values: dict[str, dict[str, None]] = {f: {} for f in settings.segments.fields}
        self.segments_cut = 0
        self.lags: list[np.ndarray] = []     # label lags joined since the last report
        self.labels_total = 0                # joined labels (for retraining triggers)
        # label lags not yet exported as metrics: arrays per batch (a checkpoint copies
        # them as buffers, not as up to 100,000 float objects)
        self.fresh_lags: list[np.ndarray] = []
        self.fresh_lag_count = 0
        self.estimate_windows: dict[str | None, dict] = {}  # CBPE over all predictions

    def add_estimates(self, ts: Any, outcomes: dict[str, list],
                      values: np.ndarray | None = None, distinct: set | None = None,
                      floats: bool | None = None) -> list[dict[str, Any]]:
        """CBPE over all predictions, labelled or not: windows of `estimate_window` events.

        Applies to binary models whose prediction is the positive-class probability (a
        float in [0, 1]); vectorised per batch. `values`: the predictions as a float
        array when every one is a float (the decoder's column), else None; `distinct`: the
        set of the model versions, when the caller has it; `floats`: whether every
        prediction is a float, when the caller knows. Returns the estimate reports that
        closed.
        """
        if not self.s.estimate or self.task != "classification":
            return []
        if values is None:
            preds = outcomes["prediction"]
            if floats is False or not preds or set(map(type, preds)) != {float}:
                return []
            values = np.array(preds, float)
        p = values
        if not p.size or p.min() < 0.0 or p.max() > 1.0:
            return []
        versions = outcomes.get("model_version") or [None] * len(p)
        t = np.asarray(ts, float)
        out = []
        size = self.s.estimate_window
        distinct = set(versions) if distinct is None else distinct
        # in a stable order: the reports of a batch of several versions do not depend on
        # the process's string hashing
        for version in sorted(distinct, key=lambda v: (v is not None, str(v), repr(v))):
            sel = slice(None) if len(distinct) == 1 else np.array(
                [v == version for v in versions])
            key = None if version is None else str(version)
            acc = self.estimate_windows.setdefault(key, {"p": [], "ts": [], "n": 0,
                                                         "index": 0})
            acc["p"].append(p[sel])
            acc["ts"].append(t[sel])
            acc["n"] += int(p[sel].size)
            while acc["n"] >= size:
                # one part (a batch of the window's size, the usual case): no copy
                allp, allt = ((acc["p"][0], acc["ts"][0]) if len(acc["p"]) == 1 else
                              (np.concatenate(acc["p"]), np.concatenate(acc["ts"])))
                w, rest = allp[:size], allp[size:]
                wt, rt = allt[:size], allt[size:]
                acc["p"], acc["ts"], acc["n"] = [rest], [rt], int(rest.size)
                out.append({"model": self.model, "model_version": key, "type": "estimate",
                            "window": {"index": acc["index"], "start": _iso(_nanmin(wt)),
                                       "end": _iso(_nanmax(wt)), "predictions": int(w.size)},
                            "estimated": {"accuracy": float(np.maximum(w, 1 - w).mean()),
                                          "roc_auc": _f(ps.expected_roc_auc(w)),
                                          "predicted_positive_rate": float(
                                              (w >= self.s.threshold).mean())}})
                acc["index"] += 1
        return out

    def drain_lags(self) -> list[float]:
        lags, self.fresh_lags, self.fresh_lag_count = self.fresh_lags, [], 0
        return np.concatenate(lags).tolist() if lags else []

    # -- joining ------------------------------------------------------------------

    def add_pairs(self, pairs: list[Pair] | PairColumns
                  ) -> list[tuple[str | None, PairColumns, int]]:
        """Route joined pairs (tuples, or columns) to their version's window; return the
        windows that filled: (version, pairs as `PairColumns`, window index)."""
        if not len(pairs):
            return []
        pc = pairs if type(pairs) is PairColumns else PairColumns.from_pairs(pairs)
        n = len(pc)
        # raw JSON of scores and segment (see join.py), parsed for joined pairs only
        if pc.scores is not None or pc.segment is not None:
            pc = PairColumns(pc.position, pc.pred_ts, pc.label_ts, pc.version, pc.prediction,
                             None if pc.scores is None else list(map(as_json, pc.scores)),
                             None if pc.segment is None else list(map(as_json, pc.segment)),
                             pc.label)
        pos = pc.position
        if n > 1 and (pos[1:] < pos[:-1]).any():  # in input order (a stable sort)
            pc = pc.take(np.argsort(pos, kind="stable"))
        self.labels_total += n
        lag = pc.label_ts - pc.pred_ts
        lag = lag[~np.isnan(lag)]
        if lag.size:  # arrays, not floats: a checkpoint copies them as buffers
            self.lags.append(lag)
        if self.fresh_lag_count < 100_000:  # drained per batch by the metrics
            self.fresh_lags.append(lag)
            self.fresh_lag_count += int(lag.size)
        versions = dict.fromkeys(pc.version)
        if len(versions) == 1:  # one model version (the common case): whole slices
            (version,) = versions
            return [(version, part, index) for _, part, index in self._fill(version, pc)]
        # several versions: the windows close in the order of the pairs that fill them
        rows: dict[Any, list[int]] = {}
        for i, v in enumerate(pc.version):
            rows.setdefault(v, []).append(i)
        filled = []
        for version, at in rows.items():
            idx = np.array(at, np.int64)
            for last, part, index in self._fill(version, pc.take(idx)):
                filled.append((int(idx[last]), version, part, index))
        filled.sort(key=itemgetter(0))
        return [(version, part, index) for _, version, part, index in filled]

    def _fill(self, version: Any, pc: PairColumns) -> list[tuple[int, PairColumns, int]]:
        """Add one version's pairs to its window; the windows that filled, each with the
        index in `pc` of the pair that filled it."""
        w = self.windows.get(version)
        if w is None:
            w = self.windows[version] = _Window()
        size = self.s.window
        before = w.n
        w.blocks.append(pc)
        w.n += len(pc)
        if w.n < size:
            return []
        allc = PairColumns.concat(w.blocks)
        out, start = [], 0
        while w.n - start >= size:
            out.append((start + size - 1 - before, allc.take(slice(start, start + size)),
                        w.index))
            start += size
            w.index += 1
        w.blocks = [allc.take(slice(start, None))] if start < w.n else []
        w.n -= start
        return out

    def flush(self) -> list[tuple[str | None, PairColumns, int]]:
        out = []
        for version, w in self.windows.items():
            if w.n >= self.s.min_labels:
                out.append((version, PairColumns.concat(w.blocks), w.index))
                w.blocks, w.n = [], 0
                w.index += 1
        return out

    # -- value conversion -----------------------------------------------------------

    def _class(self, key: str) -> int:
        idx = self.classes.get(key)
        if idx is None:
            if len(self.classes) >= MAX_CLASSES:
                key = OTHER_SEGMENT
                idx = self.classes.get(key)
                if idx is not None:
                    return idx
            idx = self.classes[key] = len(self.classes)
        return idx

    def _settle_task(self, pairs: PairColumns) -> None:
        if self.task is None:
            labels, preds = pairs.label[:200], pairs.prediction[:200]
            scored = pairs.scores is not None and any(
                isinstance(s, dict) for s in pairs.scores[:200])
            cat = any(isinstance(v, str | bool) for v in labels + preds)
            ints = all(isinstance(v, int) or (isinstance(v, float) and v.is_integer())
                       for v in labels)
            few = len({category_key(v) for v in labels}) <= 20
            self.task = "classification" if cat or scored or (ints and few) else "regression"
        if self.metric is None:
            self.metric = "accuracy" if self.task == "classification" else "mae"
        if self.task == "classification" and self.metric not in CLASSIFICATION_METRICS or (
                self.task == "regression" and self.metric not in REGRESSION_METRICS):
            raise ConfigError([f"models.{self.model}.performance.metric: {self.metric!r} does "
                               f"not apply to a {self.task} model"])

    def _settle_classes(self, pairs: list, cols: list | None = None) -> None:
        """Fix the class space and the positive class at the first window. `cols`: the
        pairs transposed (`_columns`), when already done."""
        if self.classes:
            return
        known: dict[str, int] = {}
        for prof in (self.reference.label if self.reference else None,
                     self.reference.prediction if self.reference else None):
            if isinstance(prof, CategoricalProfile):
                for c, n in zip(prof.categories, prof.counts, strict=True):
                    known[c] = known.get(c, 0) + int(n)
        # the label vocabulary defines the classes (scores keyed otherwise, e.g.
        # {"churn": p, "stay": 1 - p} beside 0/1 labels, are not mapped onto them)
        try:
            # every prediction a float (the common case): none of them names a class
            # below, so the labels alone, each distinct (type, value) once in first-seen
            # order: the same keys in the same order as the loop, 2,000 calls fewer
            labels = cols[7] if cols is not None and set(map(type, cols[4])) == {float} else None
            distinct = None if labels is None else dict.fromkeys(
                zip(map(type, labels), labels, strict=True))
        except TypeError:  # an unhashable label (a JSON list or object)
            distinct = None
        if distinct is not None:
            for _, v in distinct:
                known.setdefault(category_key(v), 0)
        else:
            for lab, pred in (zip(cols[7], cols[4], strict=True) if cols is not None else
                              ((p[7], p[4]) for p in pairs)):
                known.setdefault(category_key(lab), 0)
                if not _is_probability(pred) and pred is not None and type(pred) is not float:
                    known.setdefault(category_key(pred), 0)
        positive = self.s.positive
        if positive is None and len(known) <= 2:
            named = [c for c in _POSITIVE_NAMES if c in known]
            if named:
                positive = named[0]
            elif len(known) == 2:
                a, b = sorted(known, key=lambda c: (known[c], c))
                positive = a  # the rarer class in the reference
            elif known:
                positive = next(iter(known))
        if positive is not None:
            others = [c for c in known if c != positive]
            negative = others[0] if others else _NEGATIVE_OF.get(positive, "__negative__")
            self.classes = {negative: 0, positive: 1}
            self.positive = 1
            for c in others[1:]:
                self._class(c)
            if len(self.classes) > 2:
                self.positive = None if self.s.positive is None else 1
        else:
            for c in sorted(known):
                self._class(c)

    def _classification_arrays(self, pairs: list, cols: list | None = None
                               ) -> dict[str, np.ndarray]:
        """Class indices of truth and prediction, and the probability matrix, per pair.

        Column-wise (C-level transposition, list comprehensions only where a value needs
        a look) and numpy, not a Python loop with per-row logic: this runs for every
        joined label. `cols`: the pairs transposed (`_columns`), when already done.
        """
        n, pos, cls = len(pairs), self.positive, self._class
        cols = cols or _columns(pairs)
        preds = cols[4]
        none = cols[5].count(None) == n
        scores = [None] * n if none else [s if type(s) is dict else None for s in cols[5]]
        y = _class_codes(cols[7], cls)
        all_floats = pos is not None and bool(preds) and set(map(type, preds)) == {float}
        if all_floats:
            # all floats (the common case), vectorised: an integral one that names a
            # class is that class, every other one in [0, 1] a score
            q = np.array(preds, np.float64)
            is_prob = (q >= 0.0) & (q <= 1.0)
            whole = np.flatnonzero(is_prob & (q == np.floor(q)))
            for i in whole.tolist():
                is_prob[i] = category_key(preds[i]) not in self.classes
        elif pos is not None:  # a float in [0, 1] that is not one of the classes is a score
            names = self.classes
            is_prob = np.fromiter((type(v) is float and 0.0 <= v <= 1.0 and (
                not v.is_integer() or category_key(v) not in names) for v in preds), bool, n)
        else:
            is_prob = np.zeros(n, bool)
        # scores count only when keyed by the label classes
        if not none:
            scores = [s if s is not None and not self.classes.keys().isdisjoint(s) else None
                      for s in scores]
        has_scores = np.zeros(n, bool) if none else np.fromiter(
            (s is not None for s in scores), bool, n)
        k = len(self.classes)
        proba = np.full((n, k), np.nan)
        if has_scores.any():
            rows = np.flatnonzero(has_scores)
            scored = [scores[i] for i in rows]
            for c, j in self.classes.items():
                col = np.array([_prob(s.get(c)) for s in scored], float)
                proba[rows, j] = col
            if pos is not None and k == 2:  # one class scored: the other is its complement
                sub = proba[rows]
                for j in (0, 1):
                    miss = np.isnan(sub[:, j]) & ~np.isnan(sub[:, 1 - j])
                    sub[miss, j] = 1.0 - sub[miss, 1 - j]
                proba[rows] = sub
            proba[rows] = np.where(np.isnan(proba[rows]) & ~np.isnan(proba[rows]).all(
                axis=1, keepdims=True), 0.0, proba[rows])
        if all_floats and is_prob.all():
            # every prediction a score (the usual binary stream): columns, not masks
            proba[:, pos] = q
            proba[:, 1 - pos] = 1.0 - q
            yhat = np.where(q >= self.s.threshold, pos, 1 - pos).astype(np.int64, copy=False)
            rest = np.flatnonzero(~is_prob)
        else:
            if is_prob.any():
                q = q[is_prob] if all_floats else np.array(
                    [preds[i] for i in np.flatnonzero(is_prob)], float)
                proba[is_prob, pos] = q
                proba[is_prob, 1 - pos] = 1.0 - q
            yhat = np.empty(n, np.int64)
            if is_prob.any():
                yhat[is_prob] = np.where(proba[is_prob, pos] >= self.s.threshold, pos, 1 - pos)
            rest = np.flatnonzero(~is_prob)
        if rest.size:
            named = [preds[i] for i in rest]
            have = np.fromiter((v is not None for v in named), bool, rest.size)
            yhat[rest[have]] = np.fromiter(
                map(cls, map(category_key, (v for v in named if v is not None))), np.int64,
                int(have.sum()))
            if not have.all():  # no prediction field: the highest score
                idx = rest[~have]
                filled = np.nan_to_num(proba[idx], nan=-1.0)
                yhat[idx] = filled.argmax(axis=1) if filled.shape[1] else 0
        if proba.shape[1] < len(self.classes):  # classes met while converting predictions
            proba = np.column_stack([proba, np.full((n, len(self.classes) - proba.shape[1]),
                                                    np.nan)])
            proba[has_scores | is_prob] = np.nan_to_num(proba[has_scores | is_prob])
        return {"y": y, "yhat": yhat, "proba": proba}

    # -- one window -----------------------------------------------------------------

    def _compute(self, pairs: list | PairColumns, cols: list | None = None) -> tuple:
        """(metrics, per-event loss of the alert metric, per-event error, y, yhat, proba)."""
        if cols is None:
            cols = _columns(pairs)
        if self.task == "classification":
            self._settle_classes(pairs, cols)
            arr = self._classification_arrays(pairs, cols)
            y, yhat, proba = arr["y"], arr["yhat"], arr["proba"]
            if proba.shape[1] < len(self.classes):  # classes met while converting
                proba = np.column_stack([proba, np.full((len(pairs), len(self.classes)
                                                        - proba.shape[1]), np.nan)])
            metrics = ps.classification_metrics(y, yhat, proba, len(self.classes), self.positive)
            if self.metric == "log_loss":
                have = ~np.isnan(proba).any(axis=1)
                loss = -np.log(np.clip(proba[have, y[have]], ps.EPS, 1.0))
            else:
                loss = (y != yhat).astype(float)
            return metrics, loss, (y != yhat).astype(float), y, yhat, proba
        y = np.array([_number(v) for v in cols[7]], float)
        yhat = np.array([_number(v) for v in cols[4]], float)
        metrics = ps.regression_metrics(y, yhat)
        ok = ~(np.isnan(y) | np.isnan(yhat))
        err = np.abs(yhat - y)[ok]
        if self.metric == "rmse":
            loss = err ** 2
        elif self.metric == "mape":
            nz = y[ok] != 0
            loss = err[nz] / np.abs(y[ok][nz])
        else:
            loss = err
        return metrics, loss, err, y, yhat, None

    def _apply_file_reference(self) -> None:
        """Take the reference performance from the reference file, when it fits this model."""
        fr, self.file_reference = self.file_reference, None
        if not fr or fr.get("task") != self.task or fr.get("metric") != self.metric:
            return
        if self.task == "classification" and fr.get("positive") != _name(self.classes,
                                                                           self.positive):
            return
        r = self.ref
        r.windows, r.source = self.s.reference_windows, "reference_file"
        for k, v in fr["metrics"].items():
            if isinstance(v, int | float) and k != "scored":
                r.metric_sums[k], r.metric_counts[k] = float(v), 1
        r.loss_n, r.loss_s1, r.loss_s2 = fr["loss"]
        r.label_n = int(fr["label_n"])
        if self.task == "classification":
            r.label_k = Counter({self._class(c): int(n) for c, n in fr["labels"].items()})
            r.pred_pos = int(fr.get("predicted_positive", 0))
        else:
            r.label_s1, r.label_s2 = fr["label_moments"]
            self.ref_error_scale = fr.get("error_q99") or 1.0
        self._start_detector()

    def evaluate(self, version: str | None, pairs: list | PairColumns, index: int
                 ) -> tuple[dict[str, Any], list[tuple[str, Finding, dict]]]:
        """The report of one closed window and its findings (scope, finding, extra).
        `pairs`: the window's pairs, as columns (`add_pairs`) or tuples."""
        if type(pairs) is not PairColumns:
            pairs = PairColumns.from_pairs(pairs)
        self._settle_task(pairs)
        cols = _columns(pairs)
        pts, lts, positions = pairs.pred_ts, pairs.label_ts, pairs.position
        report: dict[str, Any] = {
            "model": self.model, "model_version": version, "task": self.task,
            "window": {"index": index, "start": _iso(_nanmin(pts)), "end": _iso(_nanmax(pts)),
                       "labels": len(pairs), "label_start": _iso(_nanmin(lts)),
                       "label_end": _iso(_nanmax(lts)),
                       "first_line": int(positions.min()) if positions.size else None,
                       "last_line": int(positions.max()) if positions.size else None},
        }
        metrics, loss, errors, y, yhat, proba = self._compute(pairs, cols)
        if proba is not None and self.s.estimate:
            est = ps.cbpe(proba, yhat, self.positive)
            if est:
                report["estimated"] = est
                report["estimation_gap"] = {
                    k: (est[k] - metrics[k]) for k in ("accuracy", "roc_auc")
                    if est.get(k) is not None and metrics.get(k) is not None}
        self._apply_file_reference()
        report["metrics"] = metrics
        report["alert_metric"] = self.metric
        findings: list[tuple[str, Finding, dict]] = []
        in_reference = self.ref.windows < self.s.reference_windows
        seg = self._segments(pairs, y, yhat) if self.s.segments.fields else None
        if in_reference:
            self._add_reference(metrics, loss, y, yhat)
            report["reference"] = None
            report["reference_source"] = "pending"
            report["severity"] = "ok"
        else:
            findings += self._performance_finding(report, metrics, loss)
            findings += self._concept_drift(report, errors)
        ls = self._label_shift(report, y, yhat, in_reference)
        if ls:
            findings.append(ls)
        if seg is not None:
            # segment references always come from the first windows (the reference file
            # has no segments)
            report["segments"] = self._segment_report(seg)
            if self.segment_ref_windows < self.s.reference_windows:
                self.segment_ref_windows += 1
                for key, (n, correct, *_rest) in seg["cells"].items():
                    cell = self.ref.segments.setdefault(key, [0, 0])
                    cell[0] += n
                    cell[1] += correct
            else:
                findings += self._segment_findings(report, seg)
        if in_reference and self.task == "regression":
            self.ref_errors.append(errors)
        if in_reference and self.ref.windows == self.s.reference_windows:
            if self.ref_errors:
                q = float(np.quantile(np.concatenate(self.ref_errors), 0.99))
                self.ref_error_scale = q if q > 0 else 1.0
                self.ref_errors = []
            self._start_detector()
        report["join"] = self.join_counters()
        if self.lags:
            lag = np.hstack(self.lags)  # arrays per batch (floats in older snapshots)
            report["label_lag"] = {"p50": float(np.median(lag)), "p95": float(
                np.quantile(lag, 0.95)), "max": float(lag.max())}
            self.lags = []  # lags of the pairs joined since the previous report
        return report, findings

    def join_counters(self) -> dict[str, Any]:
        b = self.buffer
        return {"joined": b.joined, "waiting_predictions": len(b.predictions),
                "waiting_labels": len(b.labels), "unjoined": dict(b.unjoined),
                "oldest_prediction_age": b.oldest_prediction_age()}

    # -- reference ------------------------------------------------------------------

    def _add_reference(self, metrics, loss, y, yhat) -> None:
        r = self.ref
        r.windows += 1
        for k, v in metrics.items():
            if v is not None and k != "scored":
                r.metric_sums[k] += v
                r.metric_counts[k] += 1
        r.loss_n += loss.size
        r.loss_s1 += float(loss.sum())
        r.loss_s2 += float((loss ** 2).sum())
        if self.task == "classification":
            values, counts = np.unique(y, return_counts=True)
            r.label_k.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))
            r.label_n += y.size
            if self.positive is not None:
                r.pred_pos += int((yhat == self.positive).sum())
        else:
            ok = y[~np.isnan(y)]
            r.label_n += ok.size
            r.label_s1 += float(ok.sum())
            r.label_s2 += float((ok ** 2).sum())

    def _performance_finding(self, report, metrics, loss) -> list:
        r = self.ref
        ref_metrics = r.metrics()
        report["reference"] = ref_metrics
        report["reference_source"] = r.source
        cur, ref = metrics.get(self.metric), ref_metrics.get(self.metric)
        severity, drop, rel, p = 0, None, None, None
        if cur is not None and ref is not None:
            drop = ref - cur if self.metric in HIGHER_IS_BETTER else cur - ref
            rel = drop / abs(ref) if ref else math.inf if drop > 0 else 0.0
            # the per-event loss is higher in this window than in the reference?
            p = ps.mean_test_p(loss.size, float(loss.mean()) if loss.size else 0.0,
                               float(loss.var()) if loss.size else 0.0,
                               r.loss_n, r.loss_mean, r.loss_var)
            if p < self.s.significance:
                severity = max(severity_of(drop, self.s.drop.absolute if self.metric in (
                    "accuracy", "log_loss") else None), severity_of(rel, self.s.drop.relative))
        report["drop"] = drop
        report["relative_drop"] = rel
        report["p_value"] = p
        report["severity"] = SEVERITY_NAMES[severity]
        thr = self.s.drop.relative or self.s.drop.absolute
        f = Finding("performance", self.model, None, severity, self.metric,
                    cur if cur is not None else 0.0,
                    (ref or 0.0) - thr.warning if self.metric in HIGHER_IS_BETTER else
                    (ref or 0.0) + thr.warning)
        return [("performance", f, {"reference_value": ref, "drop": drop,
                                    "relative_drop": rel})]

    # -- concept drift ----------------------------------------------------------------

    def _start_detector(self) -> None:
        kind = self.s.concept_drift
        if kind == "off":
            return
        if kind in ("ddm", "hddm_a") and self.task != "classification":
            kind = "adwin"
        self.detector_kind = kind
        # river.drift imports scipy.stats (~1.5 s): only when labels are joined, so that
        # `run` and `replay` without performance monitoring start fast
        from river import drift as river_drift
        self.detector = {
            "adwin": lambda: river_drift.ADWIN(delta=self.s.drift_delta),
            "page_hinkley": lambda: river_drift.PageHinkley(delta=0.005, threshold=50.0),
            "ddm": lambda: river_drift.binary.DDM(),
            "hddm_a": lambda: river_drift.binary.HDDMA(drift_confidence=self.s.drift_delta),
        }[kind]()

    def _concept_drift(self, report, errors: np.ndarray) -> list:
        if self.detector is None:
            return []
        detected = False
        if self.task == "regression":
            # ADWIN's bound is for values in [0, 1]: absolute errors in units of the
            # reference's 99th percentile error, capped, so heavy tails cannot trip it
            values = np.minimum(errors / self.ref_error_scale, 1.0).tolist()
        else:
            values = errors.tolist()
        detected = feed_detector(self.detector, values)
        mean_err = float(errors.mean()) if errors.size else math.nan
        ref_err = self._reference_error()
        worse = mean_err > ref_err
        # With scores, the model's own confidence says what accuracy to expect on these
        # inputs (CBPE). A covariate shift moves both figures together; only realized
        # accuracy falling below the expectation means the input-outcome relation moved.
        est = (report.get("estimated") or {}).get("accuracy")
        real = report["metrics"].get("accuracy")
        unexplained = True
        if est is not None and real is not None and errors.size:
            se = math.sqrt(max(real * (1 - real), 1e-6) / errors.size)
            unexplained = est - real > max(0.02, 3 * se)
            report.setdefault("concept_drift", {})["expected_accuracy"] = est
        severity = 1 if detected and worse and unexplained else 0
        report["concept_drift"] = {**report.get("concept_drift", {}),
                                   "detector": self.detector_kind, "detected": detected,
                                   "error_rate" if self.task == "classification" else
                                   "mean_abs_error": mean_err, "reference": ref_err,
                                   "severity": SEVERITY_NAMES[severity]}
        f = Finding("concept_drift", self.model, None, severity, self.detector_kind, mean_err,
                    ref_err)
        return [("concept_drift", f, {})]

    def _reference_error(self) -> float:
        m = self.ref.metrics()
        if self.task == "classification":
            return 1.0 - m.get("accuracy", math.nan)
        return m.get("mae", math.nan)

    # -- label shift -----------------------------------------------------------------

    def _label_shift(self, report, y, yhat, in_reference: bool):
        r, cfg = self.ref, self.s.label_shift
        if self.task == "classification":
            if self.positive is None:
                counts = np.bincount(y, minlength=len(self.classes))
                rates = counts / max(y.size, 1)
                if in_reference or not r.label_n:
                    return None
                ref_rates = np.array([r.label_k.get(i, 0) for i in range(len(self.classes))],
                                     float) / r.label_n
                diff = np.abs(rates - ref_rates)
                c = int(diff.argmax())
                p = ps.proportion_test_p(int(counts[c]), y.size, int(r.label_k.get(c, 0)),
                                         r.label_n) * len(self.classes)
                rate, ref_rate, ppr, ref_ppr = float(rates[c]), float(ref_rates[c]), None, None
                method = f"class_rate:{_name(self.classes, c)}"
            else:
                k = int((y == self.positive).sum())
                rate = k / max(y.size, 1)
                ppr = float((yhat == self.positive).mean()) if yhat.size else None
                ref_rate, ref_n = self._reference_rate()
                ref_ppr = self._reference_ppr()
                if ref_rate is None:
                    report["label_shift"] = {"label_rate": rate, "predicted_positive_rate": ppr}
                    return None
                p = ps.proportion_test_p(k, y.size, round(ref_rate * ref_n), ref_n)
                method = "positive_rate"
            d = abs(rate - ref_rate)
            rel = d / ref_rate if ref_rate else math.inf if d else 0.0
            severity = max(severity_of(d, cfg.absolute), severity_of(rel, cfg.relative)) \
                if p < self.s.significance else 0
            info = {"label_rate": rate, "reference_label_rate": ref_rate,
                    "predicted_positive_rate": ppr, "reference_predicted_positive_rate": ref_ppr,
                    "method": method, "p_value": p, "severity": SEVERITY_NAMES[severity]}
            value, threshold = d, cfg.absolute.warning
        else:
            ok = y[~np.isnan(y)]
            mean = float(ok.mean()) if ok.size else math.nan
            ref_mean, ref_sd, ref_n = self._reference_label_moments()
            if ref_mean is None:
                report["label_shift"] = {"label_mean": mean}
                return None
            shift = abs(mean - ref_mean) / ref_sd if ref_sd else 0.0
            p = 2 * min(ps.mean_test_p(ok.size, mean, float(ok.var()), ref_n, ref_mean,
                                       ref_sd ** 2),
                        ps.mean_test_p(ref_n, ref_mean, ref_sd ** 2, ok.size, mean,
                                       float(ok.var())))
            severity = severity_of(shift, cfg.mean_shift) if p < self.s.significance else 0
            info = {"label_mean": mean, "reference_label_mean": ref_mean,
                    "label_std": float(ok.std()) if ok.size else None,
                    "reference_label_std": ref_sd, "prediction_mean": _f(np.nanmean(yhat)),
                    "method": "mean_shift", "value": shift, "p_value": p,
                    "severity": SEVERITY_NAMES[severity]}
            method, value, threshold = "mean_shift", shift, cfg.mean_shift.warning
        report["label_shift"] = info
        f = Finding("label_shift", self.model, None, severity, method, value, threshold)
        return ("label_shift", f, info)

    def _reference_rate(self) -> tuple[float | None, int]:
        """Positive-class rate of the reference file's labels, else the first windows'."""
        prof = self.reference.label if self.reference else None
        pos_key = _name(self.classes, self.positive)
        if isinstance(prof, CategoricalProfile) and prof.count and pos_key in prof.categories:
            n = int(prof.count)
            return float(prof.counts[prof.categories.index(pos_key)]) / n, n
        if self.ref.windows >= self.s.reference_windows and self.ref.label_n:
            return self.ref.label_k.get(self.positive, 0) / self.ref.label_n, self.ref.label_n
        return None, 0

    def _reference_ppr(self) -> float | None:
        prof = self.reference.prediction if self.reference else None
        pos_key = _name(self.classes, self.positive)
        if isinstance(prof, CategoricalProfile) and prof.count and pos_key in prof.categories:
            return float(prof.counts[prof.categories.index(pos_key)]) / prof.count
        if self.ref.windows >= self.s.reference_windows and self.ref.label_n:
            return self.ref.pred_pos / self.ref.label_n
        return None

    def _reference_label_moments(self) -> tuple[float | None, float, int]:
        prof = self.reference.label if self.reference else None
        if isinstance(prof, NumericProfile) and prof.count:
            return prof.mean, prof.std, int(prof.count)
        r = self.ref
        if r.windows >= self.s.reference_windows and r.label_n > 1:
            m = r.label_s1 / r.label_n
            return m, math.sqrt(max(r.label_s2 / r.label_n - m * m, 0.0)), r.label_n
        return None, 0.0, 0

    # -- segments --------------------------------------------------------------------

    def _segments(self, pairs: PairColumns, y: np.ndarray, yhat: np.ndarray
                  ) -> dict[str, Any]:
        """Per (field, value): n, correct, tp, fn, fp, tn, predicted positives."""
        cells: dict[tuple[str, str], list[int]] = {}
        pos = self.positive
        correct = (y == yhat) if self.task == "classification" else None
        segments = [None] * len(pairs) if pairs.segment is None else pairs.segment
        for fname, seen in self.segment_values.items():
            keys = []
            for seg in segments:
                v = seg.get(fname) if isinstance(seg, dict) else None
                key = MISSING_SEGMENT if v is None or isinstance(v, dict | list) else \
                    category_key(v)[:100]
                if key not in seen:
                    if len(seen) >= self.s.segments.max_values:
                        self.segments_cut += 1
                        key = OTHER_SEGMENT
                    else:
                        seen[key] = None
                keys.append(key)
            values, codes = np.unique(np.array(keys, dtype=object), return_inverse=True)
            k = len(values)
            n = np.bincount(codes, minlength=k)
            if correct is None:
                err = np.abs(yhat - y)
                mae = np.bincount(codes, np.nan_to_num(err), minlength=k)
                for j, v in enumerate(values):
                    cells[(fname, v)] = [int(n[j]), 0, float(mae[j])]
                continue
            ok = np.bincount(codes, correct, minlength=k)
            if pos is not None:
                yt, yp = y == pos, yhat == pos
                tp = np.bincount(codes, yt & yp, minlength=k)
                fn = np.bincount(codes, yt & ~yp, minlength=k)
                fp = np.bincount(codes, ~yt & yp, minlength=k)
            else:
                tp = fn = fp = np.zeros(k)
            for j, v in enumerate(values):
                cells[(fname, v)] = [int(n[j]), int(ok[j]), int(tp[j]), int(fn[j]), int(fp[j])]
        return {"cells": cells}

    def _segment_report(self, seg: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"fields": {}, "gaps": {}, "cut": self.segments_cut}
        minimum = self.s.segments.min_labels
        for (fname, value), cell in seg["cells"].items():
            n = cell[0]
            if self.task == "classification":
                n_, ok, tp, fn, fp = cell
                tn = n - tp - fn - fp
                fig = {"labels": n, "accuracy": ok / n if n else None,
                       "true_positive_rate": tp / (tp + fn) if tp + fn else None,
                       "false_positive_rate": fp / (fp + tn) if fp + tn else None,
                       "predicted_positive_rate": (tp + fp) / n if n else None}
            else:
                fig = {"labels": n, "mae": cell[2] / n if n else None}
            out["fields"].setdefault(fname, {})[value] = fig
        for fname, values in out["fields"].items():
            gaps = {}
            for metric in ("accuracy", "true_positive_rate", "false_positive_rate", "mae"):
                vals = [v[metric] for v in values.values()
                        if v["labels"] >= minimum and v.get(metric) is not None]
                if len(vals) >= 2:
                    gaps[metric] = max(vals) - min(vals)
            out["gaps"][fname] = gaps
        return out

    def _segment_findings(self, report, seg: dict[str, Any]) -> list:
        if self.task != "classification":
            return []
        minimum = self.s.segments.min_labels
        compared = [(key, cell) for key, cell in seg["cells"].items()
                    if cell[0] >= minimum and self.ref.segments.get(key, [0])[0] >= minimum]
        out = []
        for key, cell in compared:
            n, ok = cell[0], cell[1]
            rn, rok = self.ref.segments[key]
            acc, ref_acc = ok / n, rok / rn
            drop = ref_acc - acc
            rel = drop / ref_acc if ref_acc else 0.0
            p = ps.proportion_test_p(ok, n, rok, rn) * len(compared)
            severity = max(severity_of(drop, self.s.drop.absolute),
                           severity_of(rel, self.s.drop.relative)) \
                if p < self.s.significance and drop > 0 else 0
            f = Finding("performance", self.model, None, severity, "accuracy", acc,
                        ref_acc - (self.s.drop.absolute.warning if self.s.drop.absolute else 0))
            out.append((f"segment:{key[0]}={key[1]}", f,
                        {"segment": {key[0]: key[1]}, "reference_value": ref_acc, "drop": drop,
                         "relative_drop": rel, "labels": n}))
        return out


class PerformanceStage:
    """All models' `ModelPerformance`, alerting through the shared `AlertPolicy`."""

    def __init__(self, config: Config, policy: AlertPolicy):
        self.config = config
        self.policy = policy
        self.models: dict[str, ModelPerformance] = {}

    def add_model(self, name: str, reference: Reference | None) -> None:
        self.models[name] = ModelPerformance(name, performance_settings(self.config, name),
                                             reference, where=f"models.{name}.")

    def predictions(self, model: str, positions: Any, ts: Any, outcomes: dict[str, list],
                    values: np.ndarray | None = None) -> list:
        """Join a model's decoded predictions; returns the windows that filled."""
        mp = self.models.get(model)
        if mp is None:
            return []
        return mp.add_pairs(mp.buffer.add_predictions(positions, ts, outcomes, values))

    def observe(self, model: str, positions: Any, ts: Any, outcomes: dict[str, list],
                values: np.ndarray | None = None, distinct: set | None = None
                ) -> tuple[list[dict], list]:
        """A model's decoded predictions: the estimate windows (CBPE) that closed, and the
        performance windows that filled (`estimates` then `predictions`, with the model
        versions of the batch gathered once, or given as `distinct`). `values`: the
        predictions as a float array when every one is a float, else None."""
        mp = self.models.get(model)
        if mp is None:
            return [], []
        if distinct is None:
            versions = outcomes.get("model_version") or [None] * len(ts)
            distinct = set(versions)
        floats = values is not None
        estimates = mp.add_estimates(ts, outcomes, values, distinct, floats)
        pairs = mp.buffer.add_predictions(positions, ts, outcomes, values, distinct, floats)
        return estimates, mp.add_pairs(pairs)

    def estimates(self, model: str, ts: Any, outcomes: dict[str, list],
                  values: np.ndarray | None = None) -> list[dict]:
        """Estimate windows (CBPE over every prediction, before any label) that closed."""
        mp = self.models.get(model)
        return [] if mp is None else mp.add_estimates(ts, outcomes, values)

    def labels(self, events: list[LabelEvent], models: set | None = None
               ) -> tuple[dict[str, list], Counter]:
        """Join label events; returns closed windows per model and unknown-model counts.
        `models`: the set of the events' models, when the caller has it."""
        by_model: dict[str, list[LabelEvent]] = {}
        unknown: Counter = Counter()
        if models is None:
            models = set(map(_MODEL, events))
        if len(models) == 1 and next(iter(models)) in self.models:  # the common case
            by_model[next(iter(models))] = list(events)
            events = []
        for ev in events:
            if ev.model in self.models:
                by_model.setdefault(ev.model, []).append(ev)
            else:
                unknown[ev.model[:100]] += 1
        closed = {}
        for model, evs in by_model.items():
            mp = self.models[model]
            closed[model] = mp.add_pairs(mp.buffer.add_label_columns(evs))
        return closed, unknown

    def close(self, model: str, closed: list) -> tuple[list[dict], list[dict], list[dict]]:
        """Reports, alert events and window findings of the closed windows of a model."""
        mp = self.models[model]
        reports, alerts, states = [], [], []
        cfg = self.policy.config[model]
        for version, pairs, index in closed:
            report, findings = mp.evaluate(version, pairs, index)
            diagnosis = self.diagnose(model, findings)
            if diagnosis:
                report["diagnosis"] = diagnosis
            now = report["window"]["end"] or report["window"]["label_end"] or ""
            for scope, f, extra in findings:
                key = (model, f"{version}\x1f{scope}", f.kind)
                change, started = self.policy._step(key, f.severity, cfg, now)
                if change is None:
                    continue
                if change == "resolved":
                    f = Finding(f.kind, f.model, None, self.policy._resolved_severity, f.method,
                                f.value, f.threshold)
                alerts.append(self._event(f, change, report, diagnosis, started, version,
                                          scope, extra))
            states.append({"report": report, "findings": findings})
            reports.append(report)
        return reports, alerts, states

    def _event(self, f: Finding, change: str, report: dict, diagnosis, started: str,
               version: str | None, scope: str, extra: dict) -> dict[str, Any]:
        ev = self.policy._event(f, change, report, diagnosis if f.kind != "label_shift" else None,
                                started=started)
        ev["fingerprint"] = fingerprint(f.model, f"{version or ''}\x1f{scope}", f.kind)
        if version is not None:
            ev["labels"]["model_version"] = str(version)
        if "segment" in extra:
            (sf, sv), = extra["segment"].items()
            ev["labels"]["segment"] = f"{sf}={sv}"
            ev["segment"] = extra["segment"]
        for k in ("reference_value", "drop", "relative_drop", "label_rate",
                  "reference_label_rate", "predicted_positive_rate",
                  "reference_predicted_positive_rate", "label_mean", "reference_label_mean"):
            if k in extra:
                ev[k] = extra[k]
        win = report["window"]
        ev["window"] = {k: win[k] for k in ("start", "end", "labels", "first_line", "last_line")
                        if k in win}
        summary = ev["annotations"]["summary"]
        if f.kind == "label_shift" and "label_rate" in extra:
            ppr = extra.get("predicted_positive_rate")
            rppr = extra.get("reference_predicted_positive_rate")
            summary = (f"Label base rate of model {f.model} is {extra['label_rate']:.1%} against "
                       f"{extra['reference_label_rate']:.1%} in the reference; predicted "
                       f"positive rate {_pct(ppr)} against {_pct(rppr)}")
        elif "segment" in extra:
            summary = (f"Accuracy of model {f.model} in segment {ev['labels']['segment']} fell "
                       f"to {f.value:.1%} (reference {extra['reference_value']:.1%})")
        if change == "resolved" and not summary.startswith("Resolved"):
            summary = "Resolved: " + summary
        ev["annotations"]["summary"] = summary
        return ev

    def diagnose(self, model: str, findings: list) -> dict[str, Any] | None:
        """Why performance fell: a pipeline fault, data and concept drift, or concept drift."""
        perf = any(f.severity for _, f, _ in findings if f.kind in ("performance",
                                                                    "concept_drift"))
        if not perf:
            return None
        faults, drifted = fault_state(self.policy, model)
        if faults:
            cause, fix, feats = faults[0]
            return {"root_cause": cause, "explanation": f"a pipeline fault, not the model: {fix}",
                    "top_features": feats[:10], "pipeline_fault": True}
        label = any(f.severity for _, f, _ in findings if f.kind == "label_shift")
        concept = any(f.severity for _, f, _ in findings if f.kind == "concept_drift")
        if drifted and concept:
            return {"root_cause": "data_and_concept_drift",
                    "explanation": "the inputs drifted and the input-outcome relation moved "
                                   "too: realized performance is below what the scores expect",
                    "top_features": drifted[:10]}
        if drifted:
            return {"root_cause": "data_drift",
                    "explanation": "performance fell with an input drift that the model's "
                                   "scores anticipate (covariate shift; the relation held)",
                    "top_features": drifted[:10]}
        if label:
            return {"root_cause": "label_shift",
                    "explanation": "performance fell with the base rate of the target while "
                                   "inputs did not drift", "top_features": []}
        return {"root_cause": "concept_drift",
                "explanation": "performance fell while the inputs did not drift: the relation "
                               "between inputs and outcome changed", "top_features": []}


def reference_performance(predictions: list, labels: list, label_profile: Any = None,
                          minimum: int = 200) -> dict[str, Any] | None:
    """Realized performance of training data (predictions and labels), for the reference.

    Stored in the reference file so that a monitor compares its first windows with the
    model's known performance instead of learning it from them.
    """
    pairs = [(i, math.nan, math.nan, None, p, None, None, lab)
             for i, (p, lab) in enumerate(zip(predictions, labels, strict=True))
             if p is not None and lab is not None]
    if len(pairs) < minimum:
        return None
    ref = SimpleNamespace(label=label_profile, prediction=None)
    mp = ModelPerformance("reference", PerformanceConfig(), ref)
    pc = PairColumns.from_pairs(pairs)
    try:
        mp._settle_task(pc)
        metrics, loss, errors, y, yhat, _ = mp._compute(pc)
    except (ConfigError, ValueError, TypeError):
        return None
    out: dict[str, Any] = {"task": mp.task, "metric": mp.metric, "metrics": metrics,
                           "loss": [int(loss.size), float(loss.sum()),
                                    float((loss ** 2).sum())]}
    if mp.task == "classification":
        values, counts = np.unique(y, return_counts=True)
        out.update(positive=_name(mp.classes, mp.positive), label_n=int(y.size),
                   labels={_name(mp.classes, int(v)): int(c)
                           for v, c in zip(values, counts, strict=True)},
                   predicted_positive=int((yhat == mp.positive).sum())
                   if mp.positive is not None else 0)
    else:
        ok = y[~np.isnan(y)]
        out.update(label_n=int(ok.size), label_moments=[float(ok.sum()), float((ok ** 2).sum())],
                   error_q99=float(np.quantile(errors, 0.99)) if errors.size else None)
    return out


def fault_state(policy: AlertPolicy, model: str) -> tuple[list, list[str]]:
    """Firing pipeline faults [(cause, fix, features)] and drifted features of a model."""
    faults: dict[str, tuple[str, str, list[str]]] = {}
    drifted: list[str] = []
    for (m, feature, kind), st in policy.states.items():
        if m != model or not st.severity:
            continue
        if kind in PIPELINE_FAULTS:
            cause, fix = PIPELINE_FAULTS[kind]
            entry = faults.setdefault(kind, (cause, fix, []))
            if isinstance(feature, str) and "\x1f" not in feature:
                entry[2].append(feature)
        elif kind in INPUT_DRIFT and isinstance(feature, str) and "\x1f" not in feature:
            drifted.append(feature)
        elif kind == "dataset_drift":
            drifted.append("(dataset)")
    return [faults[k] for k in PIPELINE_FAULTS if k in faults], drifted


def feed_detector(detector: Any, values: list[float]) -> bool:
    """Update a river drift detector with each value; whether it detected a drift on any.

    River's ADWIN is a Python shell over a Rust window (`_helper.update(x)` returns the
    detection; the shell resets after a detection, at the next value): for it the values
    go to the Rust update through one C-level map that stops at each detection, instead
    of two Python calls per value (4x faster). The result and the detector's state are
    those of calling `update` per value (`tests/test_performance.py::
    test_fast_adwin_feed_is_the_per_value_update`). Other detectors: per value.
    """
    helper = getattr(detector, "_helper", None)
    if type(detector).__name__ != "ADWIN" or type(helper).__name__ != "AdaptiveWindowing":
        detected = False
        update = detector.update
        for v in values:
            update(v)
            if detector.drift_detected:
                detected = True
        return detected
    detected, i, n = False, 0, len(values)
    while i < n:
        if detector._drift_detected:  # as ADWIN.update does before the next value
            detector._reset()
        at = next(compress(count(i), map(detector._helper.update, islice(values, i, None))),
                  None)
        if at is None:
            detector._drift_detected = False
            break
        detector._drift_detected = detected = True
        i = at + 1
    return detected


def _task_from(reference: Reference | None) -> str | None:
    if reference is None:
        return None
    for prof in (reference.label, reference.prediction):
        if isinstance(prof, CategoricalProfile):
            return "classification"
    if isinstance(reference.label, NumericProfile):
        return "regression"
    return None


def _columns(pairs: list | PairColumns, fields: tuple[int, ...] = tuple(range(8))
             ) -> list[list | None]:
    """The pairs transposed: one list per field (position, prediction ts, label ts,
    version, prediction, scores, segment, label), each by a C-level map; only `fields`
    (the others None). From `PairColumns`: its lists (scores and segment as lists of
    None when it has none; the times and positions, arrays, are read from it)."""
    if type(pairs) is PairColumns:
        none = [None] * len(pairs)
        return [None, None, None, pairs.version, pairs.prediction,
                none if pairs.scores is None else pairs.scores,
                none if pairs.segment is None else pairs.segment, pairs.label]
    return [list(map(get, pairs)) if i in fields else None for i, get in enumerate(_FIELDS)]


def _class_codes(values: list, cls: Any) -> np.ndarray:
    """Class indices of values: `category_key` and `cls` once per distinct value (typed,
    so that True and 1 stay apart), then one C-level lookup per value."""
    if len(set(map(type, values))) == 1:  # one type: values that are equal are one class
        one = {v: cls(category_key(v)) for v in dict.fromkeys(values)}
        return np.fromiter(map(one.__getitem__, values), np.int64, len(values))
    typed = list(zip(map(type, values), values, strict=True))
    codes = {tv: cls(category_key(tv[1])) for tv in dict.fromkeys(typed)}
    return np.fromiter(map(codes.__getitem__, typed), np.int64, len(values))


def _is_probability(v: Any) -> bool:
    return type(v) is float and 0.0 <= v <= 1.0 and not v.is_integer()


def _prob(v: Any) -> float:
    return float(v) if type(v) in (int, float) else math.nan


def _number(v: Any) -> float:
    return float(v) if type(v) in (int, float) else math.nan


def _name(classes: dict[str, int], idx: int | None) -> str | None:
    for k, v in classes.items():
        if v == idx:
            return k
    return None


def _nanmin(a: np.ndarray) -> float | None:
    if not a.size:
        return None
    low = a.min()  # NaN-free (the usual case): the minimum, in one pass
    if low == low:
        return float(low)
    return float(np.nanmin(a)) if not np.isnan(a).all() else None


def _nanmax(a: np.ndarray) -> float | None:
    if not a.size:
        return None
    high = a.max()
    if high == high:
        return float(high)
    return float(np.nanmax(a)) if not np.isnan(a).all() else None


def _f(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"
