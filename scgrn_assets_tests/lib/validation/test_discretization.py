"""Quantile codes with the zero bin, against a brute-force rule."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from scgrn_assets.lib.validation import discretization
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets_tests.support.validation import N_BINS


def brute_force_codes(column: np.ndarray, n_bins: int) -> np.ndarray:
    """The documented rule, cell by cell: zeros -> 0, positives by lowest tie rank."""
    codes = np.zeros(column.shape[0], dtype=np.int64)
    positive = column > 0
    has_zeros = not positive.all()
    n_positive_bins = n_bins - 1 if has_zeros else n_bins
    lowest_rank = stats.rankdata(column[positive], method="min") - 1
    codes[positive] = int(has_zeros) + (lowest_rank * n_positive_bins) // positive.sum()
    return codes


def test_discretize_quantiles_follows_the_zero_bin_rule():
    rng = np.random.default_rng(1)
    values = rng.poisson(0.7, size=(400, 6)).astype(float) * rng.gamma(2.0, size=(400, 1))
    values[:, 1] = rng.poisson(2.0, size=400)  # integers: many ties among positives
    values[:, 2] = rng.gamma(2.0, size=400) + 0.1  # no zeros: all bins for values
    values[:, 3] = 0.0  # all zero
    codes = discretization.discretize_quantiles(values, n_bins=N_BINS)
    assert codes.shape == values.shape and codes.dtype == np.uint8
    for gene in range(values.shape[1]):
        np.testing.assert_array_equal(codes[:, gene], brute_force_codes(values[:, gene], N_BINS))
    assert set(np.unique(codes[:, 2])) == set(range(N_BINS))
    assert (codes[values[:, 0] == 0, 0] == 0).all() and (codes[values[:, 0] > 0, 0] > 0).all()
    # Equal values never straddle two bins.
    for value in np.unique(values[:, 1]):
        assert np.unique(codes[values[:, 1] == value, 1]).size == 1


def test_discretize_quantiles_of_one_column_and_sparse_input_agree():
    rng = np.random.default_rng(2)
    values = rng.poisson(0.5, size=(300, 4)).astype(float)
    dense_codes = discretization.discretize_quantiles(values)
    np.testing.assert_array_equal(discretization.discretize_quantiles(sp.csr_matrix(values)), dense_codes)
    np.testing.assert_array_equal(discretization.discretize_quantiles(values[:, 2]), dense_codes[:, 2])


def test_discretize_expression_uses_log1p_normalised_counts():
    rng = np.random.default_rng(3)
    counts = rng.poisson(0.8, size=(250, 7)).astype(np.float32)
    n_counts = counts.sum(axis=1) + rng.integers(100, 1000, size=250)
    gene_names = np.array([f"g{i}" for i in range(7)])
    discretized = discretization.discretize_expression(sp.csr_matrix(counts), n_counts, gene_names, genes=["g5", "g1"])
    expression = np.log1p(counts / n_counts[:, None] * 1e4)
    np.testing.assert_array_equal(discretized.codes[0], brute_force_codes(expression[:, 5], N_BINS))
    np.testing.assert_array_equal(discretized.codes[1], brute_force_codes(expression[:, 1], N_BINS))
    assert list(discretized.gene_names) == ["g5", "g1"]


def test_discretize_expression_rejects_empty_cells_and_unknown_genes():
    counts = sp.csr_matrix(np.ones((3, 2), dtype=np.float32))
    with pytest.raises(ScgrnInputError, match="n_counts <= 0"):
        discretization.discretize_expression(counts, np.array([2.0, 0.0, 2.0]), np.array(["a", "b"]))
    with pytest.raises(ScgrnInputError, match="not in the corpus"):
        discretization.discretize_expression(counts, np.full(3, 2.0), np.array(["a", "b"]), genes=["zz"])
