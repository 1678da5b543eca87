"""Expression-based checks of attention edges: mutual information and conditional MI.

The pipeline, for the edges that attention proposes:

1. :func:`candidate_edges` keeps, for every gene, its top-K neighbours by |stability|.
2. :func:`discretize_expression` turns log1p-normalised expression into per-gene
   quantile codes (zero expression is its own bin, see :func:`discretize_quantiles`).
3. :func:`mi_edge_table` scores every candidate edge by plug-in mutual information
   (nats, optionally Miller-Madow corrected) with a permutation p-value and BH q-value.
4. :func:`cmi_tables` conditions every edge on each other candidate parent of its
   target; the minimum over conditioners is the evidence that the edge is direct.

Permutation p-values are computed in contingency-table space: permuting the cells of X
and cross-tabulating with Y draws a table with the observed margins from the
multivariate hypergeometric (Fisher-Freeman-Halton) distribution, so we draw that table
directly in O(n_bins**2) instead of O(n_cells). The conditional test (X permuted within
the strata of Z) is the same draw, one table per stratum of Z. Each edge has its own
random stream derived from ``(seed, edge index)``, so results do not depend on the
number of threads or on batching. Sequential early stopping: an edge stops as soon as
its p-value can no longer fall to ``alpha`` or below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.benchmark.expression import log_normalized

DEFAULT_TOP_K = 15
DEFAULT_N_BINS = 5
DEFAULT_TARGET_SUM = 1e4
DEFAULT_N_PERMUTATIONS = 1000
DEFAULT_ALPHA = 0.05
# An edge keeps at least this fraction of its MI under its strongest conditioner to be direct.
DEFAULT_MIN_CMI_RATIO = 0.2
# Edges per compiled call: small enough for a progress callback to be useful.
_BATCH_SIZE = 4096

ProgressCallback = Callable[[int, int], None]

EDGE_TABLE_COLUMNS = ("gene_i", "gene_j", "stability")
CANDIDATE_COLUMNS = ("target", "parent", "attention_score")
MI_TABLE_COLUMNS = ("target", "parent", "mi", "p_value", "q_value", "attention_score")


# ---------------------------------------------------------------------------------------
# Candidate edges
# ---------------------------------------------------------------------------------------


def _require_columns(table: pd.DataFrame, columns: tuple[str, ...], table_name: str) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ScgrnInputError(
            f"table lacks columns {missing} (has {list(table.columns)})",
            file=table_name,
            fix=f"materialise {table_name} again with the current code",
        )


def candidate_edges(edge_table: pd.DataFrame, top_k: int = DEFAULT_TOP_K) -> pd.DataFrame:
    """Top-K neighbours of every gene by |stability|, as directed (target, parent) rows.

    The attention edge table is undirected (``gene_i < gene_j``). A pair listed more than
    once keeps its largest |stability|. Every gene then keeps its ``top_k`` neighbours
    (ties broken by neighbour name). Direction convention: ``target`` is the gene whose
    neighbour list this is, ``parent`` the candidate regulator, so a pair that is in both
    genes' lists appears twice, once in each direction.

    Parameters
    ----------
    edge_table
        Columns ``gene_i``, ``gene_j`` and ``stability`` (``abs_stability`` is recomputed).
    top_k
        Neighbours kept per gene.

    Returns
    -------
    DataFrame with columns ``target``, ``parent``, ``attention_score`` (max |stability|),
    sorted by target then decreasing score.
    """
    _require_columns(edge_table, EDGE_TABLE_COLUMNS, "edge_stability")
    if top_k < 1:
        raise ScgrnInputError(f"top_k must be >= 1, got {top_k}", fix="pass top_k >= 1")
    gene_i = edge_table["gene_i"].astype(str).to_numpy()
    gene_j = edge_table["gene_j"].astype(str).to_numpy()
    score = np.abs(edge_table["stability"].to_numpy(dtype=np.float64))
    off_diagonal = gene_i != gene_j
    # Both directions, so that each gene sees all its neighbours.
    both = pd.DataFrame(
        {
            "target": np.concatenate([gene_i[off_diagonal], gene_j[off_diagonal]]),
            "parent": np.concatenate([gene_j[off_diagonal], gene_i[off_diagonal]]),
            "attention_score": np.concatenate([score[off_diagonal], score[off_diagonal]]),
        }
    )
    both = both.groupby(["target", "parent"], as_index=False, sort=False)["attention_score"].max()
    both = both.sort_values(["target", "attention_score", "parent"], ascending=[True, False, True], kind="mergesort")
    top = both.groupby("target", sort=False).head(top_k)
    return top.reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Discretisation
# ---------------------------------------------------------------------------------------


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


@numba.njit(cache=True, parallel=True)
def _column_codes_kernel(indptr, indices, values, n_bins, codes):
    """Write the codes of each CSC column of positive ``values`` into ``codes`` (n_cols, n_rows)."""
    n_rows = codes.shape[1]
    for column in numba.prange(indptr.shape[0] - 1):
        start = indptr[column]
        n_positive = indptr[column + 1] - start
        if n_positive == 0:
            continue
        column_values = values[start : start + n_positive]
        order = np.argsort(column_values)
        has_zeros = n_positive < n_rows
        n_positive_bins = n_bins - 1 if has_zeros else n_bins
        first_positive_code = 1 if has_zeros else 0
        lowest_tied_rank = 0
        for rank in range(n_positive):
            entry = order[rank]
            # Ties share the bin of their lowest rank.
            if rank > 0 and column_values[entry] != column_values[order[rank - 1]]:
                lowest_tied_rank = rank
            code = first_positive_code + (lowest_tied_rank * n_positive_bins) // n_positive
            codes[column, indices[start + entry]] = np.uint8(code)


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
    _column_codes_kernel(
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


# ---------------------------------------------------------------------------------------
# Single-edge reference estimators (plain numpy)
# ---------------------------------------------------------------------------------------


def _entropy_term(counts: np.ndarray) -> tuple[float, int]:
    """(sum n log n, number of non-empty cells) of a count array."""
    positive = counts[counts > 0].astype(np.float64)
    return float(np.sum(positive * np.log(positive))), int(positive.size)


def mutual_information(x_codes: np.ndarray, y_codes: np.ndarray, n_bins: int, miller_madow: bool = False) -> float:
    """Plug-in mutual information I(X;Y) in nats of two code vectors of shape (n_cells,).

    With ``miller_madow`` each entropy gets the Miller-Madow bias correction
    ``(K - 1) / (2 n_cells)`` (K = non-empty cells), i.e. MI gains ``(Kx + Ky - Kxy - 1) / (2 n_cells)``.
    """
    x_codes = np.asarray(x_codes, dtype=np.int64)
    y_codes = np.asarray(y_codes, dtype=np.int64)
    n_cells = x_codes.shape[0]
    joint = np.bincount(x_codes * n_bins + y_codes, minlength=n_bins * n_bins).reshape(n_bins, n_bins)
    joint_term, k_joint = _entropy_term(joint)
    x_term, k_x = _entropy_term(joint.sum(axis=1))
    y_term, k_y = _entropy_term(joint.sum(axis=0))
    mi = (joint_term - x_term - y_term + n_cells * math.log(n_cells)) / n_cells
    if miller_madow:
        mi += (k_x + k_y - k_joint - 1) / (2.0 * n_cells)
    return mi


def conditional_mutual_information(
    x_codes: np.ndarray, y_codes: np.ndarray, z_codes: np.ndarray, n_bins: int, miller_madow: bool = False
) -> float:
    """Plug-in conditional mutual information I(X;Y|Z) in nats of three code vectors (n_cells,).

    ``I = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z)``; with ``miller_madow`` each entropy is
    Miller-Madow corrected, i.e. CMI gains ``(Kxz + Kyz - Kxyz - Kz) / (2 n_cells)``.
    """
    x_codes = np.asarray(x_codes, dtype=np.int64)
    y_codes = np.asarray(y_codes, dtype=np.int64)
    z_codes = np.asarray(z_codes, dtype=np.int64)
    n_cells = x_codes.shape[0]
    joint = np.bincount((x_codes * n_bins + y_codes) * n_bins + z_codes, minlength=n_bins**3)
    joint = joint.reshape(n_bins, n_bins, n_bins)
    xyz_term, k_xyz = _entropy_term(joint)
    xz_term, k_xz = _entropy_term(joint.sum(axis=1))
    yz_term, k_yz = _entropy_term(joint.sum(axis=0))
    z_term, k_z = _entropy_term(joint.sum(axis=(0, 1)))
    cmi = (xyz_term - xz_term - yz_term + z_term) / n_cells
    if miller_madow:
        cmi += (k_xz + k_yz - k_xyz - k_z) / (2.0 * n_cells)
    return cmi


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of p-values of shape (n,); NaN stays NaN."""
    p_values = np.asarray(p_values, dtype=np.float64)
    q_values = np.full_like(p_values, np.nan)
    finite = np.isfinite(p_values)
    n_tests = int(finite.sum())
    if n_tests == 0:
        return q_values
    finite_p = p_values[finite]
    order = np.argsort(finite_p, kind="mergesort")
    scaled = finite_p[order] * n_tests / np.arange(1, n_tests + 1)
    # Step-up: each q is the smallest scaled p at or above its rank.
    monotone = np.minimum.accumulate(scaled[::-1])[::-1]
    finite_q = np.empty(n_tests)
    finite_q[order] = np.minimum(monotone, 1.0)
    q_values[finite] = finite_q
    return q_values


# ---------------------------------------------------------------------------------------
# Compiled kernels: contingency tables, random tables with fixed margins
# ---------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _next_uniform(state):
    """splitmix64 step; a float in the open interval (0, 1)."""
    state[0] += np.uint64(0x9E3779B97F4A7C15)
    mixed = state[0]
    mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed = mixed ^ (mixed >> np.uint64(31))
    return (float(mixed >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True)
def _stream_state(seed, stream):
    """Independent splitmix64 state for one edge: mixes the seed with the edge's index."""
    state = np.empty(1, dtype=np.uint64)
    state[0] = np.uint64(seed) * np.uint64(0xD1B54A32D192ED03) + np.uint64(stream) * np.uint64(0x9E3779B97F4A7C15)
    _next_uniform(state)
    return state


@numba.njit(cache=True)
def _hypergeometric(state, n_good, n_bad, n_sample, log_factorial):
    """Number of good items in a draw of ``n_sample`` from ``n_good + n_bad`` without replacement.

    numpy's algorithms: direct simulation for small samples, Stadlober's ratio of
    uniforms (HRUA) otherwise; ``log_factorial[k] = log(k!)`` for k up to the population.
    """
    total = n_good + n_bad
    if n_sample <= 0 or n_good <= 0:
        return 0
    if n_bad <= 0:
        return n_sample
    if n_sample >= 10 and n_sample <= total - 10:
        computed_sample = min(n_sample, total - n_sample)
        min_good_bad = min(n_good, n_bad)
        max_good_bad = max(n_good, n_bad)
        p = min_good_bad / total
        q = max_good_bad / total
        a = computed_sample * p + 0.5
        variance = (total - computed_sample) * computed_sample * p * q / (total - 1)
        c = math.sqrt(variance + 0.5)
        h = 1.7155277699214135 * c + 0.8989161620588988
        mode = int(math.floor((computed_sample + 1) * (min_good_bad + 1) / (total + 2)))
        g = (
            log_factorial[mode]
            + log_factorial[min_good_bad - mode]
            + log_factorial[computed_sample - mode]
            + log_factorial[max_good_bad - computed_sample + mode]
        )
        b = min(min(computed_sample, min_good_bad) + 1, math.floor(a + 16 * c))
        while True:
            u = _next_uniform(state)
            v = _next_uniform(state)
            x = a + h * (v - 0.5) / u
            if x < 0.0 or x >= b:
                continue
            k = int(math.floor(x))
            gp = (
                log_factorial[k]
                + log_factorial[min_good_bad - k]
                + log_factorial[computed_sample - k]
                + log_factorial[max_good_bad - computed_sample + k]
            )
            t = g - gp
            if u * (4.0 - u) - 3.0 <= t:
                break
            if u * (u - t) >= 1:
                continue
            if 2.0 * math.log(u) <= t:
                break
        if n_good > n_bad:
            k = computed_sample - k
        if computed_sample < n_sample:
            k = n_good - k
        return k
    complement = n_sample > total // 2
    computed_sample = total - n_sample if complement else n_sample
    remaining_total = total
    remaining_good = n_good
    while computed_sample > 0 and remaining_good > 0 and remaining_total > remaining_good:
        if _next_uniform(state) * remaining_total < remaining_good:
            remaining_good -= 1
        remaining_total -= 1
        computed_sample -= 1
    if remaining_total == remaining_good:
        remaining_good -= computed_sample
    return remaining_good if complement else n_good - remaining_good


@numba.njit(cache=True)
def _random_table_term(state, row_sums, column_sums, column_left, klogk, log_factorial, miller_madow):
    """Draw a table with the given margins (a uniformly permuted cross-tab) and return its
    ``sum n log n`` minus ``K / 2`` when ``miller_madow`` (K = non-empty cells)."""
    n_rows = row_sums.shape[0]
    n_columns = column_sums.shape[0]
    total_left = 0
    for column in range(n_columns):
        column_left[column] = column_sums[column]
        total_left += column_sums[column]
    term = 0.0
    n_nonempty = 0
    for row in range(n_rows):
        need = row_sums[row]
        if need == 0:
            continue
        pool_left = total_left
        for column in range(n_columns):
            if need == 0:
                break
            available = column_left[column]
            if column == n_columns - 1 or available == pool_left:
                drawn = need
            elif need == pool_left:
                drawn = available
            else:
                drawn = _hypergeometric(state, available, pool_left - available, need, log_factorial)
            pool_left -= available
            if drawn > 0:
                column_left[column] = available - drawn
                need -= drawn
                total_left -= drawn
                term += klogk[drawn]
                n_nonempty += 1
    if miller_madow:
        term -= 0.5 * n_nonempty
    return term


@numba.njit(cache=True, inline="always")
def _table_term(table, klogk, miller_madow):
    """``sum n log n`` over a count array, minus ``K / 2`` when ``miller_madow``."""
    term = 0.0
    n_nonempty = 0
    for count in table.ravel():
        if count > 0:
            term += klogk[count]
            n_nonempty += 1
    if miller_madow:
        term -= 0.5 * n_nonempty
    return term


@numba.njit(cache=True)
def _fill_pair_table(codes, nonzero_indptr, nonzero_cells, margins, first, second, table):
    """Cross-tab of genes ``first`` (rows) and ``second`` (columns) into ``table`` (n_bins, n_bins).

    Only cells where the sparser gene has a non-zero code are visited; the zero row or
    column follows from the other gene's margins.
    """
    table[:, :] = 0
    n_bins = table.shape[0]
    first_nonzero = nonzero_indptr[first + 1] - nonzero_indptr[first]
    second_nonzero = nonzero_indptr[second + 1] - nonzero_indptr[second]
    if second_nonzero <= first_nonzero:
        for position in range(nonzero_indptr[second], nonzero_indptr[second + 1]):
            cell = nonzero_cells[position]
            table[codes[first, cell], codes[second, cell]] += 1
        for row in range(n_bins):
            seen = 0
            for column in range(1, n_bins):
                seen += table[row, column]
            table[row, 0] = margins[first, row] - seen
    else:
        for position in range(nonzero_indptr[first], nonzero_indptr[first + 1]):
            cell = nonzero_cells[position]
            table[codes[first, cell], codes[second, cell]] += 1
        for column in range(n_bins):
            seen = 0
            for row in range(1, n_bins):
                seen += table[row, column]
            table[0, column] = margins[second, column] - seen


@numba.njit(cache=True)
def _fill_triplet_table(codes, nonzero_indptr, nonzero_cells, margins, x, y, z, pair_table, table):
    """Cross-tab (x, y, z) into ``table`` (n_bins, n_bins, n_bins), visiting only cells where
    z is non-zero; the z = 0 slice is the (x, y) table minus the rest."""
    n_bins = table.shape[0]
    _fill_pair_table(codes, nonzero_indptr, nonzero_cells, margins, x, y, pair_table)
    table[:, :, :] = 0
    for position in range(nonzero_indptr[z], nonzero_indptr[z + 1]):
        cell = nonzero_cells[position]
        table[codes[x, cell], codes[y, cell], codes[z, cell]] += 1
    for row in range(n_bins):
        for column in range(n_bins):
            seen = 0
            for stratum in range(1, n_bins):
                seen += table[row, column, stratum]
            table[row, column, 0] = pair_table[row, column] - seen


@numba.njit(cache=True)
def _mi_from_table(table, n_cells, klogk, miller_madow):
    """MI in nats of a (n_bins, n_bins) table, Miller-Madow corrected if asked."""
    n_bins = table.shape[0]
    row_sums = np.zeros(n_bins, dtype=np.int64)
    column_sums = np.zeros(n_bins, dtype=np.int64)
    for row in range(n_bins):
        for column in range(n_bins):
            row_sums[row] += table[row, column]
            column_sums[column] += table[row, column]
    value = _table_term(table, klogk, miller_madow) - _table_term(row_sums, klogk, miller_madow)
    value += -_table_term(column_sums, klogk, miller_madow) + klogk[n_cells]
    if miller_madow:
        value -= 0.5  # the -1 of (Kx + Ky - Kxy - 1) / 2
    return value / n_cells


@numba.njit(cache=True)
def _cmi_from_table(table, n_cells, klogk, miller_madow):
    """CMI I(X;Y|Z) in nats of a (x, y, z) table, Miller-Madow corrected if asked."""
    n_bins = table.shape[0]
    xz = np.zeros((n_bins, n_bins), dtype=np.int64)
    yz = np.zeros((n_bins, n_bins), dtype=np.int64)
    z_sums = np.zeros(n_bins, dtype=np.int64)
    for row in range(n_bins):
        for column in range(n_bins):
            for stratum in range(n_bins):
                count = table[row, column, stratum]
                xz[row, stratum] += count
                yz[column, stratum] += count
                z_sums[stratum] += count
    value = _table_term(table, klogk, miller_madow) - _table_term(xz, klogk, miller_madow)
    value += -_table_term(yz, klogk, miller_madow) + _table_term(z_sums, klogk, miller_madow)
    return value / n_cells


@numba.njit(cache=True, parallel=True)
def _pair_mi_kernel(codes, nonzero_indptr, nonzero_cells, margins, first, second, klogk, miller_madow):
    """MI of gene pairs; returns mi (n_pairs,) and the tables (n_pairs, n_bins, n_bins)."""
    n_pairs = first.shape[0]
    n_bins = margins.shape[1]
    n_cells = codes.shape[1]
    tables = np.zeros((n_pairs, n_bins, n_bins), dtype=np.int64)
    mi = np.empty(n_pairs)
    for pair in numba.prange(n_pairs):
        _fill_pair_table(codes, nonzero_indptr, nonzero_cells, margins, first[pair], second[pair], tables[pair])
        mi[pair] = _mi_from_table(tables[pair], n_cells, klogk, miller_madow)
    return mi, tables


@numba.njit(cache=True, parallel=True)
def _mi_permutation_kernel(tables, streams, seed, n_permutations, stop_after, klogk, log_factorial, miller_madow):
    """Permutation counts for pair tables (n_pairs, n_bins, n_bins).

    Returns (n_exceeding, n_run): permuted statistics >= the observed one, and the number
    of permutations drawn before ``stop_after`` exceedances stopped the edge.
    """
    n_pairs = tables.shape[0]
    n_bins = tables.shape[1]
    n_exceeding = np.zeros(n_pairs, dtype=np.int64)
    n_run = np.zeros(n_pairs, dtype=np.int64)
    for pair in numba.prange(n_pairs):
        table = tables[pair]
        row_sums = np.zeros(n_bins, dtype=np.int64)
        column_sums = np.zeros(n_bins, dtype=np.int64)
        for row in range(n_bins):
            for column in range(n_bins):
                row_sums[row] += table[row, column]
                column_sums[column] += table[row, column]
        column_left = np.empty(n_bins, dtype=np.int64)
        observed = _table_term(table, klogk, miller_madow)
        tolerance = 1e-9 * max(1.0, abs(observed))
        state = _stream_state(seed, streams[pair])
        exceeding = 0
        drawn = 0
        while drawn < n_permutations and exceeding < stop_after:
            term = _random_table_term(state, row_sums, column_sums, column_left, klogk, log_factorial, miller_madow)
            drawn += 1
            if term >= observed - tolerance:
                exceeding += 1
        n_exceeding[pair] = exceeding
        n_run[pair] = drawn
    return n_exceeding, n_run


@numba.njit(cache=True, parallel=True)
def _triplet_cmi_kernel(codes, nonzero_indptr, nonzero_cells, margins, x, y, z, klogk, miller_madow):
    """I(X;Y|Z) in nats for each triplet of gene rows; shape (n_triplets,)."""
    n_triplets = x.shape[0]
    n_bins = margins.shape[1]
    n_cells = codes.shape[1]
    cmi = np.empty(n_triplets)
    for triplet in numba.prange(n_triplets):
        pair_table = np.empty((n_bins, n_bins), dtype=np.int64)
        table = np.empty((n_bins, n_bins, n_bins), dtype=np.int64)
        _fill_triplet_table(codes, nonzero_indptr, nonzero_cells, margins, x[triplet], y[triplet], z[triplet], pair_table, table)
        cmi[triplet] = _cmi_from_table(table, n_cells, klogk, miller_madow)
    return cmi


@numba.njit(cache=True, parallel=True)
def _cmi_permutation_kernel(
    codes, nonzero_indptr, nonzero_cells, margins, x, y, z,
    streams, seed, n_permutations, stop_after, klogk, log_factorial, miller_madow,
):
    """Conditional permutation counts (X permuted within the strata of Z) per triplet.

    Returns (n_exceeding, n_run) as :func:`_mi_permutation_kernel`.
    """
    n_triplets = x.shape[0]
    n_bins = margins.shape[1]
    n_exceeding = np.zeros(n_triplets, dtype=np.int64)
    n_run = np.zeros(n_triplets, dtype=np.int64)
    for triplet in numba.prange(n_triplets):
        pair_table = np.empty((n_bins, n_bins), dtype=np.int64)
        table = np.empty((n_bins, n_bins, n_bins), dtype=np.int64)
        _fill_triplet_table(codes, nonzero_indptr, nonzero_cells, margins, x[triplet], y[triplet], z[triplet], pair_table, table)
        x_by_stratum = np.zeros((n_bins, n_bins), dtype=np.int64)
        y_by_stratum = np.zeros((n_bins, n_bins), dtype=np.int64)
        for row in range(n_bins):
            for column in range(n_bins):
                for stratum in range(n_bins):
                    x_by_stratum[stratum, row] += table[row, column, stratum]
                    y_by_stratum[stratum, column] += table[row, column, stratum]
        column_left = np.empty(n_bins, dtype=np.int64)
        observed = _table_term(table, klogk, miller_madow)
        tolerance = 1e-9 * max(1.0, abs(observed))
        state = _stream_state(seed, streams[triplet])
        exceeding = 0
        drawn = 0
        while drawn < n_permutations and exceeding < stop_after:
            term = 0.0
            for stratum in range(n_bins):
                term += _random_table_term(
                    state, x_by_stratum[stratum], y_by_stratum[stratum], column_left, klogk, log_factorial, miller_madow
                )
            drawn += 1
            if term >= observed - tolerance:
                exceeding += 1
        n_exceeding[triplet] = exceeding
        n_run[triplet] = drawn
    return n_exceeding, n_run


@numba.njit(cache=True)
def _triplet_count_kernel(codes, nonzero_indptr, nonzero_cells, margins, x, y, z):
    """(x, y, z) tables of triplets of gene rows; shape (n_triplets, n_bins, n_bins, n_bins)."""
    n_bins = margins.shape[1]
    tables = np.zeros((x.shape[0], n_bins, n_bins, n_bins), dtype=np.int64)
    pair_table = np.empty((n_bins, n_bins), dtype=np.int64)
    for triplet in range(x.shape[0]):
        _fill_triplet_table(
            codes, nonzero_indptr, nonzero_cells, margins, x[triplet], y[triplet], z[triplet], pair_table, tables[triplet]
        )
    return tables


# ---------------------------------------------------------------------------------------
# Batch estimators and tables
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CodeIndex:
    """What the kernels need: codes, each gene's non-zero-code cells and its bin counts."""

    codes: np.ndarray  # (n_genes, n_cells) uint8
    nonzero_indptr: np.ndarray  # (n_genes + 1,) int64
    nonzero_cells: np.ndarray  # (n_nonzero,) int64, ascending within a gene
    margins: np.ndarray  # (n_genes, n_bins) int64
    klogk: np.ndarray  # (n_cells + 1,) k log k
    log_factorial: np.ndarray  # (n_cells + 1,) log k!


def _code_index(codes: np.ndarray, n_bins: int) -> _CodeIndex:
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.size and int(codes.max()) >= n_bins:
        raise ScgrnInputError(f"codes reach {int(codes.max())}, n_bins is {n_bins}", fix="pass the n_bins used to discretise")
    n_genes, n_cells = codes.shape
    gene_of_nonzero, nonzero_cells = np.nonzero(codes)
    nonzero_indptr = np.zeros(n_genes + 1, dtype=np.int64)
    nonzero_indptr[1:] = np.cumsum(np.bincount(gene_of_nonzero, minlength=n_genes))
    margins = np.zeros((n_genes, n_bins), dtype=np.int64)
    for code in range(n_bins):
        margins[:, code] = (codes == code).sum(axis=1)
    k = np.arange(n_cells + 1, dtype=np.float64)
    klogk = k * np.log(np.maximum(k, 1.0))
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(k[1:]))])
    return _CodeIndex(codes, nonzero_indptr, nonzero_cells.astype(np.int64), margins, klogk, log_factorial)


def _triplet_count_tables(index: _CodeIndex, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(n, n_bins, n_bins, n_bins) tables of the given triplets (for the G-test)."""
    return _triplet_count_kernel(index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins, x, y, z)


def _batches(n_items: int) -> list[slice]:
    return [slice(start, min(start + _BATCH_SIZE, n_items)) for start in range(0, n_items, _BATCH_SIZE)]


def mutual_information_batch(
    codes: np.ndarray, first: np.ndarray, second: np.ndarray, n_bins: int, miller_madow: bool = False
) -> np.ndarray:
    """MI in nats of many gene pairs at once.

    Parameters
    ----------
    codes
        Shape (n_genes, n_cells), quantile codes (gene-major, as in :class:`DiscretizedGenes`).
    first, second
        Shape (n_pairs,), row indices into ``codes``.

    Returns
    -------
    Shape (n_pairs,), equal to :func:`mutual_information` of each pair.
    """
    index = _code_index(codes, n_bins)
    mi, _ = _pair_mi_kernel(
        index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
        np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64), index.klogk, miller_madow,
    )
    return mi


def conditional_mutual_information_batch(
    codes: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, n_bins: int, miller_madow: bool = False
) -> np.ndarray:
    """I(X;Y|Z) in nats of many gene triplets (rows of ``codes``, each shape (n_triplets,))."""
    index = _code_index(codes, n_bins)
    return _triplet_cmi_kernel(
        index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
        np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64), np.asarray(z, dtype=np.int64), index.klogk, miller_madow,
    )


def _stop_after(n_permutations: int, alpha: float) -> int:
    """Exceedances after which ``(k + 1) / (n_permutations + 1)`` can no longer be <= alpha."""
    return max(1, int(math.floor(alpha * (n_permutations + 1))))


def _permutation_p_values(n_exceeding: np.ndarray, n_run: np.ndarray) -> np.ndarray:
    """``(k + 1) / (b + 1)`` with k exceedances in b permutations (b < n_permutations if stopped early)."""
    return (n_exceeding + 1.0) / (n_run + 1.0)


def _g_test_p_values(tables: np.ndarray, statistic: np.ndarray, n_cells: int, conditional: bool) -> np.ndarray:
    """Asymptotic p-values: 2 n_cells MI (or CMI) is chi-squared with (r-1)(c-1) degrees of
    freedom summed over strata; used when permutations are off."""
    if conditional:
        rows = (tables.sum(axis=2) > 0).sum(axis=1)  # (n, n_bins strata) non-empty x levels
        columns = (tables.sum(axis=1) > 0).sum(axis=1)
        dof = np.clip((rows - 1) * (columns - 1), 0, None).sum(axis=1)
    else:
        dof = np.clip(((tables.sum(axis=2) > 0).sum(axis=1) - 1) * ((tables.sum(axis=1) > 0).sum(axis=1) - 1), 0, None)
    p_values = stats.chi2.sf(2.0 * n_cells * np.maximum(statistic, 0.0), np.maximum(dof, 1))
    return np.where(dof > 0, p_values, 1.0)


def _report(progress: ProgressCallback | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def mi_edge_table(
    discretized: DiscretizedGenes,
    candidates: pd.DataFrame,
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
    alpha: float = DEFAULT_ALPHA,
    miller_madow: bool = False,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Mutual information of every candidate edge with a permutation p-value and BH q-value.

    MI is symmetric, so an edge listed in both directions is computed and tested once
    and gets the same MI, p-value and q-value in both rows (BH counts it once). Every
    candidate edge is kept: nothing is filtered on p-values, and with
    ``n_permutations=0`` the p-value is the asymptotic G-test (``p_value_method`` says
    which).

    Parameters
    ----------
    discretized
        Codes from :func:`discretize_expression` covering every gene in ``candidates``.
    candidates
        Columns ``target``, ``parent``, ``attention_score`` (:func:`candidate_edges`).
    n_permutations
        Maximum permutations per edge; 0 for the G-test.
    alpha
        Early-stopping level: an edge stops once ``(k + 1) / (n_permutations + 1) > alpha``
        is certain (k permuted MI >= observed). Its p-value is then ``(k + 1) / (b + 1)``
        after b permutations (> alpha, as the full run's would be).
    miller_madow
        Report and test the Miller-Madow corrected MI.
    seed
        Seed of the permutation streams; edge e uses stream ``(seed, e)``.
    progress
        Called as ``progress(n_edges_done, n_edges)`` after each batch.

    Returns
    -------
    DataFrame with target, parent, mi (nats), p_value, q_value, n_cells, attention_score,
    n_permutations_run and p_value_method, in the order of ``candidates``.
    """
    _require_columns(candidates, CANDIDATE_COLUMNS, "mi_edges candidates")
    targets = candidates["target"].astype(str).to_numpy()
    parents = candidates["parent"].astype(str).to_numpy()
    target_rows = discretized.gene_index(targets)
    parent_rows = discretized.gene_index(parents)
    # One computation per unordered pair; both directions share it.
    low = np.minimum(target_rows, parent_rows)
    high = np.maximum(target_rows, parent_rows)
    pairs, pair_of_edge = np.unique(np.stack([low, high], axis=1), axis=0, return_inverse=True)
    pair_of_edge = pair_of_edge.reshape(-1)
    n_pairs = pairs.shape[0]
    index = _code_index(discretized.codes, discretized.n_bins)
    mi = np.empty(n_pairs)
    tables = np.empty((n_pairs, discretized.n_bins, discretized.n_bins), dtype=np.int64)
    n_exceeding = np.zeros(n_pairs, dtype=np.int64)
    n_run = np.zeros(n_pairs, dtype=np.int64)
    stop_after = _stop_after(n_permutations, alpha)
    for batch in _batches(n_pairs):
        mi[batch], tables[batch] = _pair_mi_kernel(
            index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
            pairs[batch, 0], pairs[batch, 1], index.klogk, miller_madow,
        )
        if n_permutations > 0:
            n_exceeding[batch], n_run[batch] = _mi_permutation_kernel(
                tables[batch], np.arange(n_pairs, dtype=np.int64)[batch], seed, n_permutations, stop_after,
                index.klogk, index.log_factorial, miller_madow,
            )
        _report(progress, batch.stop, n_pairs)
    if n_permutations > 0:
        p_values = _permutation_p_values(n_exceeding, n_run)
        method = "permutation"
    else:
        plug_in = mi
        if miller_madow:
            plug_in = np.array([_mi_from_table(table, discretized.n_cells, index.klogk, False) for table in tables])
        p_values = _g_test_p_values(tables, plug_in, discretized.n_cells, conditional=False)
        method = "g_test"
    # BH over distinct hypotheses: a pair listed in both directions is one test.
    q_values = benjamini_hochberg(p_values)
    return pd.DataFrame(
        {
            "target": targets,
            "parent": parents,
            "mi": mi[pair_of_edge],
            "p_value": p_values[pair_of_edge],
            "q_value": q_values[pair_of_edge],
            "n_cells": np.full(targets.shape[0], discretized.n_cells, dtype=np.int64),
            "attention_score": candidates["attention_score"].to_numpy(dtype=np.float64),
            "n_permutations_run": n_run[pair_of_edge],
            "p_value_method": method,
        }
    )


def cmi_tables(
    discretized: DiscretizedGenes,
    mi_table: pd.DataFrame,
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
    alpha: float = DEFAULT_ALPHA,
    min_cmi_ratio: float = DEFAULT_MIN_CMI_RATIO,
    miller_madow: bool = False,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Conditional MI of each edge given each other candidate parent of its target.

    For a target Y with candidate parents P (from ``mi_table``, |P| >= 2), every parent X
    and every other Z in P gives I(X;Y|Z). An edge that some Z explains away is indirect,
    so the evidence of directness is ``cmi_min`` (minimum over Z); ``cmi_max`` is reported
    too. ``cmi_min`` is tested by the conditional permutation test (X permuted within the
    strata of Z, early stopping as in :func:`mi_edge_table`).

    The ``direct`` flag: ``q_value <= alpha`` (MI) and ``q_value_cmi_min <= alpha`` and
    ``cmi_ratio = cmi_min / mi >= min_cmi_ratio``. The ratio guard exists because the
    binned conditioner never blocks a path completely, so with many cells even an
    indirect edge keeps a small but significant CMI.

    Returns
    -------
    triplets
        target, parent, conditioner, cmi (nats), n_cells.
    edges
        target, parent, mi, cmi_min, cmi_max, cmi_ratio, conditioner_min, p_value (MI),
        q_value (MI), p_value_cmi_min, q_value_cmi_min, n_permutations_cmi, direct,
        attention_score; one row per edge of a target with at least two candidate parents.
    """
    _require_columns(mi_table, MI_TABLE_COLUMNS, "mi_edges")
    n_parents = mi_table.groupby("target")["parent"].transform("size").to_numpy()
    edges = mi_table.loc[n_parents >= 2].reset_index(drop=True)
    target_rows = discretized.gene_index(edges["target"].astype(str).to_numpy())
    parent_rows = discretized.gene_index(edges["parent"].astype(str).to_numpy())
    # Triplets: each edge against every other parent of the same target.
    edge_of_triplet_parts, conditioner_parts = [], []
    for _, edge_ids in edges.groupby("target", sort=False).indices.items():
        n_group = edge_ids.shape[0]
        edge_ids = np.asarray(edge_ids, dtype=np.int64)
        first, second = np.nonzero(~np.eye(n_group, dtype=bool))
        edge_of_triplet_parts.append(edge_ids[first])
        conditioner_parts.append(edge_ids[second])
    edge_of_triplet = np.concatenate(edge_of_triplet_parts) if edge_of_triplet_parts else np.zeros(0, np.int64)
    conditioner_edge = np.concatenate(conditioner_parts) if conditioner_parts else np.zeros(0, np.int64)
    x_rows = parent_rows[edge_of_triplet]
    y_rows = target_rows[edge_of_triplet]
    z_rows = parent_rows[conditioner_edge]
    index = _code_index(discretized.codes, discretized.n_bins)
    n_triplets = edge_of_triplet.shape[0]
    cmi = np.empty(n_triplets)
    for batch in _batches(n_triplets):
        cmi[batch] = _triplet_cmi_kernel(
            index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
            x_rows[batch], y_rows[batch], z_rows[batch], index.klogk, miller_madow,
        )
        _report(progress, batch.stop, n_triplets + edges.shape[0])
    triplets = pd.DataFrame(
        {
            "target": edges["target"].to_numpy()[edge_of_triplet],
            "parent": edges["parent"].to_numpy()[edge_of_triplet],
            "conditioner": edges["parent"].to_numpy()[conditioner_edge],
            "cmi": cmi,
            "n_cells": np.full(n_triplets, discretized.n_cells, dtype=np.int64),
        }
    )
    n_edges = edges.shape[0]
    # Triplets are grouped by edge, so the argmin per edge is a segment reduction.
    order = np.lexsort((cmi, edge_of_triplet))
    first_of_edge = np.searchsorted(edge_of_triplet[order], np.arange(n_edges))
    argmin_triplet = order[first_of_edge]
    cmi_min = cmi[argmin_triplet]
    cmi_max = np.full(n_edges, -np.inf)
    np.maximum.at(cmi_max, edge_of_triplet, cmi)
    stop_after = _stop_after(n_permutations, alpha)
    n_exceeding = np.zeros(n_edges, dtype=np.int64)
    n_run = np.zeros(n_edges, dtype=np.int64)
    x_min, y_min, z_min = x_rows[argmin_triplet], y_rows[argmin_triplet], z_rows[argmin_triplet]
    if n_permutations > 0:
        # Stream ids after the MI ones, so the CMI draws never reuse an MI stream.
        streams = np.arange(n_edges, dtype=np.int64) + np.int64(1 << 40)
        for batch in _batches(n_edges):
            n_exceeding[batch], n_run[batch] = _cmi_permutation_kernel(
                index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
                x_min[batch], y_min[batch], z_min[batch], streams[batch], seed, n_permutations, stop_after,
                index.klogk, index.log_factorial, miller_madow,
            )
            _report(progress, n_triplets + batch.stop, n_triplets + n_edges)
        p_cmi = _permutation_p_values(n_exceeding, n_run)
    else:
        plug_in = cmi_min if not miller_madow else _triplet_cmi_kernel(
            index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins, x_min, y_min, z_min, index.klogk, False
        )
        min_tables = _triplet_count_tables(index, x_min, y_min, z_min)
        p_cmi = _g_test_p_values(min_tables, plug_in, discretized.n_cells, conditional=True)
        _report(progress, n_triplets + n_edges, n_triplets + n_edges)
    mi = edges["mi"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cmi_ratio = np.where(mi > 0, cmi_min / mi, np.nan)
    q_cmi = benjamini_hochberg(p_cmi)
    direct = (edges["q_value"].to_numpy() <= alpha) & (q_cmi <= alpha) & (np.nan_to_num(cmi_ratio) >= min_cmi_ratio)
    edge_table = pd.DataFrame(
        {
            "target": edges["target"].to_numpy(),
            "parent": edges["parent"].to_numpy(),
            "mi": mi,
            "cmi_min": cmi_min,
            "cmi_max": cmi_max,
            "cmi_ratio": cmi_ratio,
            "conditioner_min": triplets["conditioner"].to_numpy()[argmin_triplet],
            "p_value": edges["p_value"].to_numpy(),
            "q_value": edges["q_value"].to_numpy(),
            "p_value_cmi_min": p_cmi,
            "q_value_cmi_min": q_cmi,
            "n_permutations_cmi": n_run,
            "direct": direct,
            "attention_score": edges["attention_score"].to_numpy(),
        }
    )
    return triplets, edge_table
