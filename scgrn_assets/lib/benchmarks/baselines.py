"""Baseline gene networks on the same genes as ours: co-expression, tree-based regression, random.

Every function returns predictions in the common form, a DataFrame with columns ``source``,
``target``, ``score`` (higher = more confident; the metrics rank by ``|score|``), and sets
``DataFrame.attrs["directed"]``:

- Pearson and Spearman co-expression are undirected: each unordered gene pair appears once
  (``source`` = the gene earlier in ``gene_names``), ``score`` = |rho|, and the signed coefficient
  is kept in ``correlation``. Against a directed reference they are evaluated undirected
  (see :mod:`scgrn_assets.lib.benchmarks.metrics`).
- The tree baseline is GENIE3-style (per target, an ensemble of randomised trees regresses the
  target on the candidate regulators; the score is the regulator's mean impurity decrease) and is
  directed regulator -> target. The candidate regulators are every gene unless the caller passes a
  TF list (GENIE3's default); the benchmark never passes the reference's regulators, which would
  let this one method rank only truth-rooted pairs. scikit-learn's ExtraTrees is used, not
  arboreto, which is unmaintained and breaks with recent dask.
- GRNBoost2 (arboreto's algorithm) is the same per-target regression with stochastic gradient
  boosting (arboreto's settings: learning rate 0.01, up to 5,000 trees of depth 3, 10% of the
  regulators per split, 90% of the cells per tree, stopped once the out-of-bag improvement over the
  last 25 trees is no longer positive); importance × trees, as arboreto reports it. Run here without
  dask: arboreto 0.1.6 fails with current dask ("Must supply at least one delayed object").
- RegDiffusion (PyPI ``regdiffusion``) learns an adjacency matrix by denoising diffusion; directed.
- The gene-level null scores each pair from its two genes' marginal statistics only (the product of
  their standard deviations): what any method's score owes to gene-level properties.
- The random baseline scores every ordered pair (TF-rooted when a TF list is given) uniformly.

``groups`` (one label per cell: the study, or study and cell type) makes the co-expression and
regression baselines work within groups: each gene is centred on its group's mean first (Spearman
ranks within the group), so that differences in level between plate and droplet studies do not
show up as co-expression.

The expression matrix is cells x genes (AnnData's ``X``), dense or scipy sparse, on any
scale the caller chose (log-normalised counts are typical).
"""

from __future__ import annotations

import contextlib
import io
import tempfile

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.stats
from sklearn.ensemble import ExtraTreesRegressor

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.progress import Progress, report



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


def within_group_centred(matrix: np.ndarray, groups: Sequence | None) -> np.ndarray:
    """Each column minus its mean within each group of rows (``groups``: one label per row); unchanged when None."""
    if groups is None:
        return matrix
    codes, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if len(inverse) != matrix.shape[0]:
        raise ScgrnInputError(f"{len(inverse)} group labels for {matrix.shape[0]} cells",
                              fix="pass one group label (study) per cell")
    sums = np.zeros((len(codes), matrix.shape[1]))
    np.add.at(sums, inverse, matrix)
    counts = np.bincount(inverse, minlength=len(codes))[:, None]
    return matrix - (sums / counts)[inverse]


def _ranks_within_groups(matrix: np.ndarray, groups: Sequence | None) -> np.ndarray:
    """Per-gene average ranks within each group, scaled to (0, 1] by the group's size."""
    if groups is None:
        return scipy.stats.rankdata(matrix, axis=0)
    groups = np.asarray(groups).astype(str)
    ranks = np.empty_like(matrix, dtype=np.float64)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        ranks[rows] = scipy.stats.rankdata(matrix[rows], axis=0) / len(rows)
    return ranks


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


def pearson_edges(expression, gene_names: Sequence[str], groups: Sequence | None = None) -> pd.DataFrame:
    """Pearson co-expression over cells for every unordered gene pair.

    Parameters
    ----------
    expression
        Cells x genes matrix, shape (n_cells, n_genes), dense or sparse.
    gene_names
        Symbols of the columns, length n_genes, unique.
    groups
        Optional label per cell (study): genes are centred within each group first, so the
        correlation is the pooled within-group one.

    Returns
    -------
    pandas.DataFrame
        n_genes * (n_genes - 1) / 2 rows: ``source``, ``target``, ``score`` = |r|, ``correlation`` = r;
        ``attrs["directed"] = False``.
    """
    matrix = within_group_centred(_dense_expression(expression, gene_names), groups)
    return _undirected_pairs(_correlation_matrix(matrix), gene_names)


def spearman_edges(expression, gene_names: Sequence[str], groups: Sequence | None = None) -> pd.DataFrame:
    """Spearman co-expression (Pearson on per-gene ranks, ties averaged) for every unordered gene pair.

    Same shapes and output as :func:`pearson_edges`; with ``groups``, genes are ranked within each
    group (ranks scaled by the group's size) and centred within it.
    """
    matrix = _dense_expression(expression, gene_names)
    ranks = within_group_centred(_ranks_within_groups(matrix, groups), groups)
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
    groups: Sequence | None = None,
    progress: Progress | None = None,
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
    groups
        Optional label per cell (study): every gene is centred within its group before regression.
    progress
        Optional ``progress(n_targets_done, n_targets)``.

    Returns
    -------
    pandas.DataFrame
        ``source`` (regulator), ``target``, ``score`` >= 0; one row per regulator-target pair with
        regulator != target; ``attrs["directed"] = True``.
    """
    def importance(regulators: np.ndarray, target: np.ndarray, target_index: int) -> np.ndarray:
        forest = ExtraTreesRegressor(
            n_estimators=n_trees, max_features=max_features, min_samples_leaf=min_samples_leaf,
            random_state=seed + target_index, n_jobs=n_jobs,
        ).fit(regulators, target)
        return np.mean([tree.tree_.compute_feature_importances(normalize=False) for tree in forest.estimators_],
                       axis=0)

    return _per_target_regressions(expression, gene_names, tf_list, max_cells, seed, groups, importance, progress)


def _per_target_regressions(expression, gene_names, tf_list, max_cells, seed, groups, importance,
                            progress: Progress | None) -> pd.DataFrame:
    """The directed edge table of a per-target regression method: for each target, ``importance(regulators,
    target, target_index)`` scores its candidate regulators (every regulator but itself) on the
    standardised cells; a constant target has nothing to explain and scores 0."""
    standardised, standard_deviation, regulator_indices = _regression_inputs(expression, gene_names, tf_list,
                                                                             max_cells, seed, groups)
    names = np.asarray(gene_names, dtype=object)
    sources, targets, scores = [], [], []
    for target_index in range(len(gene_names)):
        candidates = regulator_indices[regulator_indices != target_index]
        if len(candidates) and standard_deviation[target_index] > 0:
            scores.append(importance(standardised[:, candidates], standardised[:, target_index], target_index))
        else:
            scores.append(np.zeros(len(candidates)))
        sources.append(names[candidates])
        targets.append(np.full(len(candidates), names[target_index], dtype=object))
        report(progress, target_index + 1, len(gene_names))
    predictions = pd.DataFrame({"source": np.concatenate(sources), "target": np.concatenate(targets),
                                "score": np.concatenate(scores)})
    predictions.attrs["directed"] = True
    return predictions


def _regression_inputs(expression, gene_names, tf_list, max_cells, seed, groups):
    """Standardised (within-group centred) cells x genes, each gene's sd, and the regulators' columns."""
    matrix = _dense_expression(expression, gene_names)
    groups = None if groups is None else np.asarray(groups).astype(str)
    if groups is not None and len(groups) != matrix.shape[0]:
        raise ScgrnInputError(f"{len(groups)} group labels for {matrix.shape[0]} cells",
                              fix="pass one group label (study) per cell")
    if matrix.shape[0] > max_cells:
        chosen = np.sort(np.random.default_rng(seed).choice(matrix.shape[0], size=max_cells, replace=False))
        matrix = matrix[chosen]
        groups = None if groups is None else groups[chosen]
    centred = within_group_centred(matrix, groups) if groups is not None else matrix - matrix.mean(axis=0)
    standard_deviation = centred.std(axis=0)
    standardised = centred / np.where(standard_deviation > 0, standard_deviation, 1.0)
    if tf_list is None:
        regulator_indices = np.arange(len(gene_names))
    else:
        tf_set = set(tf_list)
        regulator_indices = np.flatnonzero([gene in tf_set for gene in gene_names])
        if len(regulator_indices) == 0:
            raise ScgrnInputError(
                "none of the TFs in tf_list is among the genes", fix="check the TF list's species and symbol case",
            )
    return standardised, standard_deviation, regulator_indices


class _EarlyStopOnOutOfBag:
    """arboreto's EarlyStopMonitor: stop once the mean out-of-bag improvement of the last
    ``window`` trees is no longer positive (further trees fit noise)."""

    def __init__(self, window: int):
        self.window = window

    def __call__(self, iteration: int, regressor, local_variables) -> bool:
        if iteration < self.window:
            return False
        return bool(np.mean(regressor.oob_improvement_[max(0, iteration - self.window + 1): iteration + 1]) < 0)


def grnboost2_edges(
    expression,
    gene_names: Sequence[str],
    *,
    tf_list: Sequence[str] | None = None,
    max_cells: int = 1000,
    max_estimators: int = 5000,
    early_stop_window: int = 25,
    seed: int = 0,
    groups: Sequence | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """GRNBoost2 (arboreto's algorithm and settings), one target at a time, without dask.

    Per target, :class:`sklearn.ensemble.GradientBoostingRegressor` with learning rate 0.01, depth 3,
    ``max_features=0.1``, ``subsample=0.9`` and up to ``max_estimators`` trees, stopped early as
    arboreto does; the score of regulator -> target is ``feature_importances_ × n_trees``.
    Same inputs and output as :func:`tree_edges` (``max_cells`` bounds the run time).
    """
    from sklearn.ensemble import GradientBoostingRegressor

    def importance(regulators: np.ndarray, target: np.ndarray, target_index: int) -> np.ndarray:
        booster = GradientBoostingRegressor(learning_rate=0.01, n_estimators=max_estimators, max_features=0.1,
                                            subsample=0.9, random_state=seed + target_index)
        booster.fit(regulators, target, monitor=_EarlyStopOnOutOfBag(early_stop_window))
        return booster.feature_importances_ * len(booster.estimators_)

    return _per_target_regressions(expression, gene_names, tf_list, max_cells, seed, groups, importance, progress)


def regdiffusion_edges(expression, gene_names: Sequence[str], *, n_steps: int = 1000, max_cells: int = 2000,
                       seed: int = 0, groups: Sequence | None = None,
                       progress: Progress | None = None) -> pd.DataFrame:
    """RegDiffusion (Zhu & Slonim; PyPI ``regdiffusion``) on the CPU: its learned adjacency, row -> column.

    RegDiffusion scales each cell to [0, 1] by its own min and max: a cell whose genes are all equal (one
    that expresses none of them) has range 0, and its NaNs spread to every gene and every score. Such
    cells carry no information about co-regulation, so they are left out first (``attrs["n_cells_dropped"]``),
    as are genes constant over the cells kept (they get score 0).

    Parameters
    ----------
    expression
        Cells x genes, log-normalised (RegDiffusion expects log-transformed data).
    n_steps
        Training epochs (RegDiffusion's ``n_steps``; its default is 1,000).
    max_cells
        Cells subsampled (seeded) when there are more: bounds the run time.
    groups
        Optional label per cell, passed as RegDiffusion's ``cell_types``.
    progress
        Optional; called once per epoch (``progress(epoch, n_steps)``).

    Returns
    -------
    pandas.DataFrame
        Every ordered pair (no self-loops), ``score`` = |adjacency|; ``attrs["directed"] = True``,
        ``attrs["n_cells_used"]`` and ``attrs["n_cells_dropped"]`` (cells with no spread across the genes).

    Raises
    ------
    ScgrnInputError
        When fewer than two cells or two genes vary.
    """
    import regdiffusion

    matrix = _dense_expression(expression, gene_names)
    groups = None if groups is None else np.asarray(groups).astype(str)
    if matrix.shape[0] > max_cells:
        chosen = np.sort(np.random.default_rng(seed).choice(matrix.shape[0], size=max_cells, replace=False))
        matrix, groups = matrix[chosen], (None if groups is None else groups[chosen])
    # Constant genes make its per-gene standardisation divide by zero (they get no edges); constant cells
    # its per-cell min-max. Dropping one can make the other constant: repeat until neither changes.
    cells, varying = np.arange(matrix.shape[0]), np.arange(matrix.shape[1])
    while True:
        block = matrix[np.ix_(cells, varying)]
        keep_cells = np.ptp(block, axis=1) > 0 if block.size else np.zeros(len(cells), dtype=bool)
        keep_genes = np.ptp(block[keep_cells], axis=0) > 0 if keep_cells.any() else np.zeros(len(varying), bool)
        if keep_cells.all() and keep_genes.all():
            break
        cells, varying = cells[keep_cells], varying[keep_genes]
    if len(cells) < 2 or len(varying) < 2:
        raise ScgrnInputError(f"RegDiffusion needs two cells and two genes that vary; {len(cells)} cells and "
                              f"{len(varying)} genes do", fix="check the expression matrix (empty or constant)")
    cell_types = None if groups is None else np.unique(groups[cells], return_inverse=True)[1]
    # Its default logger makes ./result_logs/<date>/ in the current folder; only its constructor writes
    # (the trainer keeps the log in memory), so a throwaway folder keeps the current one clean.
    with tempfile.TemporaryDirectory(prefix="scgrn-regdiffusion-") as log_folder:
        logger = regdiffusion.LightLogger(log_folder)
    trainer = regdiffusion.RegDiffusionTrainer(matrix[np.ix_(cells, varying)].astype(np.float32),
                                               cell_types=cell_types, n_steps=n_steps,
                                               batch_size=min(128, len(cells)), device="cpu", seed=seed,
                                               logger=logger)
    _report_epochs(trainer, n_steps, progress)
    # RegDiffusion draws its own per-step progress bar on stderr; the caller reports progress instead.
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.train()
    adjacency = np.zeros((len(gene_names), len(gene_names)))
    adjacency[np.ix_(varying, varying)] = np.abs(np.asarray(trainer.get_adj(), dtype=np.float64))
    names = np.asarray(gene_names, dtype=object)
    sources, targets = np.nonzero(~np.eye(len(names), dtype=bool))
    predictions = pd.DataFrame({"source": names[sources], "target": names[targets],
                                "score": adjacency[sources, targets]})
    predictions.attrs.update(directed=True, n_cells_used=int(len(cells)),
                             n_cells_dropped=int(matrix.shape[0] - len(cells)))
    return predictions


def _report_epochs(trainer, n_steps: int, progress: Progress | None) -> None:
    """Report each of RegDiffusion's epochs: its trainer logs once per epoch through ``trainer.logger.log``
    (regdiffusion 0.2), which is wrapped; a version without that hook trains without reports."""
    logger = getattr(trainer, "logger", None)
    if progress is None or not callable(getattr(logger, "log", None)):
        return
    log, epochs = logger.log, iter(range(1, n_steps + 1))

    def log_and_report(*args, **kwargs):
        result = log(*args, **kwargs)
        report(progress, next(epochs, n_steps), n_steps)
        return result

    logger.log = log_and_report


def gene_level_null_edges(expression, gene_names: Sequence[str], groups: Sequence | None = None) -> pd.DataFrame:
    """Each unordered pair scored only from its two genes' marginals: sd_i × sd_j (within groups when given).

    The bound |cov_ij| ≤ sd_i sd_j: a method whose ranking this reproduces is ranking genes, not pairs.

    Returns
    -------
    pandas.DataFrame
        Like :func:`pearson_edges` (``correlation`` column omitted), undirected.
    """
    matrix = within_group_centred(_dense_expression(expression, gene_names), groups)
    sd = matrix.std(axis=0)
    rows, columns = np.triu_indices(len(gene_names), k=1)
    names = np.asarray(gene_names, dtype=object)
    predictions = pd.DataFrame({"source": names[rows], "target": names[columns], "score": sd[rows] * sd[columns]})
    predictions.attrs["directed"] = False
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
