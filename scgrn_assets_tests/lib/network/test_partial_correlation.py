"""Partial correlation of attention blocks, full and triangle form, both backends, against numpy pinv."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scgrn_assets.lib.network.partial_correlation import (
    PCORR_METHODS,
    partial_correlation,
    partial_correlation_triangle,
    triangle_pairs,
)
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets_tests.support.network import (BACKENDS, PCORR_ATOL, PCORR_RTOL, SHRINKAGE, numpy_pcorr, random_blocks,
                                                random_cells)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_correlation_matches_numpy_pinv(backend):
    blocks = random_blocks(6, 12, seed=0)
    pcorr = partial_correlation(torch.as_tensor(blocks), backend=backend).numpy()
    for cell in range(6):
        np.testing.assert_allclose(pcorr[cell], numpy_pcorr(blocks[cell]), rtol=PCORR_RTOL, atol=PCORR_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_correlation_ignores_invalid_slots(backend):
    blocks = random_blocks(3, 10, seed=1)
    valid = np.ones((3, 10), dtype=bool)
    valid[0, 6:] = False
    valid[2, [1, 4, 9]] = False
    blocks[~valid] = 123.0  # garbage in padded rows must not leak
    pcorr = partial_correlation(torch.as_tensor(blocks), torch.as_tensor(valid), backend=backend).numpy()
    for cell in range(3):
        kept = np.flatnonzero(valid[cell])
        expected = numpy_pcorr(blocks[cell][np.ix_(kept, kept)])
        np.testing.assert_allclose(pcorr[cell][np.ix_(kept, kept)], expected, rtol=PCORR_RTOL, atol=PCORR_ATOL)
        dropped = np.flatnonzero(~valid[cell])
        assert np.all(pcorr[cell][dropped, :] == 0) and np.all(pcorr[cell][:, dropped] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_correlation_of_a_singular_block_still_matches_pinv(backend):
    # Identical attention rows: the cosine matrix is rank-deficient, shrinkage keeps it invertible.
    block = np.tile(random_blocks(1, 8, seed=2)[0, :1], (8, 1))
    pcorr = partial_correlation(torch.as_tensor(block[None]), backend=backend).numpy()[0]
    np.testing.assert_allclose(pcorr, numpy_pcorr(block), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_cholesky_falls_back_to_pinv(backend):
    # λ = 0 and an all-zero attention row: the cosine matrix has a zero row and column, the
    # Cholesky factorisation fails at that pivot, and the pseudo-inverse is the inverse of the
    # cosine matrix of the other rows (plus zeros). Pairs with the zero gene are 0/0, not compared.
    blocks = random_blocks(2, 8, seed=4)
    blocks[1, 3, :] = 0.0
    cosine = blocks[1] / np.linalg.norm(blocks[1], axis=1, keepdims=True).clip(1e-300)
    assert np.linalg.cholesky(cosine @ cosine.T + np.eye(8) * np.eye(8)[3]) is not None  # only the pivot is 0
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(cosine @ cosine.T)
    pcorr = partial_correlation(torch.as_tensor(blocks), shrinkage=0.0, backend=backend).numpy()
    np.testing.assert_allclose(pcorr[0], numpy_pcorr(blocks[0], shrinkage=0.0), rtol=1e-6, atol=1e-8)
    others = np.array([0, 1, 2, 4, 5, 6, 7])
    np.testing.assert_allclose(pcorr[1][np.ix_(others, others)],
                               numpy_pcorr(blocks[1][others], shrinkage=0.0), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("permuted", [False, True], ids=["slot_order", "permuted"])
def test_triangle_form_matches_numpy_per_cell(backend, permuted):
    blocks, _genes, valid = random_cells(9, 11, 50, seed=5)
    rng = np.random.default_rng(6)
    order = np.stack([rng.permutation(11) for _cell in range(9)]) if permuted else None
    rows, columns = (index.numpy() for index in triangle_pairs(11))
    # float32 blocks, float64 computation: the cast happens per cell and changes nothing.
    got = partial_correlation_triangle(torch.as_tensor(blocks), torch.as_tensor(valid), backend=backend,
                                       order=None if order is None else torch.as_tensor(order),
                                       dtype=torch.float64).numpy()
    assert got.shape == (9, 55) and got.dtype == np.float64
    for cell in range(9):
        kept = np.flatnonzero(valid[cell])
        expected = np.zeros((11, 11))
        if len(kept):
            expected[np.ix_(kept, kept)] = numpy_pcorr(blocks[cell][np.ix_(kept, kept)].astype(np.float64))
        slots = np.arange(11) if order is None else order[cell]
        np.testing.assert_allclose(got[cell], expected[slots[rows], slots[columns]], rtol=PCORR_RTOL, atol=PCORR_ATOL)
    same = partial_correlation_triangle(torch.as_tensor(blocks.astype(np.float64)), torch.as_tensor(valid),
                                        backend=backend, order=None if order is None else torch.as_tensor(order))
    np.testing.assert_array_equal(same.numpy(), got)


def test_partial_correlation_methods_are_named():
    assert "cosine_shrunk_pinv" in PCORR_METHODS
    blocks = torch.as_tensor(random_blocks(2, 5, seed=3))
    stronger = partial_correlation(blocks, method="cosine_shrunk_pinv", shrinkage=0.5).numpy()
    np.testing.assert_allclose(stronger[1], numpy_pcorr(blocks[1].numpy(), shrinkage=0.5), rtol=1e-9)
    with pytest.raises(ScgrnInputError, match="cosine_shrunk_pinv"):
        partial_correlation(blocks, method="no_such_method")


def test_within_cell_standardised_pcorr_matches_numpy_and_its_spread_does_not_depend_on_cell_length():
    from scgrn_assets.lib.network.partial_correlation import standardized_within_cell

    # Against a per-cell numpy computation, with invalid slots.
    blocks = torch.as_tensor(random_blocks(3, 7, seed=12))
    valid = torch.ones((3, 7), dtype=torch.bool)
    valid[1, 5:] = False
    z = partial_correlation(blocks, valid, method="cosine_shrunk_pinv_cell_z", shrinkage=SHRINKAGE).numpy()
    for cell in range(3):
        n = int(valid[cell].sum())
        raw = numpy_pcorr(blocks[cell, :n, :n].numpy(), shrinkage=SHRINKAGE)
        off = ~np.eye(n, dtype=bool)
        expected = (raw - raw[off].mean()) / raw[off].std(ddof=1)
        np.testing.assert_allclose(z[cell, :n, :n][off], expected[off], rtol=1e-9, atol=1e-10)
        assert (z[cell, n:, :] == 0).all() and (np.diag(z[cell])[:n] == 1).all()
    assert (standardized_within_cell(torch.zeros((1, 3, 3)), torch.ones((1, 3), dtype=torch.bool))[0, 0, 1] == 0)

    # Raw per-cell pcorr spreads less in longer cells; the standardised statistic does not.
    spreads_raw, spreads_z = {}, {}
    for length in (20, 80):
        blocks = torch.as_tensor(random_blocks(30, length, seed=length))
        full_valid = torch.ones((30, length), dtype=torch.bool)
        raw = partial_correlation(blocks, full_valid, shrinkage=SHRINKAGE).numpy()
        standardised = partial_correlation(blocks, full_valid, method="cosine_shrunk_pinv_cell_z",
                                           shrinkage=SHRINKAGE).numpy()
        off = ~np.eye(length, dtype=bool)
        spreads_raw[length] = np.median([cell[off].std() for cell in raw])
        spreads_z[length] = np.median([cell[off].std() for cell in standardised])
    assert spreads_raw[20] > 1.5 * spreads_raw[80]
    assert spreads_z[20] == pytest.approx(spreads_z[80], rel=0.05)
