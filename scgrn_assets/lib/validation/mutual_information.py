"""Expression-based checks of attention edges: mutual information and conditional MI.

The pipeline, for the edges that attention proposes:

1. :func:`candidate_edges` keeps, for every gene, its top-K neighbours by |stability|.
2. :func:`~scgrn_assets.lib.validation.discretization.discretize_expression` turns
   log1p-normalised expression into per-gene quantile codes (zero expression is its own bin).
3. :func:`mi_edge_table` scores every candidate edge by plug-in mutual information
   (nats, optionally Miller-Madow corrected) with a permutation p-value and BH q-value.
4. :func:`cmi_tables` conditions every edge on each other candidate parent of its
   target; the minimum over conditioners is the evidence that the edge is direct.

The estimators are in :mod:`~scgrn_assets.lib.validation.estimators`, their numba kernels in
``_kernels.py``. Permutation p-values are computed in contingency-table space: permuting the cells of X
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

import numpy as np
import pandas as pd
from scipy import stats

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.validation._kernels import (cmi_permutation_kernel, mi_from_table, mi_permutation_kernel,
                                                  pair_mi_kernel, triplet_cmi_kernel)
from scgrn_assets.lib.validation.discretization import DiscretizedGenes
from scgrn_assets.lib.validation.estimators import _batches, _code_index, _triplet_count_tables

DEFAULT_TOP_K = 15
DEFAULT_N_PERMUTATIONS = 1000
DEFAULT_ALPHA = 0.05
# An edge keeps at least this fraction of its MI under its strongest conditioner to be direct.
DEFAULT_MIN_CMI_RATIO = 0.2

EDGE_TABLE_COLUMNS = ("gene_i", "gene_j", "stability")
CANDIDATE_COLUMNS = ("target", "parent", "attention_score")
MI_TABLE_COLUMNS = ("target", "parent", "mi", "p_value", "q_value", "attention_score")


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


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (:func:`scipy.stats.false_discovery_control`) of p-values of shape (n,);
    NaN stays NaN and is not counted as a test."""
    p_values = np.asarray(p_values, dtype=np.float64)
    q_values = np.full_like(p_values, np.nan)
    finite = np.isfinite(p_values)
    if finite.any():
        q_values[finite] = stats.false_discovery_control(p_values[finite], method="bh")
    return q_values


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


def mi_edge_table(
    discretized: DiscretizedGenes,
    candidates: pd.DataFrame,
    n_permutations: int = DEFAULT_N_PERMUTATIONS,
    alpha: float = DEFAULT_ALPHA,
    miller_madow: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
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
        Codes from :func:`~scgrn_assets.lib.validation.discretization.discretize_expression` covering
        every gene in ``candidates``.
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
        mi[batch], tables[batch] = pair_mi_kernel(
            index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
            pairs[batch, 0], pairs[batch, 1], index.klogk, miller_madow,
        )
        if n_permutations > 0:
            n_exceeding[batch], n_run[batch] = mi_permutation_kernel(
                tables[batch], np.arange(n_pairs, dtype=np.int64)[batch], seed, n_permutations, stop_after,
                index.klogk, index.log_factorial, miller_madow,
            )
        report(progress, batch.stop, n_pairs)
    if n_permutations > 0:
        p_values = _permutation_p_values(n_exceeding, n_run)
        method = "permutation"
    else:
        plug_in = mi
        if miller_madow:
            plug_in = np.array([mi_from_table(table, discretized.n_cells, index.klogk, False) for table in tables])
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
    progress: Progress | None = None,
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
        cmi[batch] = triplet_cmi_kernel(
            index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
            x_rows[batch], y_rows[batch], z_rows[batch], index.klogk, miller_madow,
        )
        report(progress, batch.stop, n_triplets + edges.shape[0])
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
            n_exceeding[batch], n_run[batch] = cmi_permutation_kernel(
                index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins,
                x_min[batch], y_min[batch], z_min[batch], streams[batch], seed, n_permutations, stop_after,
                index.klogk, index.log_factorial, miller_madow,
            )
            report(progress, n_triplets + batch.stop, n_triplets + n_edges)
        p_cmi = _permutation_p_values(n_exceeding, n_run)
    else:
        plug_in = cmi_min if not miller_madow else triplet_cmi_kernel(
            index.codes, index.nonzero_indptr, index.nonzero_cells, index.margins, x_min, y_min, z_min, index.klogk, False
        )
        min_tables = _triplet_count_tables(index, x_min, y_min, z_min)
        p_cmi = _g_test_p_values(min_tables, plug_in, discretized.n_cells, conditional=True)
        report(progress, n_triplets + n_edges, n_triplets + n_edges)
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
