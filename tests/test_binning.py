"""`stats.GridBins` (the engine's binning) gives exactly `stats.bin_index`'s bins."""

from __future__ import annotations

import numpy as np
import pytest

from stream_monitor.core.stats import GridBins, bin_index

FAMILIES = {
    "cauchy": lambda rng, n: rng.standard_cauchy(n),
    "lognormal": lambda rng, n: rng.lognormal(0, 3, n),
    "zero-inflated": lambda rng, n: np.where(rng.random(n) < 0.7, 0.0, rng.exponential(5, n)),
    "integers": lambda rng, n: rng.integers(0, 5, n).astype(float),
    "large-offset": lambda rng, n: 1e15 + rng.normal(0, 1, n),
    "subnormal": lambda rng, n: rng.normal(0, 1e-310, n),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("seed", range(3))
def test_grid_bins_equal_searchsorted_everywhere(family, seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        ref = FAMILIES[family](rng, 2_000)
        edges = np.sort(rng.choice(ref, rng.integers(0, 60)))   # duplicates too
        values = np.concatenate([
            FAMILIES[family](rng, 500), edges, np.nextafter(edges, np.inf),
            np.nextafter(edges, -np.inf),
            [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e308, -1e308, 5e-324]])
        bins = GridBins(edges)
        for _ in range(2):          # also once the table may be set aside
            with np.errstate(all="raise", under="ignore"):   # numpy ignores underflow
                got = bins(values)
            np.testing.assert_array_equal(got, bin_index(edges, values))


def test_grid_bins_use_the_table_on_continuous_data():
    rng = np.random.default_rng(1)
    edges = np.quantile(rng.standard_cauchy(50_000), np.linspace(0, 1, 51)[1:-1])
    bins = GridBins(edges)
    assert bins.table is not None
    x = rng.standard_cauchy(10_000)
    np.testing.assert_array_equal(bins(x), bin_index(edges, x))
    assert bins.rest <= 0           # few values needed the search: the table is kept


@pytest.mark.parametrize("seed", range(3))
def test_grid_bins_look_integers_up_in_the_integer_table(seed):
    """Integer data on atom edges ([a, nextafter(a)) bins, as `profile_edges` makes):
    the grid table steps aside and integer values take the integer table, exactly;
    values one ulp off an integer, fractions, NaN and far values are searched."""
    from stream_monitor.core.stats import profile_edges
    rng = np.random.default_rng(seed)
    lo = int(rng.integers(-60, 20))
    ref = rng.integers(lo, lo + 70, 5_000).astype(float)
    edges = profile_edges(ref, 50)     # every value an atom (a share >= 1%)
    bins = GridBins(edges)
    assert bins.ints is not None
    atoms = np.unique(ref)
    odd = np.concatenate([np.nextafter(atoms, np.inf), np.nextafter(atoms, -np.inf),
                          atoms + 0.5, [np.nan, np.inf, -np.inf, -0.0, 1e300, -1e300,
                                        lo - 1e6, lo + 1e6]])
    for _ in range(3):      # the grid table is set aside after the first call
        x = np.concatenate([rng.integers(lo - 3, lo + 73, 10_000).astype(float),
                            rng.choice(odd, 200)])
        np.testing.assert_array_equal(bins(x), bin_index(edges, x))
    assert bins.rest > 0 and bins.ints_rest <= 0    # integers: the integer table is kept
    x = rng.uniform(lo, lo + 70, 2_000)             # fractions: plain search for a while
    np.testing.assert_array_equal(bins(x), bin_index(edges, x))
    assert bins.ints_rest > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grid_bins_with_an_offset_write_slots_into_out(family):
    """The engine's form: every bin plus the column's first slot, written into a column
    of its slots matrix, in every mode (grid table, integer table, plain search)."""
    rng = np.random.default_rng(7)
    for offset in (0, 1, 12_345):
        ref = FAMILIES[family](rng, 2_000)
        edges = np.sort(rng.choice(ref, rng.integers(0, 60)))
        bins = GridBins(edges, offset)
        matrix = np.full((600, 3), -7, np.int64, order="F")
        for _ in range(20):         # through the modes' switches
            values = np.concatenate([FAMILIES[family](rng, 590), edges[:5],
                                     [np.nan, np.inf, -np.inf, 0.0, 1e308]])[:600]
            got = bins(values, matrix[:, 1])
            want = bin_index(edges, values) + offset
            np.testing.assert_array_equal(matrix[:, 1], want)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(bins(values), want)
        assert (matrix[:, [0, 2]] == -7).all()      # the other columns untouched
