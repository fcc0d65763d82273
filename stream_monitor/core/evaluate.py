"""Evaluate: a closed window against the reference -> findings with severities.

Per numeric feature: PSI, Jensen-Shannon distance, KS statistic and p-value, mean
shift in reference standard deviations, variance ratio. Per categorical feature:
chi-square p-value, PSI, Jensen-Shannon distance, share of never-seen categories.
Data quality per feature, prediction drift, label shift, and the share of drifted
features.

False alarms across many features are controlled twice: a feature drifts only when
its effect size (the configured method, PSI by default) crosses the threshold AND its
two-sample test is significant at a Bonferroni-corrected level (family-wise
`significance` over the model's features). The effect size keeps huge windows from
flagging negligible changes; the test keeps small windows from flagging noise.

The data-quality rates (missing, schema, out_of_range, unseen_categories,
type_violations) follow the same rule: each is judged as an increase over the rate
the reference itself showed, flagged only when the increase crosses its threshold,
a one-sided binomial test against the reference rate is significant at the same
corrected level, and the window holds at least `min_events` trials for that check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_monitor.config import (
    DataQualityThresholds,
    DriftRule,
    FeatureSettings,
    ModelSettings,
    Thresholds,
)
from stream_monitor.core import stats
from stream_monitor.core.engine import (
    CategoricalColumns,
    CategoricalState,
    ClosedWindow,
    ModelLayout,
    NumericColumns,
    NumericState,
    WindowAccumulator,
)
from stream_monitor.core.reference import CategoricalProfile, NumericProfile, Reference

SEVERITY_NAMES = ("ok", "warning", "critical")


def _num(x: float) -> float | None:
    """JSON-friendly float: NaN/inf become null."""
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class ColumnInput:
    """The window's statistics of one column, sliced out of the group arrays."""

    counts: np.ndarray          # reference bins / categories (no missing slot)
    missing: int
    n: int


def numeric_scores(profile: NumericProfile, counts: np.ndarray, n: int, s1: float, s2: float,
                   shift: float, scale: float) -> dict[str, float]:
    """All drift scores of one numeric column; counts are over the reference bins."""
    ref = profile.counts
    d, p = stats.ks_from_counts(ref, counts)
    mean, var = stats.moments(n, s1, s2, shift=shift, scale=scale)
    return {
        "psi": stats.psi(ref, counts),
        "jensen_shannon": stats.js_distance(ref, counts),
        "ks": d, "ks_pvalue": p,
        "mean_shift": stats.mean_shift(profile.mean, profile.std, mean),
        "variance_ratio": stats.variance_ratio(profile.variance, var),
    }


def categorical_scores(profile: CategoricalProfile, counts: np.ndarray, other: int,
                       unseen: int) -> dict[str, float]:
    """Drift scores of one categorical column; counts per reference category.

    Values outside the top K, whether seen in training ("other") or not ("unseen"),
    are compared with the reference's "other" bucket; `unseen_share` counts only the
    values the reference never saw.
    """
    ref = np.append(profile.counts, profile.other)
    cur = np.append(counts, other + unseen)
    chi2, p = stats.chi_square_from_counts(ref, cur)
    ref_m, cur_m = stats.merge_sparse_cells(ref, cur)
    total = cur.sum()
    return {
        "psi": stats.psi(ref_m, cur_m),
        "jensen_shannon": stats.js_distance(ref_m, cur_m),
        "chi2": chi2, "chi2_pvalue": p,
        "unseen_share": unseen / total if total else math.nan,
    }


@dataclass(frozen=True)
class RateCheck:
    """A data-quality rate: ``hits`` of ``trials`` against the reference's ``expected``.

    ``value`` is what the thresholds judge (and what is reported): the increase over
    the reference rate for missing / schema / unseen_categories, the share itself for
    out_of_range / type_violations (whose reference rate is ~0).
    """

    hits: int
    trials: int
    expected: float
    excess: bool = True

    @property
    def value(self) -> float:
        if self.trials <= 0:
            return math.nan
        share = self.hits / self.trials
        return share - self.expected if self.excess else share

    def pvalue(self) -> float:
        return stats.binomial_excess_pvalue(self.hits, self.trials, self.expected)


def judge_quality(dq: DataQualityThresholds, checks: dict[str, RateCheck | float],
                  alpha: float, min_events: int) -> dict[str, Any]:
    """Severity of each data-quality check: threshold AND significance AND enough trials.

    A `RateCheck` is flagged only when its value crosses the threshold, its one-sided
    binomial p-value against the reference rate is below ``alpha`` (the corrected
    level drift uses) and it has at least ``min_events`` trials; a plain float (the
    `stuck` indicator, which applies its own minimum) is judged by threshold alone.
    """
    out = {}
    for check, c in checks.items():
        th: Thresholds = dq.for_check(check)
        if isinstance(c, RateCheck):
            value, p = c.value, c.pvalue()
            sev = th.severity(value) if c.trials >= min_events and p < alpha else 0
            out[check] = {"value": _num(value), "severity": SEVERITY_NAMES[sev],
                          "pvalue": _num(p)}
        else:
            sev = th.severity(c) if c == c else 0
            out[check] = {"value": _num(c), "severity": SEVERITY_NAMES[sev]}
    return out


def _severity_of(rule: DriftRule, scores: dict[str, float]) -> tuple[int, float]:
    value = scores.get(rule.method, math.nan)
    if rule.method == "mean_shift":
        value = abs(value)
    return rule.thresholds.severity(value), value


class WindowEvaluator:
    """Judges closed windows of one model against its reference."""

    def __init__(self, settings: ModelSettings, reference: Reference, numeric: list[str],
                 categorical: list[str]):
        self.settings = settings
        self.reference = reference
        self.numeric = numeric
        self.categorical = categorical
        self.layout = ModelLayout(
            [reference.features[n] for n in numeric],
            [reference.features[n] for n in categorical],
            reference.prediction, reference.label)
        self.features: dict[str, FeatureSettings] = {
            n: settings.feature(n, "numeric") for n in numeric}
        self.features.update({n: settings.feature(n, "categorical") for n in categorical})
        # one test per feature, plus the prediction: the Bonferroni family
        n_tests = len(numeric) + len(categorical) + (reference.prediction is not None)
        self.alpha = settings.significance / max(n_tests, 1)
        self._num_rows = _Rows(self.layout.numeric.offsets, 1,
                               [reference.features[n].counts for n in numeric])
        self._cat_rows = _Rows(self.layout.categorical.offsets, 3,
                               [reference.features[n].counts for n in categorical])
        num_profiles = [reference.features[n] for n in numeric]
        self._ref_moments = np.array([[p.mean, p.std, p.variance] for p in num_profiles],
                                     np.float64).reshape(-1, 3).T
        self._num_rates = np.array([[p.missing_rate, p.out_of_range_rate, p.absent_rate]
                                    for p in num_profiles], np.float64).reshape(-1, 3).T
        cat_profiles = [reference.features[n] for n in categorical]
        self._single_settings: dict[str, FeatureSettings] = {}   # prediction, label
        self._cat_several = np.array([len(p.categories) > 1 for p in cat_profiles], bool)
        self._num_rules = _Rules([self.features[n] for n in numeric], _NUMERIC_SCORES,
                                 ("missing", "out_of_range", "stuck", "type_violations",
                                  "schema"))
        self._cat_rules = _Rules([self.features[n] for n in categorical], _CATEGORICAL_SCORES,
                                 ("missing", "unseen_categories", "stuck", "type_violations",
                                  "schema"))
        self._cat_other = np.array([p.other for p in cat_profiles], np.float64)
        self._cat_rates = np.array([[p.missing_rate, p.unseen_rate, p.absent_rate]
                                    for p in cat_profiles], np.float64).reshape(-1, 3).T

    # -- one column ------------------------------------------------------------------

    def _numeric_column(self, name: str, profile: NumericProfile, layout: NumericColumns,
                        state: NumericState, j: int, settings: FeatureSettings,
                        absent: int, violations: int, events: int,
                        judge: bool = True) -> dict[str, Any]:
        a, b = layout.offsets[j], layout.offsets[j + 1]
        counts, missing = state.counts[a:b - 1], int(state.counts[b - 1])
        n = int(state.n[j])
        lo, hi = float(state.min[j]), float(state.max[j])
        s1 = stats.fixed_point_value(state.s1[j])
        s2 = stats.fixed_point_value(state.s2[j])
        shift, scale = float(layout.shift[j]), float(layout.scale[j])
        scores = numeric_scores(profile, counts, n, s1, s2, shift, scale)
        mean, var = stats.moments(n, s1, s2, shift=shift, scale=scale)
        significant = scores["ks_pvalue"] < self.alpha
        severity, value = _severity_of(settings.drift, scores)
        if not significant or n < self.settings.min_events:
            severity = 0
        quality = {
            "missing": RateCheck(missing, n + missing, profile.missing_rate),
            "out_of_range": RateCheck(int(state.out_of_range[j]), n,
                                      profile.out_of_range_rate, excess=False),
            "stuck": float(n >= self.settings.min_events and lo == hi and profile.variance > 0),
            **self._schema_checks(profile, absent, violations, events),
        } if judge else None
        return {
            "kind": "numeric", "severity": SEVERITY_NAMES[severity],
            "method": settings.drift.method, "value": _num(value),
            "threshold": settings.drift.warning if severity < 2 else settings.drift.critical,
            "significant": bool(significant),
            "scores": {k: _num(v) for k, v in scores.items()},
            "stats": {"count": n, "missing": missing, "mean": _num(mean),
                      "std": _num(math.sqrt(var)) if var == var else None,
                      "min": _num(lo), "max": _num(hi)},
            **({"data_quality": judge_quality(settings.data_quality, quality, self.alpha,
                                              self.settings.min_events)} if judge else {}),
        }

    @staticmethod
    def _schema_checks(profile, absent: int, violations: int, events: int
                       ) -> dict[str, RateCheck]:
        return {
            "type_violations": RateCheck(violations, events + violations, 0.0, excess=False),
            # absent keys are judged against the share the reference saw absent, so a
            # producer that omits null features (sparse JSON) does not page
            "schema": RateCheck(min(absent, events), events, profile.absent_rate),
        }

    def _categorical_column(self, name: str, profile: CategoricalProfile,
                            layout: CategoricalColumns, state: CategoricalState, j: int,
                            settings: FeatureSettings, absent: int, violations: int,
                            events: int, judge: bool = True) -> dict[str, Any]:
        a, b = layout.offsets[j], layout.offsets[j + 1]
        counts = state.counts[a:b - 3]
        other, unseen, missing = (int(state.counts[b - 3]), int(state.counts[b - 2]),
                                  int(state.counts[b - 1]))
        n = int(counts.sum()) + other + unseen
        scores = categorical_scores(profile, counts, other, unseen)
        significant = scores["chi2_pvalue"] < self.alpha
        severity, value = _severity_of(settings.drift, scores)
        if not significant or n < self.settings.min_events:
            severity = 0
        top = np.argsort(counts)[::-1][:5]
        quality = {
            "missing": RateCheck(missing, n + missing, profile.missing_rate),
            "unseen_categories": RateCheck(unseen, n, profile.unseen_rate),
            "stuck": float(n >= self.settings.min_events and len(profile.categories) > 1
                           and np.count_nonzero(counts) + (other > 0) + (unseen > 0) == 1),
            **self._schema_checks(profile, absent, violations, events),
        } if judge else None
        return {
            "kind": "categorical", "severity": SEVERITY_NAMES[severity],
            "method": settings.drift.method, "value": _num(value),
            "threshold": settings.drift.warning if severity < 2 else settings.drift.critical,
            "significant": bool(significant),
            "scores": {k: _num(v) for k, v in scores.items()},
            "stats": {"count": n, "missing": missing, "other": other, "unseen": unseen,
                      "top": {profile.categories[i]: int(counts[i]) for i in top if counts[i]}},
            **({"data_quality": judge_quality(settings.data_quality, quality, self.alpha,
                                              self.settings.min_events)} if judge else {}),
        }

    def _single(self, profile, layout, state, name: str, rule: DriftRule) -> dict[str, Any]:
        """The prediction or the label: drift only (no data-quality checks)."""
        settings = self._single_settings.get(name)
        if settings is None or settings.drift is not rule:
            settings = self._single_settings[name] = FeatureSettings(
                kind=profile.kind, drift=rule, data_quality=self.settings.data_quality)
        if isinstance(profile, NumericProfile):
            return self._numeric_column(name, profile, layout, state, 0, settings, 0, 0, 0,
                                        judge=False)
        return self._categorical_column(name, profile, layout, state, 0, settings, 0, 0, 0,
                                        judge=False)

    # -- all columns of a kind at once (what `evaluate` uses) --------------------------
    # The same values as `_numeric_column` / `_categorical_column` column by column
    # (tested), with the statistics, p-values and severities of all features as rows of
    # arrays: at a window close the per-column numpy calls' overhead was most of the cost.

    def _judge_rows(self, names: list[str], rules: _Rules, scores: dict[str, np.ndarray],
                    significant: np.ndarray, n: np.ndarray, checks: dict[str, tuple]
                    ) -> list[dict[str, Any]]:
        """Per feature, its report without "stats": JSON scores, drift severity name,
        significance, threshold, and the data-quality dict (`judge_quality`'s, for every
        feature at once; ``checks`` maps a check to (hits, trials, expected, excess), or
        to a plain float array for 'stuck')."""
        min_events = self.settings.min_events
        table = np.empty((len(rules.methods) + 1, len(names)))
        for i, key in enumerate(rules.methods):
            table[i] = scores[key]
        table[-1] = math.nan
        value = table[rules.method_row, np.arange(len(names))]
        value = np.where(rules.absolute, np.abs(value), value)
        severity = _severity_rows(value, rules.warning, rules.critical)
        severity[~significant | (n < min_events)] = 0
        severity = severity.tolist()
        threshold = np.where(np.array(severity) < 2, rules.warning, rules.critical).tolist()
        keys = list(scores)
        score_rows = list(zip(*(_json_list(v) for v in scores.values()), strict=True))
        # the rate checks all at once: (checks, features) arrays
        rates = [c for c in checks.values() if isinstance(c, tuple)]
        hits = np.array([c[0] for c in rates], np.int64)
        trials = np.array([c[1] for c in rates], np.int64)
        expected = np.empty(hits.shape)
        for i, c in enumerate(rates):
            expected[i] = c[2]
        with np.errstate(divide="ignore", invalid="ignore"):
            share = hits / trials
        v = np.where(np.array([c[3] for c in rates])[:, None], share - expected, share)
        v[trials <= 0] = math.nan
        pv = stats.binomial_excess_pvalue_rows(hits, trials, expected)
        sev = _severity_rows(v, rules.rate_warning, rules.rate_critical)
        sev[(trials < min_events) | ~(pv < self.alpha)] = 0
        v, pv = _json_list(v.ravel()), _json_list(pv.ravel())
        sev = [SEVERITY_NAMES[i] for i in sev.ravel().tolist()]
        stuck = rules.stuck
        stuck_v = _json_list(checks[stuck])
        stuck_sev = [SEVERITY_NAMES[i] for i in _severity_rows(
            checks[stuck], *rules.quality[stuck]).tolist()]
        f = len(names)
        # (check, row in the rate arrays or -1 for 'stuck'), in the report's order
        order = []
        i = 0
        for check, c in checks.items():
            order.append((check, i * f if isinstance(c, tuple) else -1))
            i += isinstance(c, tuple)
        quality = [{check: {"value": stuck_v[j], "severity": stuck_sev[j]} if r < 0 else
                    {"value": v[r + j], "severity": sev[r + j], "pvalue": pv[r + j]}
                    for check, r in order} for j in range(f)]
        out = []
        val = _json_list(value)
        sig = significant.tolist()
        for j in range(len(names)):
            out.append({
                "severity": SEVERITY_NAMES[severity[j]], "method": rules.method[j],
                "value": val[j], "threshold": threshold[j], "significant": sig[j],
                "scores": dict(zip(keys, score_rows[j], strict=True)), "stats": None,
                "data_quality": quality[j]})
        return out

    def _numeric_features(self, acc: WindowAccumulator) -> dict[str, dict[str, Any]]:
        layout, state, k = self.layout.numeric, acc.numeric, len(self.numeric)
        rows = self._num_rows
        ref, cur = rows.ref, rows.current(state.counts)
        missing = state.counts[layout.missing_slots]
        n = state.n
        s1 = np.array([stats.fixed_point_value(v) for v in state.s1], np.float64)
        s2 = np.array([stats.fixed_point_value(v) for v in state.s2], np.float64)
        mean, var = stats.moments_rows(n, s1, s2, layout.shift, layout.scale)
        ref_mean, ref_std, ref_var = self._ref_moments
        d, p = stats.ks_from_counts_rows(ref, cur)
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(ref_std == 0, math.nan, (mean - ref_mean) / ref_std)
            ratio = np.where(ref_var == 0, math.nan, var / ref_var)
        scores = {"psi": stats.psi_rows(ref, cur, rows.mask),
                  "jensen_shannon": stats.js_distance_rows(ref, cur, rows.mask),
                  "ks": d, "ks_pvalue": p, "mean_shift": shift, "variance_ratio": ratio}
        missing_rate, oor_rate, absent_rate = self._num_rates
        events = np.full(k, acc.events, np.int64)
        violations = acc.type_violations[:k]
        stuck = ((n >= self.settings.min_events) & (state.min == state.max)
                 & (ref_var > 0)).astype(np.float64)
        checks = {"missing": (missing, n + missing, missing_rate, True),
                  "out_of_range": (state.out_of_range, n, oor_rate, False),
                  "stuck": stuck,
                  "type_violations": (violations, events + violations, 0.0, False),
                  "schema": (np.minimum(acc.absent[:k], acc.events), events, absent_rate, True)}
        judged = self._judge_rows(self.numeric, self._num_rules, scores, p < self.alpha, n,
                                  checks)
        n, missing = n.tolist(), missing.tolist()
        mean, std = _json_list(mean), _json_list(np.sqrt(var))
        lo, hi = _json_list(state.min), _json_list(state.max)
        out = {}
        for j, name in enumerate(self.numeric):
            f = judged[j]
            f["stats"] = {"count": n[j], "missing": missing[j], "mean": mean[j], "std": std[j],
                          "min": lo[j], "max": hi[j]}
            out[name] = {"kind": "numeric", **f}
        return out

    def _categorical_features(self, acc: WindowAccumulator) -> dict[str, dict[str, Any]]:
        layout, state, k = self.layout.categorical, acc.categorical, len(self.categorical)
        n_num = len(self.numeric)
        rows = self._cat_rows
        counts = rows.current(state.counts)         # per reference category
        ends = layout.offsets[1:]
        other, unseen, missing = (state.counts[ends - 3], state.counts[ends - 2],
                                  state.counts[ends - 1])
        n = counts.sum(axis=1).astype(np.int64) + other + unseen
        # the reference's 'other' bucket, and the window's values outside the top K,
        # as one more cell after each row's categories
        ref = _with_cell(rows.ref, rows.width, self._cat_other)
        cur = _with_cell(counts, rows.width, (other + unseen).astype(np.float64))
        mask = _with_cell(rows.mask, rows.width, True)
        ref_m, cur_m, mask_m = stats.merge_sparse_cells_rows(ref, cur, mask)
        chi2, chi2_p = stats.chi_square_merged_rows(ref_m, cur_m, mask_m)
        total = cur.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            unseen_share = np.where(total > 0, unseen / total, math.nan)
        scores = {"psi": stats.psi_rows(ref_m, cur_m, mask_m),
                  "jensen_shannon": stats.js_distance_rows(ref_m, cur_m, mask_m),
                  "chi2": chi2, "chi2_pvalue": chi2_p, "unseen_share": unseen_share}
        missing_rate, unseen_rate, absent_rate = self._cat_rates
        events = np.full(k, acc.events, np.int64)
        violations = acc.type_violations[n_num:n_num + k]
        distinct = np.count_nonzero(counts, axis=1) + (other > 0) + (unseen > 0)
        stuck = ((n >= self.settings.min_events) & self._cat_several
                 & (distinct == 1)).astype(np.float64)
        checks = {"missing": (missing, n + missing, missing_rate, True),
                  "unseen_categories": (unseen, n, unseen_rate, True),
                  "stuck": stuck,
                  "type_violations": (violations, events + violations, 0.0, False),
                  "schema": (np.minimum(acc.absent[n_num:n_num + k], acc.events), events,
                             absent_rate, True)}
        judged = self._judge_rows(self.categorical, self._cat_rules, scores,
                                  chi2_p < self.alpha, n, checks)
        n, other, unseen, missing = n.tolist(), other.tolist(), unseen.tolist(), missing.tolist()
        out = {}
        for j, name in enumerate(self.categorical):
            categories = self.reference.features[name].categories
            a = int(layout.offsets[j])
            c = state.counts[a:a + int(rows.width[j])]
            top = np.argsort(c)[::-1][:5].tolist()
            f = judged[j]
            f["stats"] = {"count": n[j], "missing": missing[j], "other": other[j],
                          "unseen": unseen[j],
                          "top": {categories[i]: int(c[i]) for i in top if c[i]}}
            out[name] = {"kind": "categorical", **f}
        return out

    # -- one window ------------------------------------------------------------------

    def evaluate(self, window: ClosedWindow) -> dict[str, Any]:
        acc: WindowAccumulator = window.accumulator
        ref, lay = self.reference, self.layout
        features: dict[str, Any] = {}
        if self.numeric:
            features.update(self._numeric_features(acc))
        if self.categorical:
            features.update(self._categorical_features(acc))
        drifted = [n for n, f in features.items() if f["severity"] != "ok"]
        share = len(drifted) / len(features) if features else 0.0
        dataset_sev = self.settings.alerting.dataset_drift.severity(share)
        report: dict[str, Any] = {
            "model": window.model,
            "window": self._window_info(window),
            "features": features,
            "dataset": {"drifted_features": sorted(drifted, key=lambda n: -(
                        features[n]["value"] or 0)), "drifted_share": share,
                        "severity": SEVERITY_NAMES[dataset_sev]},
            "schema": {"unexpected_events": acc.unexpected_events,
                       "unexpected_fields": dict(acc.unexpected_names.most_common(10))},
        }
        if acc.model_version is not None:
            report["model_version"] = acc.model_version
        kind_rule = {"numeric": self.settings.numeric, "categorical": self.settings.categorical}
        if ref.prediction is not None and acc.prediction is not None:
            report["prediction"] = self._single(ref.prediction, lay.prediction, acc.prediction,
                                                "prediction", kind_rule[ref.prediction.kind])
        if ref.label is not None and acc.label is not None:
            label = self._single(ref.label, lay.label, acc.label, "label",
                                 kind_rule[ref.label.kind])
            if label["stats"]["count"]:
                report["label"] = label
        return report

    @staticmethod
    def _window_info(window: ClosedWindow) -> dict[str, Any]:
        acc = window.accumulator
        start = window.start if window.start is not None else acc.ts_min
        end = window.end if window.end is not None else acc.ts_max
        info = {"index": window.index, "start": _iso(start), "end": _iso(end),
                "events": acc.events, "complete": window.complete}
        if acc.first_position is not None:
            info["first_line"] = acc.first_position
            info["last_line"] = acc.last_position
        return info


def _iso(ts: float | None) -> str | None:
    if ts is None or not math.isfinite(ts):
        return None
    from datetime import UTC, datetime
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class _Rows:
    """Where each column's cells sit in a group's flat counts, as one padded 2-D index
    (one row per column; a column's slots after its cells, `tail` of them, are not
    cells), and the reference's counts over the same cells, padded with zeros."""

    def __init__(self, offsets: np.ndarray, tail: int, ref_counts: list[np.ndarray]):
        self.width = np.diff(offsets) - tail                  # cells per column
        cols = np.arange(int(self.width.max()) if self.width.size else 0)
        self.mask = cols < self.width[:, None]
        # padding reads one zero appended after the counts (`current`)
        self.index = np.where(self.mask, offsets[:-1, None] + cols, offsets[-1])
        self.ref = np.zeros(self.mask.shape)
        if ref_counts:
            self.ref[self.mask] = np.concatenate(ref_counts)

    def current(self, counts: np.ndarray) -> np.ndarray:
        return np.append(counts, 0)[self.index].astype(np.float64)


def _with_cell(rows: np.ndarray, at: np.ndarray, value) -> np.ndarray:
    """Rows with one more column of padding; row i gets `value` (per row, or one for
    all) at column at[i], its first padding cell: one more cell after its own."""
    out = np.zeros((rows.shape[0], rows.shape[1] + 1), rows.dtype)
    out[:, :-1] = rows
    out[np.arange(rows.shape[0]), at] = value
    return out


_NUMERIC_SCORES = ("psi", "jensen_shannon", "ks", "ks_pvalue", "mean_shift", "variance_ratio")
_CATEGORICAL_SCORES = ("psi", "jensen_shannon", "chi2", "chi2_pvalue", "unseen_share")


class _Rules:
    """The drift rules and data-quality thresholds of features of one kind, as arrays."""

    def __init__(self, features: list[FeatureSettings], methods: tuple[str, ...],
                 checks: tuple[str, ...]):
        self.methods = methods
        self.method = [f.drift.method for f in features]
        # a method the kind does not score judges NaN (`_severity_of`: never flagged)
        self.method_row = np.array([methods.index(m) if m in methods else len(methods)
                                    for m in self.method], np.int64)
        self.absolute = np.array([m == "mean_shift" for m in self.method], bool)
        self.warning = np.array([f.drift.warning for f in features], np.float64)
        self.critical = np.array([f.drift.critical for f in features], np.float64)
        self.quality = {}
        for check in checks:
            th = [f.data_quality.for_check(check) for f in features]
            self.quality[check] = (np.array([t.warning for t in th], np.float64),
                                   np.array([t.critical for t in th], np.float64))
        # the rate checks (all but the plain 'stuck' indicator), in order, stacked
        self.stuck = "stuck"
        rates = [c for c in checks if c != self.stuck]
        self.rate_warning = np.array([self.quality[c][0] for c in rates]).reshape(
            len(rates), len(features))
        self.rate_critical = np.array([self.quality[c][1] for c in rates]).reshape(
            len(rates), len(features))


def _severity_rows(values: np.ndarray, warning: np.ndarray, critical: np.ndarray) -> np.ndarray:
    """`Thresholds.severity` of every value (NaN: 0)."""
    return np.where(values >= critical, 2, np.where(values >= warning, 1, 0))


def _json_list(values: np.ndarray) -> list[float | None]:
    """`_num` of every value: floats, NaN and infinities as None."""
    out = np.asarray(values, np.float64).tolist()
    if not np.isfinite(values).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out
