"""The cell-level NB model's inputs: which cells and genes, as arrays the model reads, and its exact count tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scgrn_assets.lib.corpus.build import measured_column
from scgrn_assets.lib.errors import ScgrnInputError


#: Counts below this use the exact ``sum_k m_g(k) log(phi + k)`` table; larger ones use lgamma.
SMALL_COUNT_TABLE_SIZE = 16


@dataclass
class NBData:
    """The fit's inputs, checked and reduced to what the model needs.

    Built by :func:`prepare_nb_data`. Only cells with a known condition are kept.

    Attributes
    ----------
    counts : scipy.sparse.csr_matrix, shape (n_cells, n_genes)
        Integer counts, float32.
    log_library_size : np.ndarray, shape (n_cells,)
        ``log s_i``, float32.
    condition : np.ndarray, shape (n_cells,)
        0 (control) or 1 (condition), float32.
    study_index : np.ndarray, shape (n_cells,)
        Index into ``study_names``, int32.
    log_gene_length_kb : np.ndarray, shape (n_genes,)
        ``log(L_g / 1000 bp)``, float32.
    study_names, gene_names : list of str
    """

    counts: sp.csr_matrix
    log_library_size: np.ndarray
    condition: np.ndarray
    study_index: np.ndarray
    log_gene_length_kb: np.ndarray
    study_names: list[str]
    gene_names: list[str]

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    @property
    def n_studies(self) -> int:
        return len(self.study_names)

    def design(self) -> np.ndarray:
        """Per-cell design rows ``[1, c_i, onehot(study_i)]``, shape (n_cells, 2 + n_studies), float32."""
        onehot = np.zeros((self.n_cells, self.n_studies), dtype=np.float32)
        onehot[np.arange(self.n_cells), self.study_index] = 1.0
        return np.column_stack([np.ones(self.n_cells, np.float32), self.condition, onehot]).astype(np.float32)


@dataclass
class NBSufficientStatistics:
    """Data-only summaries that make the exact parts of the log-likelihood cheap.

    Attributes
    ----------
    exceed_counts : np.ndarray, shape (SMALL_COUNT_TABLE_SIZE, n_genes)
        ``m_g(k)``: number of cells with ``y_ig > k``.
    tail_gene, tail_value, tail_multiplicity : np.ndarray, shape (n_tail,)
        Distinct (gene, count) pairs with count > SMALL_COUNT_TABLE_SIZE and how many cells have them.
    """

    exceed_counts: np.ndarray
    tail_gene: np.ndarray
    tail_value: np.ndarray
    tail_multiplicity: np.ndarray


def select_model_genes(adata, n_top_genes: int = 3000, batch_key: str = "study") -> np.ndarray:
    """Indices (into ``adata.var``) of the highly variable genes the model is fitted on.

    Uses ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")`` on raw counts with the study as
    batch, on a copy, so ``adata`` is not modified.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes, raw counts in ``X``.
    n_top_genes : int
        Clamped to the number of genes.
    batch_key : str
        ``obs`` column with the study.

    Returns
    -------
    np.ndarray of int, shape (min(n_top_genes, n_genes),)
        Sorted var indices.
    """
    import scanpy as sc

    n_genes = adata.n_vars
    n_keep = min(int(n_top_genes), n_genes)
    if n_keep == n_genes:
        return np.arange(n_genes)
    working = adata.copy()
    # seurat_v3 fits a loess per batch; a batch with one cell or a constant gene would break it.
    batch = batch_key if batch_key in working.obs and working.obs[batch_key].nunique() > 1 else None
    sc.pp.highly_variable_genes(working, flavor="seurat_v3", n_top_genes=n_keep, batch_key=batch, subset=False)
    return np.sort(np.flatnonzero(working.var["highly_variable"].to_numpy()))


@dataclass(frozen=True)
class ModelInputs:
    """The cells and genes the NB model is fitted on, with its covariates.

    ``adata`` holds the cells with a known condition and the selected genes; ``condition`` is 1.0
    for the second condition level (e.g. AD) and 0.0 for the first; ``study_index`` indexes
    ``studies`` (sorted names).
    """

    adata: object
    condition: np.ndarray
    study_index: np.ndarray
    studies: list[str]


def select_model_inputs(corpus, *, n_top_genes: int, levels: tuple[str, str]) -> ModelInputs:
    """Cells with a known condition, genes measured in every study those cells come from, then the
    top highly variable genes among them.

    A gene a study did not measure is zero-padded in the corpus (``var["measured_in_<study>"]`` is
    False there): fitting those zeros as observations would push that study's effect down, so such
    genes are left out rather than imputed.
    """
    condition_labels = corpus.obs["condition"]
    known = condition_labels.notna().to_numpy()
    if known.sum() == 0 or condition_labels[known].nunique() < 2:
        raise ScgrnInputError("the corpus has no cells of both condition levels", file="combined_corpus",
                              fix="check the catalog's condition rules")
    studies = sorted(corpus.obs.loc[known, "study"].astype(str).unique())
    measured_everywhere = np.all([corpus.var[measured_column(s)].to_numpy() for s in studies], axis=0)
    subset = corpus[known][:, measured_everywhere]
    subset = subset[:, select_model_genes(subset, n_top_genes=n_top_genes, batch_key="study")]
    condition = (subset.obs["condition"].astype(str) == levels[1]).to_numpy(dtype=float)
    study_index = np.searchsorted(studies, subset.obs["study"].astype(str).to_numpy())
    return ModelInputs(adata=subset, condition=condition, study_index=study_index, studies=studies)


def prepare_nb_data(
    counts,
    library_size,
    condition,
    study_index,
    gene_length_bp,
    study_names,
    gene_names,
    study_label: str | None = None,
) -> NBData:
    """Check the inputs and keep the cells with a known condition.

    Parameters
    ----------
    counts : scipy.sparse matrix or np.ndarray, shape (n_cells, n_genes)
        Non-negative integer counts (any numeric dtype).
    library_size : array, shape (n_cells,)
        Total counts of each cell over all genes (not just the modelled ones).
    condition : array, shape (n_cells,)
        1 for the condition (e.g. AD), 0 for control, NaN (or negative) for unknown; unknown cells are dropped.
    study_index : array of int, shape (n_cells,)
        Index into ``study_names``.
    gene_length_bp : array, shape (n_genes,)
        Gene lengths in bp; missing (NaN) lengths are filled with the median of the known ones
        (1 kb for all when none is known).
    study_names, gene_names : sequence of str
    study_label : str, optional
        Names the data in error messages (e.g. ``"combined_corpus"``).
    """
    where = study_label or "combined_corpus"
    counts = sp.csr_matrix(counts, dtype=np.float32)
    n_cells, n_genes = counts.shape
    library_size = np.asarray(library_size, dtype=np.float64)
    condition = np.asarray(condition, dtype=np.float64)
    study_index = np.asarray(study_index)
    gene_length_bp = np.asarray(gene_length_bp, dtype=np.float64)
    for name, array, size in (
        ("library_size", library_size, n_cells),
        ("condition", condition, n_cells),
        ("study_index", study_index, n_cells),
        ("gene_length_bp", gene_length_bp, n_genes),
    ):
        if array.shape != (size,):
            raise ScgrnInputError(
                f"{name} has shape {array.shape}, expected ({size},) to match counts {counts.shape}",
                study=where,
                fix="pass one value per cell (per gene for gene_length_bp)",
            )
    if len(gene_names) != n_genes:
        raise ScgrnInputError(f"{len(gene_names)} gene names for {n_genes} genes", study=where, fix="pass var names of the selected genes")
    if counts.nnz and (counts.data.min() < 0 or not np.all(counts.data == np.round(counts.data))):
        raise ScgrnInputError("counts contain negative or non-integer values", study=where, fix="fit raw UMI counts, not normalised values")
    known = np.isfinite(condition) & (condition >= 0)
    if not np.isin(condition[known], (0.0, 1.0)).all():
        raise ScgrnInputError("condition must be 0, 1 or unknown (NaN)", study=where, fix="map labels to 1 = condition, 0 = control")
    if known.sum() == 0 or len(np.unique(condition[known])) < 2:
        raise ScgrnInputError("need cells of both conditions to estimate a condition effect", study=where, fix="check the catalog's condition rule")
    if np.any(library_size[known] <= 0) or not np.all(np.isfinite(library_size[known])):
        raise ScgrnInputError("library sizes must be positive", study=where, fix="drop empty cells in QC before the fit")
    if np.any(study_index[known] < 0) or np.any(study_index[known] >= len(study_names)):
        raise ScgrnInputError("study_index out of range of study_names", study=where, fix="encode studies as 0..n_studies-1")
    known_length = np.isfinite(gene_length_bp) & (gene_length_bp > 0)
    # Gene length is optional (real catalogs often have no annotation): with none known every gene
    # gets 1 kb, the length term is constant and gamma is left to its prior.
    fill = np.median(gene_length_bp[known_length]) if known_length.any() else 1000.0
    gene_length_bp = np.where(known_length, gene_length_bp, fill)
    return NBData(
        counts=counts[known],
        log_library_size=np.log(library_size[known]).astype(np.float32),
        condition=condition[known].astype(np.float32),
        study_index=study_index[known].astype(np.int32),
        log_gene_length_kb=np.log(gene_length_bp / 1000.0).astype(np.float32),
        study_names=[str(name) for name in study_names],
        gene_names=[str(name) for name in gene_names],
    )


def sufficient_statistics(data: NBData) -> NBSufficientStatistics:
    """The data-only summaries of :class:`NBSufficientStatistics`, one pass over the sparse counts."""
    coo = data.counts.tocoo()
    values = coo.data.astype(np.int64)
    genes = coo.col.astype(np.int64)
    # m_g(k) = #cells with y > k: histogram of min(y, T) per gene, then a reversed cumulative sum.
    clipped = np.minimum(values, SMALL_COUNT_TABLE_SIZE)
    histogram = np.zeros((SMALL_COUNT_TABLE_SIZE + 1, data.n_genes), dtype=np.int64)
    np.add.at(histogram, (clipped, genes), 1)
    exceed_counts = np.cumsum(histogram[::-1], axis=0)[::-1][1:]
    is_tail = values > SMALL_COUNT_TABLE_SIZE
    pair_key = genes[is_tail] * (values.max(initial=0) + 1) + values[is_tail]
    unique_keys, multiplicity = np.unique(pair_key, return_counts=True)
    return NBSufficientStatistics(
        exceed_counts=exceed_counts.astype(np.float64),
        tail_gene=(unique_keys // (values.max(initial=0) + 1)).astype(np.int32),
        tail_value=(unique_keys % (values.max(initial=0) + 1)).astype(np.float64),
        tail_multiplicity=multiplicity.astype(np.float64),
    )
