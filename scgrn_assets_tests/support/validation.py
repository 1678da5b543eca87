"""Validation-stage test support: the bin count and discretised codes shaped like single-cell data."""

from __future__ import annotations

import numpy as np


N_BINS = 5


def sparse_like_codes(rng: np.random.Generator, n_genes: int, n_cells: int) -> np.ndarray:
    """Codes with many zeros (as after discretising single-cell data) plus one gene without zeros."""
    codes = rng.integers(0, N_BINS, size=(n_genes, n_cells))
    codes[rng.random((n_genes, n_cells)) < 0.6] = 0
    codes[0] = rng.integers(1, N_BINS, size=n_cells)
    return codes.astype(np.uint8)
