"""GRN benchmark metrics: one implementation of each, on explicitly named universes of gene pairs.

Conventions (BEELINE's, unless stated):

- Scores are ranked by absolute value; a pair a method did not list has score 0, and a score of 0
  never counts as a prediction (early precision, top-K, cutoff sweeps).
- Self-loops are excluded everywhere; reference edges and predictions are deduplicated.
- **Direction.** A (method, reference) pair is evaluated directed only when both are directed.
  Otherwise both sides become unordered pairs: a pair {a, b} is true when the reference has
  a -> b or b -> a, and its score is the larger |score| the method gave either orientation.
  So undirected co-expression is compared with a TF-target set on unordered pairs.
- **Universes** (the pairs that are ranked; the data's genes G = reference genes present in the data):

  ``all_pairs``  every pair of distinct genes of G.
  ``tf_rooted``  pairs whose source is a TF of G (``tf_list`` when given, else the reference's
                 regulators, as BEELINE does); undirected: pairs with at least one TF.
  ``predicted``  only the pairs the method listed (both genes in G), as the original pipeline did.

- Early precision (EP): k = number of true edges in the universe; the predicted set is every
  pair whose score is >= the k-th highest score (ties at the k-th score kept) and > 0.
  EPR = EP / (k / n_pairs), the random predictor's precision.
- AUPRC is given both as average precision (step integral, scikit-learn's
  ``average_precision_score``) and as the trapezoid under the PR curve that starts at
  (recall 0, precision 1) (scikit-learn's ``auc(recall, precision)``); the AUPRC ratio divides
  average precision by the base rate (the random predictor's expected AUPRC).
- Enrichment: the top-K listed pairs by score (K defaults to the number of true edges); two nulls
  keep the predicted network's out-degrees: targets redrawn with probability proportional to
  their reference in-degree without replacement, and degree-preserving rewiring (double-edge
  swaps) of the predicted network. Empirical p = (1 + #null >= observed) / (1 + n_null).

Pairs not listed by a method are never materialised: they enter the ranking as two weighted
rows with score 0 (true and false), so universes of millions of pairs stay cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numba
import numpy as np
import pandas as pd
import scipy.stats

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.plotting import figure_png, plt

UNIVERSES = ("all_pairs", "tf_rooted", "predicted")
METRIC_COLUMNS = ["method", "reference", "universe", "metric", "value", "cutoff"]
SIGNIFICANCE_LEVEL = 0.05

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(n_done, n_total)``."""


# ---------------------------------------------------------------------------------------------
# Ranking metrics on (labels, scores, weights)
# ---------------------------------------------------------------------------------------------


def _as_ranking(labels, scores, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    scores = np.abs(np.asarray(scores, dtype=np.float64))
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (len(labels) == len(scores) == len(weights)):
        raise ScgrnInputError(
            f"labels, scores and weights have lengths {len(labels)}, {len(scores)}, {len(weights)}",
            fix="pass one label, score and weight per pair",
        )
    if not np.isfinite(scores).all():
        raise ScgrnInputError("scores contain NaN or infinite values", fix="drop or zero those edges first")
    return labels, scores, weights


def _counts_at_thresholds(labels, scores, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct score thresholds (descending) with the weighted true / false positives at or above each."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    true_positives = np.cumsum(weights[order] * labels[order])
    false_positives = np.cumsum(weights[order] * ~labels[order])
    last_of_each_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    return sorted_scores[last_of_each_tie], true_positives[last_of_each_tie], false_positives[last_of_each_tie]


def auroc(labels, scores, weights=None) -> float:
    """Area under the ROC curve (ties give the average, like ``sklearn.metrics.roc_auc_score``).

    Parameters
    ----------
    labels, scores, weights
        Arrays of shape (n_pairs,): truth, score (ranked by |score|), optional pair weight.

    Returns
    -------
    float
        AUROC in [0, 1]; NaN when all pairs are true or all false.
    """
    labels, scores, weights = _as_ranking(labels, scores, weights)
    _, true_positives, false_positives = _counts_at_thresholds(labels, scores, weights)
    if len(scores) == 0 or true_positives[-1] == 0 or false_positives[-1] == 0:
        return float("nan")
    true_positive_rate = np.r_[0.0, true_positives / true_positives[-1]]
    false_positive_rate = np.r_[0.0, false_positives / false_positives[-1]]
    return float(np.trapezoid(true_positive_rate, false_positive_rate))


def precision_recall_points(labels, scores, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at each distinct threshold, highest threshold first.

    Returns
    -------
    precision, recall, thresholds
        Arrays of shape (n_thresholds,); precision at threshold t counts pairs with |score| >= t.
    """
    labels, scores, weights = _as_ranking(labels, scores, weights)
    thresholds, true_positives, false_positives = _counts_at_thresholds(labels, scores, weights)
    precision = true_positives / (true_positives + false_positives)
    if len(scores) and true_positives[-1] > 0:
        recall = true_positives / true_positives[-1]
    else:
        recall = np.full(len(thresholds), np.nan)
    return precision, recall, thresholds


def average_precision(labels, scores, weights=None) -> float:
    """AUPRC as average precision: sum over thresholds of (recall step) x precision
    (``sklearn.metrics.average_precision_score``). NaN when no pair is true."""
    precision, recall, _ = precision_recall_points(labels, scores, weights)
    if len(recall) == 0 or np.isnan(recall[-1]):
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def auprc_trapezoid(labels, scores, weights=None) -> float:
    """AUPRC as the trapezoid under the PR curve, starting at (recall 0, precision 1)
    (``sklearn.metrics.auc(recall, precision)`` on ``precision_recall_curve``). NaN when no pair is true."""
    precision, recall, _ = precision_recall_points(labels, scores, weights)
    if len(recall) == 0 or np.isnan(recall[-1]):
        return float("nan")
    return float(np.trapezoid(np.r_[1.0, precision], np.r_[0.0, recall]))


def early_selection(labels, scores, weights=None) -> np.ndarray:
    """BEELINE's early-precision set: |score| >= the k-th highest |score| (k = weighted number of
    true pairs, ties kept) and |score| > 0.

    Returns
    -------
    numpy.ndarray of bool, shape (n_pairs,)
        Which pairs are selected.
    """
    labels, scores, weights = _as_ranking(labels, scores, weights)
    n_true = weights[labels].sum()
    if n_true == 0 or len(scores) == 0:
        return np.zeros(len(scores), dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    cumulative_weight = np.cumsum(weights[order])
    kth_position = min(int(np.searchsorted(cumulative_weight, n_true - 1e-9)), len(scores) - 1)
    kth_score = scores[order][kth_position]
    return (scores >= kth_score) & (scores > 0)


def early_precision(labels, scores, weights=None) -> float:
    """Precision of :func:`early_selection`; 0 when nothing is selected (no non-zero score)."""
    labels, scores, weights = _as_ranking(labels, scores, weights)
    selected = early_selection(labels, scores, weights)
    selected_weight = weights[selected].sum()
    return float(weights[selected & labels].sum() / selected_weight) if selected_weight > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Universes: which pairs are ranked, with which labels
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvaluationPairs:
    """The pairs of one universe for one (method, reference): listed pairs explicitly, the rest counted.

    Attributes
    ----------
    universe, directed
        Universe name and whether pairs are ordered.
    genes
        Symbols of G (reference genes present in the data), shape (n_genes,); indices below refer to it.
    tf_indices
        Indices of the universe's TFs (regulators).
    source_index, target_index, scores, labels
        The pairs the method listed in the universe, shape (n_listed,); scores are |score|. Undirected
        pairs have source_index < target_index.
    true_source_index, true_target_index
        Every true pair of the universe, shape (n_true,).
    n_pairs
        Number of pairs in the universe.
    """

    universe: str
    directed: bool
    genes: np.ndarray
    tf_indices: np.ndarray
    source_index: np.ndarray
    target_index: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    true_source_index: np.ndarray
    true_target_index: np.ndarray
    n_pairs: int

    @property
    def n_true(self) -> int:
        return len(self.true_source_index)

    @property
    def base_rate(self) -> float:
        """Precision of a random predictor: n_true / n_pairs."""
        return self.n_true / self.n_pairs if self.n_pairs else float("nan")

    def ranking(self, cutoff: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, scores, weights) over the whole universe: listed pairs (weight 1) plus two
        score-0 rows weighted by the unlisted true and false pairs. Scores below ``cutoff`` become 0."""
        n_unlisted_true = self.n_true - int(self.labels.sum())
        n_unlisted_false = self.n_pairs - len(self.scores) - n_unlisted_true
        scores = self.scores if cutoff is None else np.where(self.scores >= cutoff, self.scores, 0.0)
        return (
            np.r_[self.labels, True, False],
            np.r_[scores, 0.0, 0.0],
            np.r_[np.ones(len(scores)), n_unlisted_true, n_unlisted_false],
        )


def _pair_keys(source_index: np.ndarray, target_index: np.ndarray, n_genes: int) -> np.ndarray:
    return source_index.astype(np.int64) * n_genes + target_index.astype(np.int64)


def _orient(source_index, target_index, directed: bool) -> tuple[np.ndarray, np.ndarray]:
    if directed:
        return source_index, target_index
    return np.minimum(source_index, target_index), np.maximum(source_index, target_index)


def method_is_directed(prediction: pd.DataFrame, method_directed: bool | None = None) -> bool:
    """Whether a method's predictions are directed: the explicit flag, else ``attrs["directed"]``, else True."""
    if method_directed is not None:
        return bool(method_directed)
    return bool(prediction.attrs.get("directed", True))


def evaluation_pairs(
    prediction: pd.DataFrame,
    reference: pd.DataFrame,
    gene_universe: Sequence[str],
    *,
    universe: str = "all_pairs",
    tf_list: Sequence[str] | None = None,
    prediction_directed: bool | None = None,
) -> EvaluationPairs:
    """Build the ranked pairs of one universe (see the module docstring for the universes).

    Parameters
    ----------
    prediction
        DataFrame[source, target, score].
    reference
        Normalised reference (:mod:`scgrn_assets.lib.benchmark.references`).
    gene_universe
        The data's genes (the genes every method was run on).
    universe
        One of :data:`UNIVERSES`.
    tf_list
        Regulators for ``tf_rooted``; None takes the reference's regulators (none for an undirected reference).
    prediction_directed
        Whether the method is directed; None reads ``prediction.attrs``.

    Returns
    -------
    EvaluationPairs
    """
    if universe not in UNIVERSES:
        raise ScgrnInputError(f"unknown universe {universe!r}", fix=f"use one of {UNIVERSES}")
    missing_columns = {"source", "target", "score"} - set(prediction.columns)
    if missing_columns:
        raise ScgrnInputError(
            f"predictions lack columns {sorted(missing_columns)}", fix="pass DataFrame[source, target, score]",
        )
    directed = method_is_directed(prediction, prediction_directed) and bool(reference["directed"].all())
    reference = reference[reference["source"] != reference["target"]]
    reference_genes = set(reference["source"]) | set(reference["target"])
    genes = np.asarray(list(dict.fromkeys(gene for gene in gene_universe if gene in reference_genes)), dtype=object)
    gene_position = pd.Series(np.arange(len(genes)), index=pd.Index(genes, dtype=object))
    n_genes = len(genes)

    if tf_list is not None:
        regulators = pd.Series(list(tf_list), dtype=object)
    else:  # an undirected reference names no regulators: its tf_rooted universe is empty without a TF list
        regulators = reference.loc[reference["directed"], "source"]
    is_tf = np.zeros(n_genes, dtype=bool)
    is_tf[gene_position.reindex(regulators.unique()).dropna().astype(int).to_numpy()] = True

    def indexed(sources: pd.Series, targets: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source_index = gene_position.reindex(sources.to_numpy()).to_numpy()
        target_index = gene_position.reindex(targets.to_numpy()).to_numpy()
        inside = ~np.isnan(source_index) & ~np.isnan(target_index)
        source_index = source_index[inside].astype(np.int64)
        target_index = target_index[inside].astype(np.int64)
        not_self = source_index != target_index
        return source_index[not_self], target_index[not_self], np.flatnonzero(inside)[not_self]

    def in_universe(source_index: np.ndarray, target_index: np.ndarray) -> np.ndarray:
        if universe != "tf_rooted":
            return np.ones(len(source_index), dtype=bool)
        return is_tf[source_index] if directed else (is_tf[source_index] | is_tf[target_index])

    # predictions: |score|, oriented, deduplicated keeping the largest |score|
    predicted_source, predicted_target, rows = indexed(prediction["source"], prediction["target"])
    predicted_scores = np.abs(prediction["score"].to_numpy(dtype=np.float64)[rows])
    if not np.isfinite(predicted_scores).all():
        raise ScgrnInputError("prediction scores contain NaN or infinite values", fix="drop or zero those edges first")
    predicted_source, predicted_target = _orient(predicted_source, predicted_target, directed)
    keep = in_universe(predicted_source, predicted_target)
    predicted_keys = _pair_keys(predicted_source[keep], predicted_target[keep], n_genes)
    predicted_scores = predicted_scores[keep]
    order = np.lexsort((-predicted_scores, predicted_keys))
    unique_keys, first = np.unique(predicted_keys[order], return_index=True)
    listed_keys, listed_scores = unique_keys, predicted_scores[order][first]

    true_source, true_target, _ = indexed(reference["source"], reference["target"])
    true_source, true_target = _orient(true_source, true_target, directed)
    true_keys = np.unique(_pair_keys(true_source, true_target, n_genes))
    true_keys = true_keys[in_universe(true_keys // max(n_genes, 1), true_keys % max(n_genes, 1))]
    if universe == "predicted":
        true_keys = np.intersect1d(true_keys, listed_keys)
        n_pairs = len(listed_keys)
    else:
        n_tfs = int(is_tf.sum())
        n_pairs = {
            ("all_pairs", True): n_genes * (n_genes - 1),
            ("all_pairs", False): n_genes * (n_genes - 1) // 2,
            ("tf_rooted", True): n_tfs * (n_genes - 1),
            ("tf_rooted", False): n_tfs * (n_tfs - 1) // 2 + n_tfs * (n_genes - n_tfs),
        }[(universe, directed)]
    return EvaluationPairs(
        universe=universe,
        directed=directed,
        genes=genes,
        tf_indices=np.flatnonzero(is_tf),
        source_index=listed_keys // max(n_genes, 1),
        target_index=listed_keys % max(n_genes, 1),
        scores=listed_scores,
        labels=np.isin(listed_keys, true_keys),
        true_source_index=true_keys // max(n_genes, 1),
        true_target_index=true_keys % max(n_genes, 1),
        n_pairs=int(n_pairs),
    )


# ---------------------------------------------------------------------------------------------
# Network-level metrics
# ---------------------------------------------------------------------------------------------


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


@numba.njit(cache=True)
def _is_true_pair(key, sorted_true_keys):
    position = np.searchsorted(sorted_true_keys, key)
    return position < len(sorted_true_keys) and sorted_true_keys[position] == key


@numba.njit(cache=True)
def _in_degree_null_hits(
    source_genes, n_draws, weighted_genes, weights, sorted_true_keys, n_genes, directed, n_null, seed
):
    """Hits per (null replicate, source) when each source's targets are redrawn from ``weighted_genes``
    with probability proportional to ``weights``, without replacement, never the source itself."""
    np.random.seed(seed)
    n_weighted = len(weighted_genes)
    base_cumulative = np.cumsum(weights)
    total_weight = base_cumulative[-1] if n_weighted else 0.0
    position_of_gene = np.full(n_genes, -1, np.int64)
    for position in range(n_weighted):
        position_of_gene[weighted_genes[position]] = position
    hits = np.zeros((n_null, len(source_genes)), np.int64)
    drawn = np.zeros(n_weighted, np.bool_)
    drawn_positions = np.empty(n_weighted, np.int64)
    cumulative = base_cumulative.copy()
    for replicate in range(n_null):
        for source_slot in range(len(source_genes)):
            source = source_genes[source_slot]
            n_drawn = 0
            excluded_weight = 0.0
            self_position = position_of_gene[source]
            if self_position >= 0:
                drawn[self_position] = True
                drawn_positions[0] = self_position
                n_drawn = 1
                excluded_weight = weights[self_position]
            n_wanted = min(n_draws[source_slot], n_weighted - n_drawn) + n_drawn
            current_total = total_weight
            rebuilt = False
            while n_drawn < n_wanted:
                if excluded_weight > 0.5 * current_total:
                    # rejection gets slow once half the weight is drawn: drop the drawn genes from the table
                    running = 0.0
                    for position in range(n_weighted):
                        if not drawn[position]:
                            running += weights[position]
                        cumulative[position] = running
                    current_total = running
                    excluded_weight = 0.0
                    rebuilt = True
                position = np.searchsorted(cumulative, np.random.random() * current_total, side="right")
                position = min(position, n_weighted - 1)
                if drawn[position]:
                    continue
                drawn[position] = True
                drawn_positions[n_drawn] = position
                n_drawn += 1
                excluded_weight += weights[position]
                target = weighted_genes[position]
                if directed:
                    key = source * n_genes + target
                else:
                    key = min(source, target) * n_genes + max(source, target)
                if _is_true_pair(key, sorted_true_keys):
                    hits[replicate, source_slot] += 1
            for slot in range(n_drawn):
                drawn[drawn_positions[slot]] = False
            if rebuilt:
                cumulative[:] = base_cumulative
    return hits


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
    hits = _in_degree_null_hits(
        sources.astype(np.int64), n_targets.astype(np.int64), weighted_genes.astype(np.int64),
        in_degree[weighted_genes].astype(np.float64), true_keys, n_genes, pairs.directed, n_null, seed,
    )
    return sources, hits


_EMPTY_SLOT = -1
_DELETED_SLOT = -2


@numba.njit(cache=True)
def _slot_of(key, mask):
    return np.int64((np.uint64(key) * np.uint64(11400714819323198485)) >> np.uint64(40)) & mask


@numba.njit(cache=True)
def _table_contains(table, mask, key):
    slot = _slot_of(key, mask)
    while table[slot] != _EMPTY_SLOT:
        if table[slot] == key:
            return True
        slot = (slot + 1) & mask
    return False


@numba.njit(cache=True)
def _table_insert(table, mask, key):
    """Insert an absent key; returns 1 when it took an empty slot (0 when it reused a deleted one)."""
    slot = _slot_of(key, mask)
    while table[slot] >= 0:
        slot = (slot + 1) & mask
    took_empty = 1 if table[slot] == _EMPTY_SLOT else 0
    table[slot] = key
    return took_empty


@numba.njit(cache=True)
def _fill_table(table, mask, sources, targets, n_genes, directed):
    """(Re)build the table of present pairs; returns the number of empty slots left."""
    table[:] = _EMPTY_SLOT
    for edge in range(len(sources)):
        a, b = sources[edge], targets[edge]
        _table_insert(table, mask, a * n_genes + b if directed else min(a, b) * n_genes + max(a, b))
    return len(table) - len(sources)


@numba.njit(cache=True)
def _table_remove(table, mask, key):
    slot = _slot_of(key, mask)
    while table[slot] != key:
        slot = (slot + 1) & mask
    table[slot] = _DELETED_SLOT


@numba.njit(cache=True)
def _rewire(edge_sources, edge_targets, n_genes, directed, n_swaps, seed):
    """Degree-preserving double-edge swaps (a->b, c->d) -> (a->d, c->b), refusing self-loops and duplicates.

    Present pairs live in an open-addressing hash table (numba's own set is several times slower).
    """
    np.random.seed(seed)
    sources = edge_sources.copy()
    targets = edge_targets.copy()
    n_edges = len(sources)
    table_size = 16
    while table_size < 8 * n_edges:
        table_size *= 2
    mask = table_size - 1
    table = np.empty(table_size, np.int64)
    n_empty = _fill_table(table, mask, sources, targets, n_genes, directed)
    if n_edges < 2:
        return sources, targets
    for _ in range(n_swaps):
        first = np.random.randint(n_edges)
        second = np.random.randint(n_edges)
        a, b = sources[first], targets[first]
        c, d = sources[second], targets[second]
        if first == second or a == d or c == b:
            continue
        if directed:
            old_first, old_second = a * n_genes + b, c * n_genes + d
            new_first, new_second = a * n_genes + d, c * n_genes + b
        else:
            old_first = min(a, b) * n_genes + max(a, b)
            old_second = min(c, d) * n_genes + max(c, d)
            new_first = min(a, d) * n_genes + max(a, d)
            new_second = min(c, b) * n_genes + max(c, b)
        if new_first == new_second or _table_contains(table, mask, new_first):
            continue
        if _table_contains(table, mask, new_second):
            continue
        _table_remove(table, mask, old_first)
        _table_remove(table, mask, old_second)
        n_empty -= _table_insert(table, mask, new_first) + _table_insert(table, mask, new_second)
        targets[first] = d
        targets[second] = b
        if 4 * n_empty < table_size:  # deleted slots lengthen probes: rebuild before the table clogs
            n_empty = _fill_table(table, mask, sources, targets, n_genes, directed)
    return sources, targets


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
    return _rewire(
        np.asarray(edge_sources, dtype=np.int64), np.asarray(edge_targets, dtype=np.int64),
        n_genes, directed, swaps_per_edge * len(edge_sources), seed,
    )


@numba.njit(cache=True)
def _rewired_null_hits(edge_sources, edge_targets, source_slot, n_sources, sorted_true_keys, n_genes, directed,
                       n_null, n_swaps, seed):
    hits = np.zeros((n_null, n_sources), np.int64)
    for replicate in range(n_null):
        _, targets = _rewire(edge_sources, edge_targets, n_genes, directed, n_swaps, seed + replicate)
        for edge in range(len(targets)):
            a, b = edge_sources[edge], targets[edge]
            key = a * n_genes + b if directed else min(a, b) * n_genes + max(a, b)
            if _is_true_pair(key, sorted_true_keys):
                hits[replicate, source_slot[edge]] += 1
    return hits


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
    hits = _rewired_null_hits(
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


# ---------------------------------------------------------------------------------------------
# The benchmark table
# ---------------------------------------------------------------------------------------------


def ranking_metrics(pairs: EvaluationPairs) -> dict[str, float]:
    """AUROC, both AUPRCs, AUPRC ratios, early precision, EPR and degree correlation of one universe."""
    labels, scores, weights = pairs.ranking()
    average = average_precision(labels, scores, weights)
    trapezoid = auprc_trapezoid(labels, scores, weights)
    early = early_precision(labels, scores, weights)
    return {
        "auroc": auroc(labels, scores, weights),
        "auprc_ap": average,
        "auprc_trapezoid": trapezoid,
        "auprc_ratio": average / pairs.base_rate,
        "auprc_trapezoid_ratio": trapezoid / pairs.base_rate,
        "early_precision": early,
        "epr": early / pairs.base_rate,
        "degree_correlation": degree_correlation(pairs),
    }


def cutoff_sweep(pairs: EvaluationPairs, cutoffs: Sequence[float]) -> pd.DataFrame:
    """Metrics of the network |score| >= cutoff, for each cutoff (MI / CMI thresholds, TF-target scans).

    Returns
    -------
    pandas.DataFrame
        One row per cutoff: ``cutoff``, ``n_predicted``, ``precision``, ``recall``, and ``auroc`` /
        ``auprc_ap`` of the ranking where scores below the cutoff are set to 0.
    """
    rows = []
    for cutoff in cutoffs:
        labels, scores, weights = pairs.ranking(cutoff=cutoff)
        predicted = scores > 0
        n_predicted = int(weights[predicted].sum())
        hits = float(weights[predicted & labels].sum())
        rows.append({
            "cutoff": float(cutoff),
            "n_predicted": n_predicted,
            "precision": hits / n_predicted if n_predicted else float("nan"),
            "recall": hits / pairs.n_true if pairs.n_true else float("nan"),
            "auroc": auroc(labels, scores, weights),
            "auprc_ap": average_precision(labels, scores, weights),
        })
    return pd.DataFrame(rows, columns=["cutoff", "n_predicted", "precision", "recall", "auroc", "auprc_ap"])


def benchmark_table(
    predictions: Mapping[str, pd.DataFrame],
    references: Mapping[str, pd.DataFrame],
    gene_universe: Sequence[str],
    tf_list: Sequence[str] | None = None,
    *,
    universes: Sequence[str] = UNIVERSES,
    method_directed: Mapping[str, bool] | None = None,
    top_k: int | None = None,
    n_null: int = 1000,
    sweep_cutoffs: Mapping[str, Sequence[float]] | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Every metric for every method x reference x universe, in one long table.

    Parameters
    ----------
    predictions
        Method name -> DataFrame[source, target, score].
    references
        Reference name -> normalised reference.
    gene_universe
        The genes the methods were run on.
    tf_list
        Regulators of the ``tf_rooted`` universe (None: each reference's regulators).
    universes
        Which of :data:`UNIVERSES` to evaluate.
    method_directed
        Method -> directed; methods not named here use ``attrs["directed"]`` (default True).
    top_k
        Size of the enrichment network; None = the number of true pairs of each universe.
    n_null
        Replicates of each enrichment null (0 skips the enrichment).
    sweep_cutoffs
        Method -> score cutoffs for :func:`cutoff_sweep` (e.g. MI / CMI thresholds).
    progress
        Optional ``progress(n_done, n_total)`` over method x reference x universe.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`METRIC_COLUMNS`. ``cutoff`` is NaN for whole-ranking metrics, K for the
        ``top_k_*`` metrics and the score cutoff for ``sweep_*`` metrics. Also per universe:
        ``n_pairs``, ``n_true``, ``base_rate``, ``directed`` (1/0), and, for directed evaluations,
        ``tfs_tested`` / ``tfs_enriched_in_degree`` / ``tfs_enriched_rewired`` (sources with p < 0.05).
        Universes without a true or without a false pair only get the counts.
    """
    method_directed = dict(method_directed or {})
    sweep_cutoffs = dict(sweep_cutoffs or {})
    rows: list[tuple] = []
    n_total = len(predictions) * len(references) * len(universes)
    n_done = 0
    for method, prediction in predictions.items():
        for reference_name, reference in references.items():
            for universe in universes:
                pairs = evaluation_pairs(
                    prediction, reference, gene_universe, universe=universe, tf_list=tf_list,
                    prediction_directed=method_directed.get(method),
                )

                def add(metric: str, value: float, cutoff: float = float("nan")) -> None:
                    rows.append((method, reference_name, universe, metric, float(value), float(cutoff)))

                add("n_pairs", pairs.n_pairs)
                add("n_true", pairs.n_true)
                add("base_rate", pairs.base_rate)
                add("directed", pairs.directed)
                if 0 < pairs.n_true < pairs.n_pairs:
                    for metric, value in ranking_metrics(pairs).items():
                        add(metric, value)
                    if n_null > 0:
                        global_metrics, per_source = top_k_enrichment(pairs, top_k=top_k, n_null=n_null, seed=seed)
                        k_used = global_metrics.pop("top_k")
                        for metric, value in global_metrics.items():
                            add(metric, value, k_used)
                        if pairs.directed:  # unordered pairs have no regulator to summarise by
                            add("tfs_tested", len(per_source), k_used)
                            add("tfs_enriched_in_degree", (per_source["p_in_degree"] < SIGNIFICANCE_LEVEL).sum(),
                                k_used)
                            add("tfs_enriched_rewired", (per_source["p_rewired"] < SIGNIFICANCE_LEVEL).sum(), k_used)
                    if method in sweep_cutoffs:
                        sweep = cutoff_sweep(pairs, sweep_cutoffs[method])
                        for record in sweep.to_dict("records"):
                            for metric in ("n_predicted", "precision", "recall", "auroc", "auprc_ap"):
                                add(f"sweep_{metric}", record[metric], record["cutoff"])
                n_done += 1
                if progress is not None:
                    progress(n_done, n_total)
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def per_tf_enrichment(
    predictions: Mapping[str, pd.DataFrame],
    references: Mapping[str, pd.DataFrame],
    gene_universe: Sequence[str],
    tf_list: Sequence[str] | None = None,
    *,
    universe: str = "tf_rooted",
    method_directed: Mapping[str, bool] | None = None,
    top_k: int | None = None,
    n_null: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-TF top-K enrichment (see :func:`top_k_enrichment`) for every method x reference.

    Returns
    -------
    pandas.DataFrame
        ``method``, ``reference``, ``universe`` and the per-source columns of :func:`top_k_enrichment`.
    """
    method_directed = dict(method_directed or {})
    tables = []
    for method, prediction in predictions.items():
        for reference_name, reference in references.items():
            pairs = evaluation_pairs(
                prediction, reference, gene_universe, universe=universe, tf_list=tf_list,
                prediction_directed=method_directed.get(method),
            )
            if not 0 < pairs.n_true < pairs.n_pairs:
                continue
            _, per_source = top_k_enrichment(pairs, top_k=top_k, n_null=n_null, seed=seed)
            tables.append(per_source.assign(method=method, reference=reference_name, universe=universe))
    columns = ["method", "reference", "universe", "tf", "n_predicted", "hits", "precision", "recall",
               "enrichment", "p_in_degree", "p_rewired"]
    return pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)


# ---------------------------------------------------------------------------------------------
# Pictures for asset metadata
# ---------------------------------------------------------------------------------------------


def pr_curves_png(
    predictions: Mapping[str, pd.DataFrame],
    reference: pd.DataFrame,
    gene_universe: Sequence[str],
    tf_list: Sequence[str] | None = None,
    *,
    reference_name: str = "",
    universe: str = "all_pairs",
    method_directed: Mapping[str, bool] | None = None,
) -> bytes:
    """PNG of every method's precision-recall curve against one reference, with the random baseline."""
    method_directed = dict(method_directed or {})
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    base_rates = set()
    for method, prediction in predictions.items():
        pairs = evaluation_pairs(
            prediction, reference, gene_universe, universe=universe, tf_list=tf_list,
            prediction_directed=method_directed.get(method),
        )
        if pairs.n_true == 0:
            continue
        ranking = pairs.ranking()
        precision, recall, _ = precision_recall_points(*ranking)
        base_rates.add(round(pairs.base_rate, 6))  # directed and undirected evaluations differ
        axes.plot(np.r_[0.0, recall], np.r_[1.0, precision], label=f"{method} (AP {average_precision(*ranking):.3f})")
    for base_rate in sorted(base_rates):
        axes.axhline(base_rate, color="grey", linestyle="--", label=f"random ({base_rate:.3f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title=f"PR curves vs {reference_name or 'reference'} ({universe})")
    axes.legend(fontsize="small")
    return figure_png(figure)


def epr_bar_chart_png(table: pd.DataFrame, reference_name: str, *, universe: str = "all_pairs") -> bytes:
    """PNG bar chart of each method's EPR against one reference (from :func:`benchmark_table`'s output);
    the dashed line at 1 is the random predictor."""
    rows = table[(table["reference"] == reference_name) & (table["universe"] == universe) & (table["metric"] == "epr")]
    figure, axes = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.5))
    axes.bar(rows["method"].astype(str), rows["value"], color="tab:blue")
    axes.axhline(1.0, color="grey", linestyle="--")
    axes.set(ylabel="early precision ratio", title=f"EPR vs {reference_name} ({universe})")
    axes.tick_params(axis="x", rotation=45)
    return figure_png(figure)
