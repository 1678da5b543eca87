"""Mergeable sufficient statistics of a per-cell gene feature: n, Σx, Σxxᵀ over a gene universe,
plus the two higher sums Ledoit–Wolf shrinkage needs (Σ‖x‖²x and Σ‖x‖⁴), streamed chunk by chunk.

Groups of cells of one study merge by addition; studies are combined, each centred on its own
mean, by :func:`scgrn_assets.lib.network.cross_cell.within_study_covariance`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp
from scipy.linalg.blas import dsyrk

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network import _kernels
from scgrn_assets.lib.storage import atomic_path

# ---------------------------------------------------------------------------------------------
# Mergeable sufficient statistics
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureMoments:
    """Raw sums of a per-cell gene feature over one group of cells (e.g. one study).

    Two groups of the *same* study merge by adding every field (:meth:`merged`); different
    studies are kept apart and combined by :func:`within_study_covariance`.

    Attributes
    ----------
    genes
        Shape (n_genes,), str: the gene universe (dictionary keys or symbols), in column order.
    n_cells
        Cells summed.
    feature_sum
        Shape (n_genes,): Σ_c x_c.
    cross_product
        Shape (n_genes, n_genes), symmetric: Σ_c x_c x_cᵀ.
    norm2_weighted_sum
        Shape (n_genes,): Σ_c ‖x_c‖² x_c (for the Ledoit–Wolf intensity after centring).
    norm4_sum
        Σ_c ‖x_c‖⁴.
    """

    genes: np.ndarray
    n_cells: int
    feature_sum: np.ndarray
    cross_product: np.ndarray
    norm2_weighted_sum: np.ndarray
    norm4_sum: float

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def mean(self) -> np.ndarray:
        """Shape (n_genes,): the feature's mean over the cells (0 with no cells)."""
        return self.feature_sum / max(self.n_cells, 1)

    def scatter(self) -> np.ndarray:
        """Shape (n_genes, n_genes): Σ_c (x_c − μ)(x_c − μ)ᵀ, centred on this group's own mean."""
        return self.cross_product - np.outer(self.feature_sum, self.mean)

    def centred_norm4_sum(self) -> float:
        """Σ_c ‖x_c − μ‖⁴ from the raw sums: with a = ‖x‖², b = xᵀμ, c = ‖μ‖²,
        ‖x − μ‖⁴ = (a − 2b + c)², expanded into sums this object holds."""
        mu = self.mean
        c = float(mu @ mu)
        sum_a2 = self.norm4_sum
        sum_b2 = float(mu @ self.cross_product @ mu)
        sum_ab = float(self.norm2_weighted_sum @ mu)
        sum_a = float(np.trace(self.cross_product))
        sum_b = float(self.feature_sum @ mu)
        return (sum_a2 + 4 * sum_b2 + self.n_cells * c * c - 4 * sum_ab + 2 * c * sum_a - 4 * c * sum_b)

    def merged(self, other: "FeatureMoments") -> "FeatureMoments":
        """The sums of both groups (cells of the same study): exact up to float addition order."""
        if not np.array_equal(self.genes, other.genes):
            raise ScgrnInputError("feature moments over different gene universes cannot merge",
                                  fix="accumulate every part over the same gene universe")
        return FeatureMoments(self.genes, self.n_cells + other.n_cells, self.feature_sum + other.feature_sum,
                              self.cross_product + other.cross_product,
                              self.norm2_weighted_sum + other.norm2_weighted_sum, self.norm4_sum + other.norm4_sum)

    def save_npz(self, path: str | Path) -> Path:
        """Write to ``path`` (.npz) through a temporary name; only the upper triangle of Σxxᵀ is stored."""
        path = Path(path)
        upper = np.triu_indices(self.n_genes)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, genes=self.genes.astype(str), n_cells=np.int64(self.n_cells),
                     feature_sum=self.feature_sum, cross_product_upper=self.cross_product[upper],
                     norm2_weighted_sum=self.norm2_weighted_sum, norm4_sum=np.float64(self.norm4_sum))
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> "FeatureMoments":
        with np.load(path, allow_pickle=False) as data:
            genes = data["genes"]
            cross = np.zeros((len(genes), len(genes)))
            cross[np.triu_indices(len(genes))] = data["cross_product_upper"]
            cross = cross + np.triu(cross, 1).T
            return cls(genes, int(data["n_cells"]), data["feature_sum"], cross, data["norm2_weighted_sum"],
                       float(data["norm4_sum"]))


class FeatureMomentAccumulator:
    """Streams chunks of cells × genes features into :class:`FeatureMoments`.

    Σxxᵀ is updated one of two ways, chosen per chunk by its density: a sparse chunk (rank-value
    scores: 256 genes of a 3,000-gene universe per cell) adds each cell's nnz² / 2 products
    straight into the upper triangle (a numba loop over tiles of output rows, sharded over
    ``threads``: the cost per cell is nnz², not n_genes²); a dense one becomes a float64 block added by BLAS
    ``dsyrk`` (half the flops of ``X.T @ X``, no centred copy). Each way has its own accumulator,
    made on first use (one n_genes² matrix for a feature that is always sparse or always dense).
    """

    def __init__(self, genes: Sequence[str], threads: int | None = None):
        self.threads = max(1, int(threads or numba.get_num_threads()))
        self.genes = np.asarray(genes, dtype=str)
        n_genes = len(self.genes)
        self.n_cells = 0
        self.feature_sum = np.zeros(n_genes)
        # Fortran order: dsyrk updates it in place (upper triangle) without a copy.
        self._cross_dense: np.ndarray | None = None
        # C order: the sparse loop writes one contiguous row at a time.
        self._cross_sparse: np.ndarray | None = None
        self.norm2_weighted_sum = np.zeros(n_genes)
        self.norm4_sum = 0.0

    def add(self, features) -> None:
        """Add a chunk, shape (n_cells_chunk, n_genes), scipy sparse or dense."""
        if features.shape[1] != len(self.genes):
            raise ScgrnInputError(f"a feature chunk has {features.shape[1]} columns, the universe {len(self.genes)}",
                                  fix="build every chunk over the accumulator's gene universe")
        if features.shape[0] == 0:
            return
        n_cells, n_genes = features.shape
        if sp.issparse(features):
            chunk = sp.csr_matrix(features, dtype=np.float64)
            chunk.sum_duplicates()  # also sorts each row's column indices, which the upper-triangle loop needs
            mean_nnz = chunk.nnz / n_cells
            # The sparse loop pays nnz²/2 scattered adds per cell, BLAS n_genes²/2 streamed ones: the
            # loop wins while cells hold well under a third of the universe.
            if mean_nnz * 3 < n_genes:
                self._add_sparse(chunk)
                return
            dense = chunk.toarray()
        else:
            dense = np.asarray(features, dtype=np.float64)
        dense = np.ascontiguousarray(dense)
        # dense is C-ordered (cells x genes), so dense.T is Fortran-ordered: dsyrk reads it without copying.
        if self._cross_dense is None:
            self._cross_dense = np.zeros((n_genes, n_genes), order="F")
        self._cross_dense = dsyrk(1.0, dense.T, beta=1.0, c=self._cross_dense, trans=0, lower=0, overwrite_c=1)
        norm2 = np.einsum("ij,ij->i", dense, dense)
        self.n_cells += n_cells
        self.feature_sum += dense.sum(axis=0)
        self.norm2_weighted_sum += norm2 @ dense
        self.norm4_sum += float(norm2 @ norm2)

    def _add_sparse(self, chunk: sp.csr_matrix) -> None:
        n_genes = len(self.genes)
        if self._cross_sparse is None:
            self._cross_sparse = np.zeros((n_genes, n_genes))
        arguments = (chunk.indptr.astype(np.int64), chunk.indices.astype(np.int32), chunk.data, self._cross_sparse,
                     _kernels.SPARSE_TILE_ROWS)
        if self.threads == 1:
            _kernels.add_sparse_outer_products(*arguments, 0, 1)
        else:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(lambda shard: _kernels.add_sparse_outer_products(*arguments, shard, self.threads),
                              range(self.threads)))
        norm2 = np.asarray(chunk.multiply(chunk).sum(axis=1)).ravel()
        self.n_cells += chunk.shape[0]
        self.feature_sum += np.asarray(chunk.sum(axis=0)).ravel()
        self.norm2_weighted_sum += chunk.T @ norm2
        self.norm4_sum += float(norm2 @ norm2)

    def result(self) -> FeatureMoments:
        parts = [part for part in (self._cross_dense, self._cross_sparse) if part is not None]
        if not parts:
            parts = [np.zeros((len(self.genes), len(self.genes)))]
        # Both ways write only the upper triangle (their lower ones hold zeros or dsyrk's leftovers).
        upper = parts[0] if len(parts) == 1 else np.triu(parts[0]) + np.triu(parts[1])
        return FeatureMoments(self.genes.copy(), self.n_cells, self.feature_sum.copy(),
                              _kernels.symmetrised_from_upper(upper), self.norm2_weighted_sum.copy(), self.norm4_sum)


def accumulate_feature_moments(chunks: Iterable, genes: Sequence[str], threads: int | None = None) -> FeatureMoments:
    """:class:`FeatureMoments` of every chunk (cells × ``genes``) in ``chunks``."""
    accumulator = FeatureMomentAccumulator(genes, threads=threads)
    for chunk in chunks:
        accumulator.add(chunk)
    return accumulator.result()
