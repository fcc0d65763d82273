"""Detectors: per-feature sequential drift detection on small-block statistics.

Every `block` events of a model (default 1,000) each feature gets block statistics whose
distribution under "no drift" is the same for every feature, so one calibration serves
heavy-tailed, tied, sparse and categorical features alike:

* ``pit_mean`` (numeric, location): the block mean of the mid-rank probability
  integral transform of each value in the reference CDF (the reference bin gives the
  value's CDF interval; the mid-point handles ties and atoms), standardised with its
  exact reference mean (1/2) and variance. About N(0, 1) without drift.
* ``chi2`` (numeric and categorical, shape): Pearson's chi-square of the block's
  counts against the reference frequencies over cells with at least 5 expected values
  per block (sparse bins and categories are pooled), scaled for the reference's own
  sampling noise and mapped to N(0, 1) by the Wilson-Hilferty cube root. It sees what
  a location statistic misses: variance changes, a unimodal feature splitting in two,
  categories trading places.

Missing values are not values: they count in neither statistic.

Each statistic feeds a detector: by default a CUSUM with known in-control mean
(vectorised across features: one numpy update per block for all of them), or river's
`PageHinkley`. The alarm threshold is derived from a target expected run length
(blocks per feature without drift) by the Brook-Evans Markov-chain approximation of the
CUSUM's run length, not picked by hand. State is a few floats per feature plus the
open block's sums, serialisable with `to_state` / `from_state`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
from scipy.special import ndtr

from stream_monitor.config import DetectorConfig, ModelSettings
from stream_monitor.core.reference import CategoricalProfile, NumericProfile, Reference
from stream_monitor.core.stats import GridBins

LOCATION, SHAPE = "pit_mean", "chi2"
MIN_EXPECTED = 5.0      # expected values per chi-square cell per block
MIN_VALUES = 30         # fewer non-missing values in a block: the feature is not judged
REF_TOLERANCE = 3.0     # reference sampling noise allowed for in the location allowance

# -- pure statistics ----------------------------------------------------------------------


def midrank_pit(ref_counts: np.ndarray) -> tuple[np.ndarray, float]:
    """Mid-rank PIT value of each reference bin and the PIT's variance under the reference.

    A value in bin b has CDF interval [F(b-1), F(b)); its mid-rank PIT is the midpoint.
    Under the reference the mean is exactly 1/2 and the variance
    ``sum p_b m_b^2 - 1/4`` (1/12 minus the ties' share).
    """
    p = np.asarray(ref_counts, np.float64)
    p = p / p.sum()
    upper = np.cumsum(p)
    mid = upper - p / 2
    var = float(np.dot(p, mid * mid) - 0.25)
    return mid, max(var, 0.0)


def adjacent_cells(p: np.ndarray, n: float, min_expected: float = MIN_EXPECTED) -> np.ndarray:
    """Cell of each ordered bin: adjacent bins pooled until n*p >= min_expected per cell."""
    cell = np.empty(p.size, np.int64)
    c, acc = 0, 0.0
    for i, pi in enumerate(p):          # start-up only, not the hot path
        cell[i] = c
        acc += pi
        if acc * n >= min_expected:
            c, acc = c + 1, 0.0
    if c > 0 and acc * n < min_expected and cell[-1] == c:
        cell[cell == c] = c - 1         # a short last cell joins its neighbour
    return cell


def category_cells(p: np.ndarray, other: float, n: float,
                   min_expected: float = MIN_EXPECTED) -> tuple[np.ndarray, np.ndarray]:
    """Cells of categories (most frequent first) and their reference probabilities.

    Categories with n*p >= min_expected keep a cell each; all the others, the
    reference's 'other' share and unseen values share one pool (which joins the last
    kept cell when it is too small on its own). The pool is not split: which sparse
    categories a reference sample ranks first is largely chance, so their sampled
    frequencies overstate the true ones (winner's curse), while the pool's total is
    unbiased. Returns (cell of each category + one for unseen values, cell probabilities).
    """
    keep = p * n >= min_expected
    k = int(keep.sum())
    pool = float(p[~keep].sum() + other)
    pool_cell = k if (pool * n >= min_expected or k == 0) else k - 1
    cell = np.full(p.size + 1, pool_cell, np.int64)
    cell[:-1][keep] = np.arange(k)
    return cell, np.bincount(cell, weights=np.append(p, other))


def wilson_hilferty(x2: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Chi-square(df) values mapped to about N(0, 1) (Wilson-Hilferty cube root)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        v = 2.0 / (9.0 * df)
        return (np.cbrt(x2 / df) - (1.0 - v)) / np.sqrt(v)


def cusum_arl(k: float, h: float, states: int | None = None) -> float:
    """Expected run length of the one-sided CUSUM ``S = max(0, S + z - k) > h``, z ~ N(0,1).

    Brook & Evans (1972): the statistic as a Markov chain on `states` cells of [0, h]
    (by default 400, more for large h so that a cell stays well below one sd).
    """
    states = states or min(max(400, int(8 * h)), 3000)
    w = h / states
    centre = np.arange(states) * w
    upper = (np.arange(states) + 0.5) * w
    # P[i, j] = P(S' in cell j | S = centre_i); cell 0 also takes everything below w/2
    cdf = ndtr(upper[None, :] - centre[:, None] + k)
    p = np.diff(np.concatenate([np.zeros((states, 1)), cdf], axis=1), axis=1)
    a = np.eye(states) - p
    return float(np.linalg.solve(a, np.ones(states))[0])


def siegmund_arl(k: float, h: float) -> float:
    """Siegmund's closed-form approximation of the same run length (for cross-checking)."""
    b = h + 1.166
    if 2 * k * b > 700:
        return math.inf
    return (math.exp(2 * k * b) - 2 * k * b - 1) / (2 * k * k)


# `cusum_threshold` of the defaults (k 0.5, arl 1e6; numeric features' three one-sided
# CUSUMs share the budget: 3e6), as its search finds them (`test_detectors` checks): the
# search's dense solves took 0.1-0.7 s of every `replay` and `run` start-up (more when a
# threaded BLAS shares its cores with other processes)
_KNOWN_THRESHOLDS = {(0.5, 1e6): 11.979785, (0.5, 3e6): 13.079993}


@lru_cache(maxsize=64)
def cusum_threshold(k: float, arl: float) -> float:
    """Smallest h whose one-sided CUSUM run length (allowance k) is at least `arl`
    (`search_threshold`; the defaults' from `_KNOWN_THRESHOLDS`)."""
    known = _KNOWN_THRESHOLDS.get((k, arl))
    return search_threshold(k, arl) if known is None else known


def search_threshold(k: float, arl: float) -> float:
    """`cusum_threshold` by search: log run length is nearly linear in h, so a secant
    search started from Siegmund's closed form converges in a few Brook-Evans solves.
    """
    lo, hi = 0.0, 200.0
    for _ in range(60):                 # invert the closed form first (cheap)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if siegmund_arl(k, mid) < arl else (lo, mid)
    target = math.log(arl)
    h0, h1 = hi, hi * 1.05
    f0, f1 = math.log(cusum_arl(k, h0)) - target, math.log(cusum_arl(k, h1)) - target
    for _ in range(20):
        if abs(f1) < 1e-6 or f1 == f0:
            break
        h0, h1, f0 = h1, h1 - f1 * (h1 - h0) / (f1 - f0), f1
        f1 = math.log(cusum_arl(k, h1)) - target
    h = math.ceil(h1 * 1e6) / 1e6
    while cusum_arl(k, h) < arl:        # round up: never below the target
        h = math.ceil(h * 1.0001 * 1e6) / 1e6
    return h


# -- layout: the reference, prepared once -------------------------------------------------

class BlockLayout:
    """Everything a block statistic needs from the reference, as flat arrays."""

    def __init__(self, reference: Reference, numeric: list[str], categorical: list[str],
                 block: int):
        self.numeric, self.categorical, self.block = numeric, categorical, block
        self.names = numeric + categorical
        self.edges: list[np.ndarray] = []
        mids, bin_cells, cell_p, feat_of_cell, n_ref = [], [], [], [], []
        bin_off, var, cells = [0], [], 0
        for j, name in enumerate(numeric):
            prof: NumericProfile = reference.features[name]
            counts = prof.counts.astype(np.float64)
            p = counts / counts.sum()
            mid, v = midrank_pit(counts)
            n = block * (1 - prof.missing_rate)
            cell = adjacent_cells(p, n)
            self.edges.append(prof.edges)
            mids.append(mid)
            bin_cells.append(cell + cells)
            cell_p.append(np.bincount(cell, weights=p))
            feat_of_cell.append(np.full(cell.max() + 1, j))
            cells += int(cell.max()) + 1
            bin_off.append(bin_off[-1] + p.size)
            var.append(v)
            n_ref.append(prof.count)
        self.bin_offsets = np.array(bin_off[:-1], np.int64)
        self.bins = bin_off[-1]                 # numeric bins, side by side
        self.mid = np.concatenate(mids) if mids else np.zeros(0)
        self.pit_var = np.array(var, np.float64)
        num_cell = np.concatenate(bin_cells) if bin_cells else np.zeros(0, np.int64)
        # numeric cells are runs of adjacent bins: where each run starts
        self.num_cell_starts = np.flatnonzero(np.diff(num_cell, prepend=-1))
        self.num_cells = cells
        code_off, code_cells = [0], []
        for j, name in enumerate(categorical):
            prof: CategoricalProfile = reference.features[name]
            total = float(prof.count)
            p = prof.counts / total
            n = block * (1 - prof.missing_rate)
            cell, probs = category_cells(p, prof.other / total, n)
            # codes: categories, then 'other' and 'unseen' (both in the pooled cell, the
            # last of `cell`), then missing (the decoder's layout, `decode.CategoryCodes`)
            code_cells.append(np.concatenate([cell + cells, cell[-1:] + cells, [-1]]))
            cell_p.append(probs)
            feat_of_cell.append(np.full(probs.size, len(numeric) + j))
            cells += probs.size
            code_off.append(code_off[-1] + cell.size + 2)
            n_ref.append(prof.count)
        self.code_offsets = np.array(code_off[:-1], np.int64)
        self.cells = cells
        # histogram slots of a block: numeric bins, categorical cells, one for missing
        self.drop = self.bins + cells - self.num_cells
        self.width = self.drop + 1
        lut = np.concatenate(code_cells) if code_cells else np.zeros(0, np.int64)
        self.cat_slot = np.where(lut < 0, self.drop, lut - self.num_cells + self.bins)
        # the engine's numeric slots (`engine.NumericColumns.slots`: per column its bins,
        # then a missing slot) -> histogram slots, so a batch is binned once for both
        self.engine_slot = np.concatenate(
            [np.append(off + np.arange(e.size + 1), self.drop)
             for off, e in zip(self.bin_offsets.tolist(), self.edges, strict=True)]
        ).astype(np.int64) if numeric else np.zeros(0, np.int64)
        # block_sums from the engine's slots: a histogram in the engine's slot space, then
        # its bins (not its missing slots) in order, which are exactly the numeric bins here
        self.engine_bins = np.flatnonzero(self.engine_slot != self.drop)
        self.cat_local = self.cat_slot - self.bins      # categorical cells from 0, drop last
        self.cell_p = np.concatenate(cell_p) if cell_p else np.zeros(0)
        self.feature_of_cell = (np.concatenate(feat_of_cell) if feat_of_cell
                                else np.zeros(0, np.int64))
        self.cell_starts = np.flatnonzero(np.diff(self.feature_of_cell, prepend=-1))
        n_feat = len(self.names)
        self.df = np.bincount(self.feature_of_cell, minlength=n_feat).astype(np.float64) - 1
        self.n_ref = np.array(n_ref, np.float64)

    @cached_property
    def find_bins(self) -> list[GridBins]:
        """The engine's bin lookup per numeric feature, built when first needed: only a
        batch without the engine's slots bins its values here (tables built at start-up
        for nothing otherwise: about 2 ms a model of 20 numeric features)."""
        return [GridBins(e) for e in self.edges]

    def split(self, hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blocks' histograms -> (PIT sums per numeric feature, counts per chi-square cell)."""
        nb = hist.shape[0]
        num = hist[:, :self.bins]
        if self.bins:
            pit = np.add.reduceat(num * self.mid, self.bin_offsets, axis=1)
            cells = np.add.reduceat(num, self.num_cell_starts, axis=1)
        else:
            pit, cells = np.zeros((nb, 0)), np.zeros((nb, 0), np.int64)
        return pit, np.concatenate([cells, hist[:, self.bins:self.drop]], axis=1)


# -- block statistics ---------------------------------------------------------------------


@dataclass
class BlockSums:
    """Sufficient statistics of blocks: rows are blocks."""

    hist: np.ndarray            # (blocks, layout.width - 1) numeric bins, categorical cells
    first: np.ndarray           # (blocks,) first position
    last: np.ndarray            # (blocks,) last position
    ts_min: np.ndarray
    ts_max: np.ndarray
    events: np.ndarray          # (blocks,) events


def block_sums(layout: BlockLayout, numeric: np.ndarray, codes: np.ndarray,
               positions: np.ndarray, ts: np.ndarray, offset: int,
               slots: np.ndarray | None = None) -> BlockSums:
    """Per-block histograms of a batch whose first event is number `offset` of its block.

    One bin lookup for the numeric matrix (or, given the engine's `slots` of the same
    values, one table lookup), one for the categorical codes, one `bincount` over
    (block, slot): the PIT sums and chi-square cells of every feature follow from the
    histogram (`BlockLayout.split`), per block, not per event.
    """
    n = positions.size
    blk = (offset + np.arange(n)) // layout.block
    starts = np.flatnonzero(np.diff(blk, prepend=-1))
    nb = starts.size
    if slots is not None and len(layout.numeric):
        hist = _hist_from_engine(layout, slots, codes, blk, starts)
        return _block_sums(hist, positions, ts, starts, n)
    engine_slots = slots
    slots = np.empty((n, len(layout.names)), np.int64)
    k = len(layout.numeric)
    if k and engine_slots is not None:
        slots[:, :k] = layout.engine_slot[engine_slots]
    elif k:
        bins = slots[:, :k]
        for j, find in enumerate(layout.find_bins):  # per column per batch, as the engine
            bins[:, j] = find(numeric[:, j])
        bins += layout.bin_offsets
        bins[np.isnan(numeric)] = layout.drop       # missing values are not values
    if len(layout.categorical):
        slots[:, k:] = layout.cat_slot[codes + layout.code_offsets]
    slots += (blk * layout.width)[:, None]
    hist = np.bincount(slots.ravel(), minlength=nb * layout.width).reshape(
        nb, layout.width)[:, :-1]
    return _block_sums(hist, positions, ts, starts, n)


def _hist_from_engine(layout: BlockLayout, slots: np.ndarray, codes: np.ndarray,
                      blk: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The blocks' histogram from the engine's numeric slots without mapping each value:
    one `bincount` per block in the engine's slot space (its missing slots are dropped
    afterwards, per block, not per value) and one over the categorical cells. Per block,
    each block's rows are copied while in the cache, instead of adding the block's offset
    to every slot of the batch first: 0.55-0.70 vs 1.31-1.51 ms for a batch of 10,000
    events and 20 numeric features in `Monitor.process` (the slots are out of the cache
    by then)."""
    size = layout.engine_slot.size
    nb = starts.size
    ends = [*starts[1:].tolist(), blk.size]
    hist = np.empty((nb, size), np.int64)
    for b, (lo, hi) in enumerate(zip(starts.tolist(), ends, strict=True)):
        hist[b] = np.bincount(slots[lo:hi].ravel(order="K"), minlength=size)
    hist = hist[:, layout.engine_bins]
    if not len(layout.categorical):
        return hist
    width = layout.width - layout.bins                  # categorical cells and drop
    cat = layout.cat_local[codes + layout.code_offsets]
    cat += (blk * width)[:, None]
    cells = np.bincount(cat.ravel(), minlength=nb * width).reshape(nb, width)[:, :-1]
    return np.concatenate([hist, cells], axis=1)


def _block_sums(hist: np.ndarray, positions: np.ndarray, ts: np.ndarray, starts: np.ndarray,
                n: int) -> BlockSums:
    with np.errstate(invalid="ignore"):
        ts_min = np.fmin.reduceat(ts, starts)
        ts_max = np.fmax.reduceat(ts, starts)
    return BlockSums(hist, np.minimum.reduceat(positions, starts),
                     np.maximum.reduceat(positions, starts), ts_min, ts_max,
                     np.diff(np.append(starts, n)))


def block_statistics(layout: BlockLayout, pit: np.ndarray, cells: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Location z (blocks, numeric), shape z (blocks, features) and values per feature.

    NaN where a feature had fewer than MIN_VALUES values in the block (or one cell).
    """
    counts = (np.add.reduceat(cells, layout.cell_starts, axis=1) if cells.shape[1]
              else np.zeros((cells.shape[0], 0)))
    k = len(layout.numeric)
    ok = counts >= MIN_VALUES
    with np.errstate(invalid="ignore", divide="ignore"):
        nk = counts[:, :k]
        loc = (pit / nk - 0.5) / np.sqrt(layout.pit_var / nk)
        expected = counts[:, layout.feature_of_cell] * layout.cell_p
        terms = (cells - expected) ** 2 / expected
        x2 = np.add.reduceat(terms, layout.cell_starts, axis=1) if terms.shape[1] else terms
        # the reference is a sample too: two-sample scaling of the statistic
        x2 = x2 / (1.0 + counts / layout.n_ref)
        shape = wilson_hilferty(x2, layout.df)
    loc[~ok[:, :k] | ~np.isfinite(loc)] = np.nan
    shape[~ok | (layout.df < 1) | ~np.isfinite(shape)] = np.nan
    return loc, shape, counts


# -- detectors ----------------------------------------------------------------------------


@dataclass
class Channel:
    """One detector input: a statistic of a feature."""

    feature: int                # index into layout.names
    statistic: str              # LOCATION | SHAPE
    two_sided: bool
    method: str                 # cusum | page_hinkley
    k: float                    # allowance used in the update
    h: float                    # alarm threshold


class CusumBank:
    """CUSUMs of many channels, updated together: ``S = max(0, S + z - k)``, alarm at S > h."""

    def __init__(self, k: np.ndarray, h: np.ndarray, two_sided: np.ndarray):
        self.k, self.h, self.two = k, h, two_sided
        self.up = np.zeros(k.size)
        self.down = np.zeros(k.size)

    def update(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One block; returns the alarm mask and the statistic of each channel."""
        ok = ~np.isnan(z)
        zz = np.where(ok, z, 0.0)
        self.up = np.where(ok, np.maximum(0.0, self.up + zz - self.k), self.up)
        self.down = np.where(ok & self.two, np.maximum(0.0, self.down - zz - self.k), self.down)
        stat = np.maximum(self.up, self.down)
        alarm = stat > self.h
        self.up[alarm] = 0.0
        self.down[alarm] = 0.0
        return alarm, stat

    def state(self) -> dict[str, list[float]]:
        return {"up": self.up.tolist(), "down": self.down.tolist()}

    def load(self, state: dict[str, list[float]]) -> None:
        self.up = np.array(state["up"], np.float64)
        self.down = np.array(state["down"], np.float64)


class PageHinkleyBank:
    """river's PageHinkley per channel (its own running mean; no fading: alpha = 1)."""

    _FIELDS = ("_sum_increase", "_sum_decrease", "_min_increase", "_max_decrease")

    def __init__(self, k: np.ndarray, h: np.ndarray, two_sided: np.ndarray):
        from river.drift import PageHinkley

        self.detectors = [PageHinkley(min_instances=30, delta=float(ki), threshold=float(hi),
                                      alpha=1.0, mode="both" if two else "up")
                          for ki, hi, two in zip(k, h, two_sided, strict=True)]

    def update(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alarm = np.zeros(z.size, bool)
        stat = np.zeros(z.size)
        for i, (ph, zi) in enumerate(zip(self.detectors, z.tolist(), strict=True)):
            if zi != zi:
                continue
            ph.update(zi)
            alarm[i] = ph.drift_detected
            up = ph._sum_increase - ph._min_increase
            down = ph._max_decrease - ph._sum_decrease if ph.mode == "both" else 0.0
            stat[i] = max(up, down)
        return alarm, stat

    def state(self) -> dict[str, Any]:
        return {"detectors": [
            {"n": ph._x_mean.n, "mean": ph._x_mean.get(), "detected": ph.drift_detected,
             # river starts its minimum at +inf: JSON has no infinity
             **{f: _finite_or_none(getattr(ph, f)) for f in self._FIELDS}}
            for ph in self.detectors]}

    def load(self, state: dict[str, Any]) -> None:
        for ph, s in zip(self.detectors, state["detectors"], strict=True):
            ph._reset()
            ph._x_mean.n, ph._x_mean._mean = s["n"], s["mean"]
            ph._drift_detected = s["detected"]
            for f in self._FIELDS:
                setattr(ph, f, math.inf if s[f] is None else s[f])


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass
class Detection:
    """A detector's alarm on one feature, with the block that raised it."""

    model: str
    feature: str
    method: str                 # detector_statistic, e.g. cusum_pit_mean
    statistic: str
    value: float                # the detector statistic at the alarm
    threshold: float
    z: float                    # the block statistic
    window: dict[str, Any]      # the block: start, end, events, first_line, last_line


def _iso(ts: float) -> str | None:
    if not math.isfinite(ts):
        return None
    from datetime import UTC, datetime
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


BANKS = {"cusum": CusumBank, "page_hinkley": PageHinkleyBank}


class ModelDetectors:
    """The sequential detectors of one model: block sums in, detections out."""

    def __init__(self, model: str, settings: ModelSettings, reference: Reference,
                 numeric: list[str], categorical: list[str]):
        self.model = model
        self.layout = lay = BlockLayout(reference, numeric, categorical, settings.block)
        channels: list[Channel] = []
        for i, name in enumerate(lay.names):
            cfg: DetectorConfig | None = settings.detector_for(name)
            if cfg is None:
                continue
            is_num = i < len(numeric)
            # one run-length budget per feature: each one-sided CUSUM gets its share
            sides = 3 if is_num else 1
            h = cusum_threshold(cfg.k, cfg.arl * sides)
            if is_num:
                tol = REF_TOLERANCE * math.sqrt(settings.block / max(lay.n_ref[i], 1.0))
                channels.append(Channel(i, LOCATION, True, cfg.method, cfg.k + tol, h))
            channels.append(Channel(i, SHAPE, False, cfg.method, cfg.k, h))
        self.channels = channels
        self.groups: dict[str, tuple[np.ndarray, Any]] = {}
        for method, bank in BANKS.items():
            idx = np.array([c for c, ch in enumerate(channels) if ch.method == method], np.int64)
            if idx.size:
                self.groups[method] = (idx, bank(
                    np.array([channels[c].k for c in idx]), np.array([channels[c].h for c in idx]),
                    np.array([channels[c].two_sided for c in idx], bool)))
        # where each channel's z sits in [location z of numeric features, shape z of all]
        self._zidx = np.array([ch.feature if ch.statistic == LOCATION
                               else len(numeric) + ch.feature for ch in channels], np.int64)
        self._pending: BlockSums | None = None
        self.blocks = 0
        self.last: dict[str, dict[str, float]] = {}     # last block's z per feature
        self.alarms = 0

    @property
    def active(self) -> bool:
        return bool(self.channels)

    @property
    def filled(self) -> int:
        return 0 if self._pending is None else int(self._pending.events[0])

    def update(self, numeric: np.ndarray, codes: np.ndarray, positions: np.ndarray,
               ts: np.ndarray, slots: np.ndarray | None = None) -> list[Detection]:
        """Feed one batch of the model's events (the engine's columns, and its numeric
        slots when it has binned them: `ModelBatch.slots`); returns alarms."""
        if positions.size == 0:
            return []
        sums = block_sums(self.layout, numeric, codes, positions, ts, self.filled, slots)
        if self._pending is not None:
            p = self._pending
            sums.hist[0] += p.hist[0]
            sums.first[0] = min(sums.first[0], p.first[0])
            sums.last[0] = max(sums.last[0], p.last[0])
            sums.ts_min[0] = np.fmin(sums.ts_min[0], p.ts_min[0])
            sums.ts_max[0] = np.fmax(sums.ts_max[0], p.ts_max[0])
            sums.events[0] += p.events[0]
        done = int(np.count_nonzero(sums.events >= self.layout.block))
        self._pending = (None if done == sums.events.size else BlockSums(
            *(a[done:done + 1].copy() for a in (sums.hist, sums.first, sums.last,
                                                 sums.ts_min, sums.ts_max, sums.events))))
        if done == 0:
            return []
        loc, shape, _ = block_statistics(self.layout, *self.layout.split(sums.hist[:done]))
        out: list[Detection] = []
        zs = np.concatenate([loc, shape], axis=1)[:, self._zidx]
        for b in range(done):                       # one detector step per block
            z = zs[b]
            for method, (idx, bank) in self.groups.items():
                alarm, stat = bank.update(z[idx])
                for c in np.flatnonzero(alarm):
                    out.append(self._detection(idx[c], method, float(stat[c]), float(
                        z[idx[c]]), sums, b))
            self.blocks += 1
        self._record_last(loc[done - 1], shape[done - 1])
        self.alarms += len(out)
        return out

    def _detection(self, c: int, method: str, stat: float, z: float, sums: BlockSums,
                   b: int) -> Detection:
        ch = self.channels[c]
        window = {"start": _iso(float(sums.ts_min[b])), "end": _iso(float(sums.ts_max[b])),
                  "events": int(sums.events[b]), "block": self.blocks,
                  "first_line": int(sums.first[b]), "last_line": int(sums.last[b])}
        return Detection(self.model, self.layout.names[ch.feature], f"{method}_{ch.statistic}",
                         ch.statistic, stat, ch.h, z, window)

    def _record_last(self, loc: np.ndarray, shape: np.ndarray) -> None:
        lay = self.layout
        for i, name in enumerate(lay.names):
            d = {}
            if i < loc.size and loc[i] == loc[i]:
                d[LOCATION] = float(loc[i])
            if shape[i] == shape[i]:
                d[SHAPE] = float(shape[i])
            if d:
                self.last[name] = d

    # -- state ----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """JSON-able snapshot: detector statistics and the open block's sums."""
        p = self._pending
        return {
            "blocks": self.blocks,
            "alarms": self.alarms,
            "banks": {m: bank.state() for m, (_, bank) in self.groups.items()},
            "pending": None if p is None else {
                "hist": p.hist[0].tolist(),
                "first": int(p.first[0]), "last": int(p.last[0]),
                "ts_min": float(p.ts_min[0]), "ts_max": float(p.ts_max[0]),
                "events": int(p.events[0])},
        }

    def from_state(self, state: dict[str, Any]) -> None:
        self.blocks, self.alarms = int(state["blocks"]), int(state["alarms"])
        for m, s in state["banks"].items():
            self.groups[m][1].load(s)
        p = state["pending"]
        self._pending = None if p is None else BlockSums(
            np.array([p["hist"]], np.int64),
            np.array([p["first"]]), np.array([p["last"]]), np.array([p["ts_min"]]),
            np.array([p["ts_max"]]), np.array([p["events"]]))
