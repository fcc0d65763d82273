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

    # -- one column ------------------------------------------------------------------

    def _numeric_column(self, name: str, profile: NumericProfile, layout: NumericColumns,
                        state: NumericState, j: int, settings: FeatureSettings,
                        absent: int, violations: int, events: int) -> dict[str, Any]:
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
        }
        return {
            "kind": "numeric", "severity": SEVERITY_NAMES[severity],
            "method": settings.drift.method, "value": _num(value),
            "threshold": settings.drift.warning if severity < 2 else settings.drift.critical,
            "significant": bool(significant),
            "scores": {k: _num(v) for k, v in scores.items()},
            "stats": {"count": n, "missing": missing, "mean": _num(mean),
                      "std": _num(math.sqrt(var)) if var == var else None,
                      "min": _num(lo), "max": _num(hi)},
            "data_quality": judge_quality(settings.data_quality, quality, self.alpha,
                                          self.settings.min_events),
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
                            events: int) -> dict[str, Any]:
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
        }
        return {
            "kind": "categorical", "severity": SEVERITY_NAMES[severity],
            "method": settings.drift.method, "value": _num(value),
            "threshold": settings.drift.warning if severity < 2 else settings.drift.critical,
            "significant": bool(significant),
            "scores": {k: _num(v) for k, v in scores.items()},
            "stats": {"count": n, "missing": missing, "other": other, "unseen": unseen,
                      "top": {profile.categories[i]: int(counts[i]) for i in top if counts[i]}},
            "data_quality": judge_quality(settings.data_quality, quality, self.alpha,
                                          self.settings.min_events),
        }

    def _single(self, profile, layout, state, name: str, rule: DriftRule) -> dict[str, Any]:
        settings = FeatureSettings(kind=profile.kind, drift=rule,
                                   data_quality=self.settings.data_quality)
        if isinstance(profile, NumericProfile):
            out = self._numeric_column(name, profile, layout, state, 0, settings, 0, 0, 0)
        else:
            out = self._categorical_column(name, profile, layout, state, 0, settings, 0, 0, 0)
        out.pop("data_quality")
        return out

    # -- one window ------------------------------------------------------------------

    def evaluate(self, window: ClosedWindow) -> dict[str, Any]:
        acc: WindowAccumulator = window.accumulator
        ref, lay = self.reference, self.layout
        features: dict[str, Any] = {}
        n_num = len(self.numeric)
        for j, name in enumerate(self.numeric):
            features[name] = self._numeric_column(
                name, ref.features[name], lay.numeric, acc.numeric, j, self.features[name],
                int(acc.absent[j]), int(acc.type_violations[j]), acc.events)
        for j, name in enumerate(self.categorical):
            features[name] = self._categorical_column(
                name, ref.features[name], lay.categorical, acc.categorical, j,
                self.features[name], int(acc.absent[n_num + j]),
                int(acc.type_violations[n_num + j]), acc.events)
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
