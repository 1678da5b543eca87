"""Network-level GRN metrics: degree correlation and top-K enrichment against two degree-keeping nulls.

Enrichment: the top-K listed pairs by score (K defaults to the number of true edges); two nulls keep
the predicted network's out-degrees: targets redrawn with probability proportional to their reference
in-degree without replacement, and degree-preserving rewiring (double-edge swaps) of the predicted
network. Empirical p = (1 + #null >= observed) / (1 + n_null). The numba kernels are in ``_kernels.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats

from scgrn_assets.lib.benchmarks._kernels import in_degree_null_hits_kernel, rewire, rewired_null_hits_kernel
from scgrn_assets.lib.benchmarks.ranking import early_selection
from scgrn_assets.lib.benchmarks.universes import EvaluationPairs, _pair_keys


def degree_correlation(pairs: EvaluationPairs) -> float:
    """Spearman correlation, over the genes G, between each gene's degree (in + out) in the
    early-precision network and in the reference (within the universe). NaN when either is constant."""
    selected = early_selection(*pairs.ranking())[: len(pairs.scores)]
    n_genes = len(pairs.genes)
    predicted_degree = np.bincount(pairs.source_index[selected], minlength=n_genes) + np.bincount(
        pairs.target_index[selected], minlength=n_genes
    )
    true_degree = np.bincount(pairs.true_source_index, minlength=n_genes) + np.bincount(
        pairs.true_target_index, minlength=n_genes
    )
    if n_genes < 3 or np.ptp(predicted_degree) == 0 or np.ptp(true_degree) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(predicted_degree, true_degree).statistic)


def top_k_network(pairs: EvaluationPairs, top_k: int) -> np.ndarray:
    """Indices into the listed pairs of the top-K by |score| (score > 0; ties at the K-th broken by listing order)."""
    positive = np.flatnonzero(pairs.scores > 0)
    order = positive[np.argsort(-pairs.scores[positive], kind="mergesort")]
    return order[:top_k]


def empirical_p_value(observed: float, null_values: np.ndarray) -> float:
    """(1 + #null >= observed) / (1 + n_null)."""
    null_values = np.asarray(null_values)
    return float((1 + np.sum(null_values >= observed)) / (1 + len(null_values)))


def in_degree_null_hits(
    pairs: EvaluationPairs, network: np.ndarray, *, n_null: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Null hits of the original pipeline: each predicted source keeps its number of targets, which
    are redrawn with probability proportional to their in-degree in the reference (degree in the
    undirected case), without replacement.

    Parameters
    ----------
    pairs
        The universe.
    network
        Indices into the listed pairs (e.g. :func:`top_k_network`).

    Returns
    -------
    sources, hits
        Source gene indices, shape (n_sources,), and true hits per (replicate, source), shape (n_null, n_sources).
        Genes of in-degree 0 are never true targets, so they are left out of the draw. Targets come
        from all genes of G, in the ``predicted`` universe too.
    """
    sources, n_targets = np.unique(pairs.source_index[network], return_counts=True)
    n_genes = len(pairs.genes)
    in_degree = np.bincount(pairs.true_target_index, minlength=n_genes)
    if not pairs.directed:
        in_degree = in_degree + np.bincount(pairs.true_source_index, minlength=n_genes)
    weighted_genes = np.flatnonzero(in_degree)
    true_keys = np.sort(_pair_keys(pairs.true_source_index, pairs.true_target_index, n_genes))
    hits = in_degree_null_hits_kernel(
        sources.astype(np.int64), n_targets.astype(np.int64), weighted_genes.astype(np.int64),
        in_degree[weighted_genes].astype(np.float64), true_keys, n_genes, pairs.directed, n_null, seed,
    )
    return sources, hits


def rewire_network(
    edge_sources: np.ndarray, edge_targets: np.ndarray, *, n_genes: int, directed: bool = True,
    swaps_per_edge: int = 10, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Degree-preserving rewiring: every node keeps its out- and in-degree; no self-loops or duplicate
    pairs are created (unordered duplicates when ``directed`` is False).

    Parameters
    ----------
    edge_sources, edge_targets
        Integer gene indices in [0, n_genes), shape (n_edges,), without duplicates or self-loops.
    swaps_per_edge
        Attempted double-edge swaps per edge.

    Returns
    -------
    sources, targets
        The rewired edges; sources are unchanged position by position, targets permuted.
    """
    return rewire(
        np.asarray(edge_sources, dtype=np.int64), np.asarray(edge_targets, dtype=np.int64),
        n_genes, directed, swaps_per_edge * len(edge_sources), seed,
    )


def rewired_null_hits(
    pairs: EvaluationPairs, network: np.ndarray, *, n_null: int = 1000, swaps_per_edge: int = 10, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """True hits per (replicate, source) of degree-preserving rewirings of the predicted network
    (:func:`rewire_network`).

    Returns
    -------
    sources, hits
        Source gene indices (n_sources,) and hits, shape (n_null, n_sources).
    """
    n_genes = len(pairs.genes)
    edge_sources = pairs.source_index[network].astype(np.int64)
    sources, source_slot = np.unique(edge_sources, return_inverse=True)
    true_keys = np.sort(_pair_keys(pairs.true_source_index, pairs.true_target_index, n_genes))
    hits = rewired_null_hits_kernel(
        edge_sources, pairs.target_index[network].astype(np.int64), source_slot.astype(np.int64), len(sources),
        true_keys, n_genes, pairs.directed, n_null, swaps_per_edge * len(network), seed,
    )
    return sources, hits


def top_k_enrichment(
    pairs: EvaluationPairs, *, top_k: int | None = None, n_null: int = 1000, seed: int = 0,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Top-K precision, recall and enrichment, globally and per source (TF), with both nulls.

    Parameters
    ----------
    pairs
        The universe.
    top_k
        Size of the predicted network; None = the number of true pairs.
    n_null
        Replicates of each null.

    Returns
    -------
    global_metrics
        ``top_k`` (the K used, fewer when fewer pairs have a non-zero score), ``top_k_hits``,
        ``top_k_precision``, ``top_k_recall``, ``top_k_enrichment`` (precision / base rate),
        ``top_k_null_mean_in_degree``, ``top_k_p_in_degree``, ``top_k_null_mean_rewired``, ``top_k_p_rewired``.
    per_source
        One row per source of the predicted network: ``tf``, ``n_predicted``, ``hits``, ``precision``,
        ``recall`` (hits / the TF's true targets), ``enrichment`` (precision over the TF's base rate:
        its true targets / its candidate targets), ``p_in_degree``, ``p_rewired``.
    """
    network = top_k_network(pairs, pairs.n_true if top_k is None else top_k)
    n_genes = len(pairs.genes)
    hit_mask = pairs.labels[network]
    sources, in_degree_hits = in_degree_null_hits(pairs, network, n_null=n_null, seed=seed)
    _, rewired_hits = rewired_null_hits(pairs, network, n_null=n_null, seed=seed)
    n_predicted = len(network)
    observed_hits = int(hit_mask.sum())
    precision = observed_hits / n_predicted if n_predicted else float("nan")
    global_metrics = {
        "top_k": float(n_predicted),
        "top_k_hits": float(observed_hits),
        "top_k_precision": precision,
        "top_k_recall": observed_hits / pairs.n_true if pairs.n_true else float("nan"),
        "top_k_enrichment": precision / pairs.base_rate if pairs.n_true else float("nan"),
        "top_k_null_mean_in_degree": float(in_degree_hits.sum(axis=1).mean()) if n_null else float("nan"),
        "top_k_p_in_degree": empirical_p_value(observed_hits, in_degree_hits.sum(axis=1)),
        "top_k_null_mean_rewired": float(rewired_hits.sum(axis=1).mean()) if n_null else float("nan"),
        "top_k_p_rewired": empirical_p_value(observed_hits, rewired_hits.sum(axis=1)),
    }
    source_of_edge = np.searchsorted(sources, pairs.source_index[network])
    predicted_per_source = np.bincount(source_of_edge, minlength=len(sources))
    hits_per_source = np.bincount(source_of_edge[hit_mask], minlength=len(sources))
    true_per_source = np.bincount(pairs.true_source_index, minlength=n_genes)[sources]
    if pairs.directed:
        candidates_per_source = (n_genes - 1) if pairs.universe != "predicted" else np.bincount(
            pairs.source_index, minlength=n_genes
        )[sources]
    else:
        true_per_source = true_per_source + np.bincount(pairs.true_target_index, minlength=n_genes)[sources]
        candidates_per_source = n_genes - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        source_precision = hits_per_source / predicted_per_source
        per_source = pd.DataFrame({
            "tf": pairs.genes[sources],
            "n_predicted": predicted_per_source,
            "hits": hits_per_source,
            "precision": source_precision,
            "recall": np.where(true_per_source > 0, hits_per_source / np.maximum(true_per_source, 1), np.nan),
            "enrichment": source_precision / (true_per_source / candidates_per_source),
            "p_in_degree": [empirical_p_value(h, in_degree_hits[:, slot]) for slot, h in enumerate(hits_per_source)],
            "p_rewired": [empirical_p_value(h, rewired_hits[:, slot]) for slot, h in enumerate(hits_per_source)],
        })
    return global_metrics, per_source
