"""Window accumulators: exact merges, statistics against numpy, window cutting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_monitor.config import parse_config
from stream_monitor.core.engine import ModelWindows, WindowAccumulator
from stream_monitor.core.reference import Reference
from stream_monitor.io import synthetic
from stream_monitor.pipeline import ModelPipeline


@pytest.fixture(scope="module")
def pipe(churn_reference_file) -> ModelPipeline:
    cfg = parse_config({"models": {"churn": {"reference": str(churn_reference_file)}}})
    return ModelPipeline("churn", cfg, Reference.load(churn_reference_file))


@pytest.fixture(scope="module")
def batch(pipe):
    from stream_monitor.config import DecodeConfig
    from stream_monitor.io.decode import Decoder
    lines = next(synthetic.generate(600, seed=11, drift=synthetic.Drift(
        at=300, missing={"f03": 0.3}, mean_shift={"f01": 1.0})))
    decoded = Decoder({"churn": pipe.schema}, DecodeConfig()).decode(lines, range(1, 601))
    assert not decoded.rejects
    return decoded.models["churn"]


def _assert_same(a: WindowAccumulator, b: WindowAccumulator) -> None:
    assert np.array_equal(a.numeric.counts, b.numeric.counts)
    assert np.array_equal(a.numeric.n, b.numeric.n)
    assert np.array_equal(a.numeric.out_of_range, b.numeric.out_of_range)
    assert np.array_equal(a.numeric.min, b.numeric.min)
    assert np.array_equal(a.numeric.max, b.numeric.max)
    # bit for bit: the sums are exact integers on a fixed-point grid
    assert list(a.numeric.s1) == list(b.numeric.s1)
    assert list(a.numeric.s2) == list(b.numeric.s2)
    assert np.array_equal(a.prediction.counts, b.prediction.counts)
    assert np.array_equal(a.categorical.counts, b.categorical.counts)
    assert np.array_equal(a.prediction.counts, b.prediction.counts)
    assert (a.events, a.first_position, a.last_position) == (
        b.events, b.first_position, b.last_position)
    assert (a.ts_min, a.ts_max) == (b.ts_min, b.ts_max)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 600), min_size=1, max_size=5))
def test_partial_windows_merge_exactly(pipe, batch, cuts):
    layout = pipe.evaluator.layout
    whole = WindowAccumulator.empty(layout)
    whole.update(layout, batch)
    bounds = [0, *sorted(cuts), 600]
    parts = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        acc = WindowAccumulator.empty(layout)
        acc.update(layout, batch.take(slice(lo, hi)))
        parts.append(acc)
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    _assert_same(merged, whole)
    # merge order does not matter either
    rev = parts[-1]
    for p in reversed(parts[:-1]):
        rev = rev.merge(p)
    _assert_same(rev, whole)


def test_statistics_against_numpy(pipe, batch):
    layout = pipe.evaluator.layout
    acc = WindowAccumulator.empty(layout)
    acc.update(layout, batch)
    x = batch.numeric
    for j, name in enumerate(pipe.schema.numeric):
        col = x[:, j]
        present = col[~np.isnan(col)]
        prof = pipe.reference.features[name]
        a, b = layout.numeric.offsets[j], layout.numeric.offsets[j + 1]
        expected = np.histogram(present, bins=np.concatenate(
            [[-np.inf], prof.edges, [np.inf]]))[0]
        # np.histogram bins are closed on the left like searchsorted(side="right")
        assert np.array_equal(acc.numeric.counts[a:b - 1], expected), name
        assert acc.numeric.counts[b - 1] == np.isnan(col).sum()
        assert acc.numeric.n[j] == present.size
        assert acc.numeric.min[j] == present.min() and acc.numeric.max[j] == present.max()
        assert acc.numeric.out_of_range[j] == ((present < prof.min) | (present > prof.max)).sum()
    for j in range(len(pipe.schema.categorical)):
        a, b = layout.categorical.offsets[j], layout.categorical.offsets[j + 1]
        assert np.array_equal(acc.categorical.counts[a:b],
                              np.bincount(batch.categorical[:, j], minlength=b - a))


def test_missing_values_are_missing_not_zero(pipe, batch):
    j = pipe.schema.numeric.index("f03")
    col = batch.numeric[:, j]
    assert np.isnan(col[300:]).sum() > 50
    assert not np.isnan(col[:300]).any()
    assert (col == 0).sum() == 0


def test_count_windows_cut_batches_exactly(pipe, batch):
    from stream_monitor.config import WindowConfig
    windows = ModelWindows("churn", pipe.evaluator.layout, WindowConfig(events=100))
    closed = []
    for lo in range(0, 600, 37):
        got, late = windows.add(batch.take(slice(lo, min(lo + 37, 600))))
        assert late.size == 0
        closed += got
    assert [w.accumulator.events for w in closed] == [100] * 6
    assert [(w.accumulator.first_position, w.accumulator.last_position) for w in closed] == [
        (1 + 100 * i, 100 * (i + 1)) for i in range(6)]
    assert windows.open_events == 0


def test_memory_is_bounded_by_configuration(pipe, batch):
    layout = pipe.evaluator.layout
    acc = WindowAccumulator.empty(layout)
    before = acc.numeric.counts.nbytes + acc.categorical.counts.nbytes
    for _ in range(20):
        acc.update(layout, batch)
    assert acc.numeric.counts.nbytes + acc.categorical.counts.nbytes == before
    assert acc.events == 20 * 600


def _numeric_layout(n_cols: int):
    from stream_monitor.core.engine import NumericColumns
    from stream_monitor.core.reference import NumericProfile
    rng = np.random.default_rng(0)
    profiles = [NumericProfile.from_values(rng.standard_cauchy(5000) * 1e3 + 1e6, 20)
                for _ in range(n_cols)]
    return NumericColumns(profiles)


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(0, 3000), min_size=1, max_size=8),
       seed=st.integers(0, 2**16))
def test_numeric_sums_merge_bit_for_bit_over_any_cut_points(cuts, seed):
    # Cauchy tails around a large offset: float sums of these depend on the order of
    # addition in the last bits; the fixed-point sums must not.
    from stream_monitor.core.engine import NumericState
    layout = _numeric_layout(3)
    rng = np.random.default_rng(seed)
    x = rng.standard_cauchy((3000, 3)) * np.array([1e3, 1e-3, 1e5]) + 1e6
    x[rng.random(x.shape) < 0.05] = np.nan
    whole = NumericState.empty(layout)
    whole.update(layout, x)
    bounds = [0, *sorted(cuts), 3000]
    parts = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        part = NumericState.empty(layout)
        part.update(layout, x[lo:hi])
        parts.append(part)
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    shuffled = [parts[i] for i in np.random.default_rng(seed + 1).permutation(len(parts))]
    other = shuffled[0]
    for p in shuffled[1:]:
        other = p.merge(other)
    for acc in (merged, other):
        assert list(acc.s1) == list(whole.s1) and list(acc.s2) == list(whole.s2)
        assert np.array_equal(acc.counts, whole.counts)
    # and the sums are the exact sums of the standardised values, to the grid's precision
    from stream_monitor.core.stats import fixed_point_value
    z = (x - layout.shift) / layout.scale
    for j in range(3):
        col = z[:, j][~np.isnan(z[:, j])]
        exact = sum(int(round(v * 2**32)) for v in col.tolist())
        assert whole.s1[j] == exact
        assert fixed_point_value(whole.s1[j]) == pytest.approx(math.fsum(col), rel=1e-12,
                                                               abs=col.size * 2**-32)


def _grid(v: float) -> int:
    """A value on the fixed-point grid, exactly (saturating at +-2**1000 as documented)."""
    q = v * 2**32
    return int(round(q)) if math.isfinite(q) else (1 << 1000) * (1 if q > 0 else -1)


@pytest.mark.parametrize("seed", range(4))
def test_numeric_update_against_an_independent_computation(seed):
    # the window update computes bins once per batch, bounds the sums by the batch's min
    # and max and sums in float64 below 2**53: every field must equal a plain computation
    # (searchsorted bins, exact Python-int sums of round(z * 2**32) and round(z*z * 2**32))
    # on tails, huge values, integer ties and columns with missing values only
    from stream_monitor.core.engine import NumericColumns, NumericState
    from stream_monitor.core.reference import NumericProfile
    rng = np.random.default_rng(seed)
    n = 4000
    cols = [rng.normal(0, 1, n), rng.standard_cauchy(n) * 1e3, rng.integers(0, 6, n) * 1.0,
            rng.lognormal(3, 2, n), rng.normal(1e9, 1e-3, n), rng.normal(0, 1, n)]
    ref = np.column_stack([c[rng.permutation(n)] for c in cols])
    layout = NumericColumns([NumericProfile.from_values(ref[:, j], 20)
                             for j in range(ref.shape[1])])
    x = np.column_stack([c[rng.permutation(n)] for c in cols])
    x[rng.random(x.shape) < 0.05] = np.nan
    x[:, 5] = np.nan                            # a column without a single value
    x[7, 1], x[8, 1] = 1e200, -1e150            # beyond int64 and float-sum bounds
    state = NumericState.empty(layout)
    for lo in range(0, n, 1500):               # several updates: sums accumulate
        state.update(layout, x[lo:lo + 1500])
    for j in range(x.shape[1]):
        col = x[:, j]
        ok = col[~np.isnan(col)]
        edges = layout.edges[j]
        want = np.bincount(np.searchsorted(edges, ok, side="right"), minlength=edges.size + 1)
        got = state.counts[layout.offsets[j]:layout.offsets[j + 1]]
        assert got[:-1].tolist() == want.tolist() and got[-1] == col.size - ok.size
        assert state.n[j] == ok.size
        z = (ok - layout.shift[j]) / layout.scale[j]
        assert state.s1[j] == sum(map(_grid, z.tolist()))
        with np.errstate(over="ignore"):
            assert state.s2[j] == sum(map(_grid, (z * z).tolist()))
        if ok.size:
            assert (state.min[j], state.max[j]) == (ok.min(), ok.max())
        assert state.out_of_range[j] == np.count_nonzero(
            (ok < layout.lo[j]) | (ok > layout.hi[j]))
