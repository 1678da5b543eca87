"""Baseline gene networks on the same genes as ours: co-expression, tree-based regression, random.

Every function returns predictions in the common form, a DataFrame with columns ``source``,
``target``, ``score`` (higher = more confident; the metrics rank by ``|score|``), and sets
``DataFrame.attrs["directed"]``:

- Pearson and Spearman co-expression are undirected: each unordered gene pair appears once
  (``source`` = the gene earlier in ``gene_names``), ``score`` = |rho|, and the signed coefficient
  is kept in ``correlation``. Against a directed reference they are evaluated undirected
  (see :mod:`scgrn_assets.lib.grn_metrics`).
- The tree baseline is GENIE3-style (per target, an ensemble of randomised trees regresses the
  target on the candidate regulators; the score is the regulator's mean impurity decrease) and is
  directed regulator -> target. The candidate regulators are every gene unless the caller passes a
  TF list (GENIE3's default); the benchmark never passes the reference's regulators, which would
  let this one method rank only truth-rooted pairs. scikit-learn's ExtraTrees is used, not
  arboreto, which is unmaintained and breaks with recent dask.
- The random baseline scores every ordered pair (TF-rooted when a TF list is given) uniformly.

The expression matrix is cells x genes (AnnData's ``X``), dense or scipy sparse, on any
scale the caller chose (log-normalised counts are typical).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.stats
from sklearn.ensemble import ExtraTreesRegressor

from scgrn_assets.lib.errors import ScgrnInputError

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(n_done, n_total)`` after each unit of work."""


def _dense_expression(expression, gene_names: Sequence[str]) -> np.ndarray:
    """Cells x genes float64 array, checked against ``gene_names``."""
    matrix = expression.toarray() if scipy.sparse.issparse(expression) else np.asarray(expression)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(gene_names):
        raise ScgrnInputError(
            f"expression has shape {matrix.shape}, expected (n_cells, {len(gene_names)}) to match gene_names",
            fix="pass a cells x genes matrix whose columns are gene_names",
        )
    if len(set(gene_names)) != len(gene_names):
        raise ScgrnInputError("gene_names has duplicates", fix="make gene symbols unique before building baselines")
    if not np.isfinite(matrix).all():
        raise ScgrnInputError("expression has NaN or infinite values", fix="filter or impute them first")
    return matrix


def _undirected_pairs(correlation: np.ndarray, gene_names: Sequence[str]) -> pd.DataFrame:
    upper_rows, upper_columns = np.triu_indices(len(gene_names), k=1)
    coefficients = correlation[upper_rows, upper_columns]
    names = np.asarray(gene_names, dtype=object)
    predictions = pd.DataFrame({
        "source": names[upper_rows],
        "target": names[upper_columns],
        "score": np.abs(coefficients),
        "correlation": coefficients,
    })
    predictions.attrs["directed"] = False
    return predictions


def _correlation_matrix(matrix: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns; a constant gene correlates 0 with everything."""
    centred = matrix - matrix.mean(axis=0)
    norms = np.sqrt((centred**2).sum(axis=0))
    constant = norms == 0
    norms[constant] = 1.0
    standardised = centred / norms
    correlation = np.clip(standardised.T @ standardised, -1.0, 1.0)
    correlation[constant, :] = 0.0
    correlation[:, constant] = 0.0
    return correlation


def pearson_edges(expression, gene_names: Sequence[str]) -> pd.DataFrame:
    """Pearson co-expression over cells for every unordered gene pair.

    Parameters
    ----------
    expression
        Cells x genes matrix, shape (n_cells, n_genes), dense or sparse.
    gene_names
        Symbols of the columns, length n_genes, unique.

    Returns
    -------
    pandas.DataFrame
        n_genes * (n_genes - 1) / 2 rows: ``source``, ``target``, ``score`` = |r|, ``correlation`` = r;
        ``attrs["directed"] = False``.
    """
    return _undirected_pairs(_correlation_matrix(_dense_expression(expression, gene_names)), gene_names)


def spearman_edges(expression, gene_names: Sequence[str]) -> pd.DataFrame:
    """Spearman co-expression (Pearson on per-gene ranks, ties averaged) for every unordered gene pair.

    Same shapes and output as :func:`pearson_edges`.
    """
    matrix = _dense_expression(expression, gene_names)
    ranks = scipy.stats.rankdata(matrix, axis=0)
    return _undirected_pairs(_correlation_matrix(ranks), gene_names)


def tree_edges(
    expression,
    gene_names: Sequence[str],
    *,
    tf_list: Sequence[str] | None = None,
    n_trees: int = 50,
    max_cells: int = 1000,
    max_features: str | float = "sqrt",
    min_samples_leaf: int = 10,
    seed: int = 0,
    n_jobs: int = 1,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """GENIE3-style tree-ensemble regression baseline (directed regulator -> target).

    For each target gene, an ExtraTrees regressor predicts its standardised expression from the
    candidate regulators (the TFs among ``gene_names`` when ``tf_list`` is given, otherwise every
    other gene); the score of regulator -> target is the regulator's impurity decrease averaged
    over trees, unnormalised as in GENIE3 (so targets the regulators explain well rank higher).

    Parameters
    ----------
    expression
        Cells x genes matrix, shape (n_cells, n_genes).
    gene_names
        Column symbols, length n_genes.
    tf_list
        Candidate regulators (a TF list such as BEELINE's, never the benchmark's truth); symbols not in
        ``gene_names`` are ignored. None: every other gene, as GENIE3 without a TF list.
    n_trees
        Trees per target. GENIE3 uses 1000; the benchmark uses 20 (``GrnPathSettings.tree_n_trees``),
        which with ``max_features="sqrt"`` and 1000 cells keeps all 545 demo network genes as
        regulators (545 regressions on 544 features) at about a minute on one core: measured 60 s,
        against 39 s with the truth's 30 regulators (the old, leaking rule).
    max_cells
        Cells subsampled (without replacement, seeded) when there are more.
    max_features, min_samples_leaf
        Passed to :class:`sklearn.ensemble.ExtraTreesRegressor`. ``"sqrt"`` (GENIE3's default
        ``K="sqrt"``) tries sqrt(n_regulators) regulators per split, so the cost per target grows
        with the square root of the number of regulators, not linearly.
    seed
        Seed of the cell subsample and of the trees.
    n_jobs
        Cores for the trees of one target.
    progress
        Optional ``progress(n_targets_done, n_targets)``.

    Returns
    -------
    pandas.DataFrame
        ``source`` (regulator), ``target``, ``score`` >= 0; one row per regulator-target pair with
        regulator != target; ``attrs["directed"] = True``.
    """
    matrix = _dense_expression(expression, gene_names)
    generator = np.random.default_rng(seed)
    if matrix.shape[0] > max_cells:
        matrix = matrix[np.sort(generator.choice(matrix.shape[0], size=max_cells, replace=False))]
    standard_deviation = matrix.std(axis=0)
    standardised = (matrix - matrix.mean(axis=0)) / np.where(standard_deviation > 0, standard_deviation, 1.0)
    names = np.asarray(gene_names, dtype=object)
    if tf_list is None:
        regulator_indices = np.arange(len(gene_names))
    else:
        tf_set = set(tf_list)
        regulator_indices = np.flatnonzero([gene in tf_set for gene in gene_names])
        if len(regulator_indices) == 0:
            raise ScgrnInputError(
                "none of the TFs in tf_list is among the genes", fix="check the TF list's species and symbol case",
            )
    sources, targets, scores = [], [], []
    for target_index in range(len(gene_names)):
        candidates = regulator_indices[regulator_indices != target_index]
        if len(candidates) and standard_deviation[target_index] > 0:
            forest = ExtraTreesRegressor(
                n_estimators=n_trees, max_features=max_features, min_samples_leaf=min_samples_leaf,
                random_state=seed + target_index, n_jobs=n_jobs,
            ).fit(standardised[:, candidates], standardised[:, target_index])
            importance = np.mean(
                [tree.tree_.compute_feature_importances(normalize=False) for tree in forest.estimators_], axis=0
            )
        else:
            importance = np.zeros(len(candidates))  # a constant target has nothing to explain
        sources.append(names[candidates])
        targets.append(np.full(len(candidates), names[target_index], dtype=object))
        scores.append(importance)
        if progress is not None:
            progress(target_index + 1, len(gene_names))
    predictions = pd.DataFrame({
        "source": np.concatenate(sources),
        "target": np.concatenate(targets),
        "score": np.concatenate(scores),
    })
    predictions.attrs["directed"] = True
    return predictions


def random_edges(gene_names: Sequence[str], *, tf_list: Sequence[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """Uniform random scores on every ordered pair (regulator in ``tf_list`` when given), no self-loops.

    Returns
    -------
    pandas.DataFrame
        ``source``, ``target``, ``score`` in [0, 1); ``attrs["directed"] = True``.
    """
    names = np.asarray(gene_names, dtype=object)
    source_indices = np.arange(len(names)) if tf_list is None else np.flatnonzero(np.isin(names, list(tf_list)))
    source_grid, target_grid = np.meshgrid(source_indices, np.arange(len(names)), indexing="ij")
    keep = source_grid != target_grid
    source_grid, target_grid = source_grid[keep], target_grid[keep]
    predictions = pd.DataFrame({
        "source": names[source_grid],
        "target": names[target_grid],
        "score": np.random.default_rng(seed).random(len(source_grid)),
    })
    predictions.attrs["directed"] = True
    return predictions
