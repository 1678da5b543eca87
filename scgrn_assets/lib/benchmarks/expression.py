"""Expression values shared by the co-expression, MI and benchmark stages."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError

TARGET_SUM = 1e4


def log_normalized(counts: sp.spmatrix, n_counts: np.ndarray, target_sum: float = TARGET_SUM,
                   dtype=np.float32) -> sp.csr_matrix:
    """``log1p(counts / n_counts * target_sum)`` per cell; shape (n_cells, n_genes), CSR of ``dtype``.

    ``n_counts`` is the library size over all of the cell's genes (obs["n_counts"]), so a
    gene subset keeps the scale it had in the full cell.
    """
    counts = sp.csr_matrix(counts, dtype=dtype)
    n_counts = np.asarray(n_counts, dtype=np.float64)
    if n_counts.shape != (counts.shape[0],) or np.any(n_counts <= 0):
        raise ScgrnInputError("n_counts must be one positive library size per cell",
                              fix="recompute obs['n_counts'] as each cell's total count")
    scale = np.repeat(target_sum / n_counts, np.diff(counts.indptr)).astype(dtype)
    values = np.log1p(counts.data * scale)
    return sp.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape)
