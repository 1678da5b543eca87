"""Expression → per-gene quantile codes, zero expression its own bin: the input of the MI estimators."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.benchmarks.expression import log_normalized
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.validation._kernels import column_codes_kernel

DEFAULT_N_BINS = 5
DEFAULT_TARGET_SUM = 1e4


@dataclass(frozen=True)
class DiscretizedGenes:
    """Quantile codes of some genes over all cells.

    Attributes
    ----------
    gene_names
        Shape (n_genes,), the gene symbols, in the row order of ``codes``.
    codes
        Shape (n_genes, n_cells), uint8 codes in ``[0, n_bins)``, gene-major (C order).
    n_bins
        Number of bins each gene was cut into (some may be empty, see
        :func:`discretize_quantiles`).
    """

    gene_names: np.ndarray
    codes: np.ndarray
    n_bins: int

    @property
    def n_cells(self) -> int:
        return int(self.codes.shape[1])

    def gene_index(self, genes: np.ndarray) -> np.ndarray:
        """Row of each gene in ``codes``; ScgrnInputError names the genes that are absent."""
        lookup = pd.Index(self.gene_names)
        rows = lookup.get_indexer(np.asarray(genes, dtype=object))
        if (rows < 0).any():
            absent = sorted(set(np.asarray(genes, dtype=object)[rows < 0].tolist()))
            raise ScgrnInputError(
                f"{len(absent)} genes are not among the discretised genes, e.g. {absent[:5]}",
                file="combined_corpus",
                fix="discretise every gene in the candidate edges (pass them as `genes`)",
            )
        return rows.astype(np.int64)


def _quantile_codes_csc(matrix: sp.csc_matrix, n_bins: int) -> np.ndarray:
    """Quantile codes of each column of a non-negative CSC matrix; shape (n_cols, n_rows), uint8."""
    n_rows, n_cols = matrix.shape
    matrix = matrix.copy()
    matrix.eliminate_zeros()
    if matrix.nnz and matrix.data.min() < 0:
        raise ScgrnInputError(
            "negative expression values cannot be discretised with a zero bin",
            fix="pass counts or log1p-normalised expression (>= 0)",
        )
    codes = np.zeros((n_cols, n_rows), dtype=np.uint8)
    column_codes_kernel(
        matrix.indptr.astype(np.int64), matrix.indices.astype(np.int64), matrix.data.astype(np.float64), n_bins, codes
    )
    return codes


def discretize_quantiles(values: np.ndarray | sp.spmatrix, n_bins: int = DEFAULT_N_BINS) -> np.ndarray:
    """Per-column equal-frequency codes with zero as its own bin.

    The rule for ties at zero: in single-cell data most values of a gene are exactly 0,
    and plain quantile edges would collapse several bins onto 0. Here every cell with
    value 0 gets code 0, and the positive values are split by rank into ``n_bins - 1``
    equal-frequency bins (codes ``1 .. n_bins - 1``). A column without any zero uses all
    ``n_bins`` codes for its values. Tied values always share the bin of their lowest
    rank, so a bin is never split between equal values and may stay empty instead.

    Parameters
    ----------
    values
        Shape (n_cells,) or (n_cells, n_genes), non-negative, dense or sparse.
    n_bins
        Number of bins, 2 to 255.

    Returns
    -------
    uint8 array of the shape of ``values`` with codes in ``[0, n_bins)``.
    """
    if not 2 <= n_bins <= 255:
        raise ScgrnInputError(f"n_bins must be in [2, 255], got {n_bins}", fix="pass 2 <= n_bins <= 255")
    is_vector = not sp.issparse(values) and np.ndim(values) == 1
    matrix = sp.csc_matrix(np.asarray(values).reshape(-1, 1) if is_vector else values, dtype=np.float64)
    codes_by_gene = _quantile_codes_csc(matrix, n_bins)
    return codes_by_gene[0] if is_vector else codes_by_gene.T


def discretize_expression(
    counts: sp.spmatrix,
    n_counts: np.ndarray,
    gene_names: np.ndarray,
    genes: np.ndarray | None = None,
    n_bins: int = DEFAULT_N_BINS,
    target_sum: float = DEFAULT_TARGET_SUM,
) -> DiscretizedGenes:
    """Quantile codes of ``log1p(counts / n_counts * target_sum)`` for the chosen genes.

    Parameters
    ----------
    counts
        Shape (n_cells, n_genes), sparse integer-valued counts (CSR or CSC).
    n_counts
        Shape (n_cells,), library size of each cell over all genes (> 0).
    gene_names
        Shape (n_genes,), gene symbols naming the columns of ``counts``.
    genes
        Symbols to discretise (default: all), e.g. the genes of the candidate edges.
    n_bins
        Bins per gene; see :func:`discretize_quantiles` for the rule at zero.
    target_sum
        Counts per cell after normalisation (1e4 as in scanpy's ``normalize_total``).
    """
    gene_names = np.asarray(gene_names).astype(str)
    n_counts = np.asarray(n_counts, dtype=np.float64)
    if counts.shape != (n_counts.shape[0], gene_names.shape[0]):
        raise ScgrnInputError(
            f"counts have shape {counts.shape} but there are {n_counts.shape[0]} library sizes "
            f"and {gene_names.shape[0]} gene names",
            file="combined_corpus",
            fix="pass counts, obs['n_counts'] and var gene symbols of the same AnnData",
        )
    if (n_counts <= 0).any():
        raise ScgrnInputError(
            f"{int((n_counts <= 0).sum())} cells have n_counts <= 0",
            file="combined_corpus",
            fix="drop empty cells in QC before computing mutual information",
        )
    if genes is None:
        selected = np.arange(gene_names.shape[0])
    else:
        selected = pd.Index(gene_names).get_indexer(np.asarray(genes, dtype=object))
    if (selected < 0).any():
        absent = np.asarray(genes, dtype=object)[selected < 0][:5].tolist()
        raise ScgrnInputError(
            f"{int((selected < 0).sum())} requested genes are not in the corpus, e.g. {absent}",
            file="combined_corpus",
            fix="build the candidate edges from the same corpus",
        )
    # float64 so that distinct values never collapse into ties before ranking.
    columns = log_normalized(sp.csc_matrix(counts)[:, selected], n_counts, target_sum, dtype=np.float64).tocsc()
    codes = _quantile_codes_csc(columns, n_bins)
    return DiscretizedGenes(gene_names=gene_names[selected], codes=codes, n_bins=n_bins)
