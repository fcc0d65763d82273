"""Precision of the drift statistics and what the default thresholds can detect.

Prints, measured side by side in one run (numbers quoted in the README's methods
section):

1. binned KS statistic vs scipy's exact two-sample KS, per window size and family,
   against a 50,000-value reference binned as `reference build` bins it;
2. mean and variance from the engine's fixed-point sums vs numpy;
3. the smallest mean shift and variance change a 10,000-event window flags at the
   default settings (PSI >= 0.1 warning AND KS p < 0.01 / 26, the Bonferroni level of
   a 25-feature model with a prediction), for normal and lognormal features.

Usage: ../.venv/bin/python precision.py [--seeds N]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats as sps

from stream_monitor.core.engine import NumericColumns, NumericState
from stream_monitor.core.reference import NumericProfile
from stream_monitor.core.stats import bin_index, ks_from_counts, moments, psi

REF_N = 50_000
ALPHA = 0.01 / 26
PSI_WARNING = 0.1


def family(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if kind == "normal":
        return rng.normal(0, 1, n)
    if kind == "t2":
        return rng.standard_t(2, n)
    if kind == "lognormal":
        return rng.lognormal(0, 1, n)
    if kind == "zero70":
        return np.where(rng.random(n) < 0.7, 0.0, rng.exponential(3.0, n))
    if kind == "poisson4":
        return rng.poisson(4, n).astype(float)
    raise ValueError(kind)


def ks_table(seeds: int) -> None:
    print("1. binned KS vs scipy.stats.ks_2samp (D_exact - D_binned; max / 95th pct)")
    for kind in ("normal", "t2", "lognormal", "zero70", "poisson4"):
        cells = []
        for m in (200, 1000, 10_000):
            gaps = []
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                x = family(kind, rng, REF_N)
                prof = NumericProfile.from_values(x, 50)
                y = family(kind, rng, m)
                cur = np.bincount(bin_index(prof.edges, y), minlength=prof.counts.size)
                d, _ = ks_from_counts(prof.counts, cur)
                gaps.append(sps.ks_2samp(x, y).statistic - d)
            cells.append(f"{m:>6}: {max(gaps):.4f} / {np.quantile(gaps, 0.95):.4f}")
        print(f"   {kind:<10}" + " | ".join(cells))


def moments_table(seeds: int) -> None:
    print("2. window mean / variance from fixed-point sums vs numpy (max relative error)")
    for kind in ("normal", "t2", "lognormal"):
        worst_mean = worst_var = 0.0
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            x = family(kind, rng, REF_N) + 1e4
            prof = NumericProfile.from_values(x, 50)
            layout = NumericColumns([prof])
            y = family(kind, rng, 10_000) + 1e4
            st = NumericState.empty(layout)
            st.update(layout, y.reshape(-1, 1))
            mean, var = moments(10_000, st.s1[0] / 2**32, st.s2[0] / 2**32,
                                shift=float(layout.shift[0]), scale=float(layout.scale[0]))
            worst_mean = max(worst_mean, abs(mean - y.mean()) / prof.std)
            worst_var = max(worst_var, abs(var - y.var()) / y.var())
        print(f"   {kind:<10} mean: {worst_mean:.1e} reference sds   variance: {worst_var:.1e}")


def _flag_rate(kind: str, change: str, amount: float, seeds: int) -> float:
    hits = 0
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        x = family(kind, rng, REF_N)
        prof = NumericProfile.from_values(x, 50)
        y = family(kind, rng, 10_000)
        if change == "mean":
            y = y + amount * prof.std
        else:
            y = prof.mean + (y - prof.mean) * amount
        cur = np.bincount(bin_index(prof.edges, y), minlength=prof.counts.size)
        _, p = ks_from_counts(prof.counts, cur)
        hits += psi(prof.counts, cur) >= PSI_WARNING and p < ALPHA
    return hits / seeds


def _smallest(kind: str, change: str, grid: list[float], seeds: int) -> str:
    for a in grid:
        rate = _flag_rate(kind, change, a, seeds)
        if rate >= 0.95:
            return f"{a:g} (flagged in {rate:.0%} of windows)"
    return "none in the grid"


def detection_table(seeds: int) -> None:
    print("3. smallest change a 10,000-event window flags at defaults "
          "(PSI >= 0.1 and KS p < 0.01/26, in >= 95% of windows)")
    shifts = [round(0.05 * i, 2) for i in range(1, 21)]
    widen = [round(1 + 0.05 * i, 2) for i in range(1, 21)]
    narrow = [round(1 - 0.05 * i, 2) for i in range(1, 19)]
    for kind in ("normal", "lognormal"):
        print(f"   {kind}: mean shift (reference sds) >= {_smallest(kind, 'mean', shifts, seeds)}")
        print(f"   {kind}: sd x >= {_smallest(kind, 'scale', widen, seeds)};  "
              f"sd x <= {_smallest(kind, 'scale', narrow, seeds)}")
        print(f"   {kind}: flag rate with no change: "
              f"{_flag_rate(kind, 'mean', 0.0, seeds):.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    ks_table(args.seeds)
    moments_table(min(args.seeds, 10))
    detection_table(args.seeds)
    print(f"   (reference {REF_N:,} values, 50 bins; variance ratio and the moments do not "
          f"set severity by default)")


if __name__ == "__main__":
    main()
