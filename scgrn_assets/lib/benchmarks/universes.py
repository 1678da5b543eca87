"""Universes of gene pairs for the GRN metrics: which pairs are ranked, with which labels and directions.

- **Direction.** A (method, reference) pair is evaluated directed only when both are directed.
  Otherwise both sides become unordered pairs: a pair {a, b} is true when the reference has
  a -> b or b -> a, and its score is the larger |score| the method gave either orientation.
- **Universes** (the data's genes G = reference genes present in the data): ``all_pairs`` (every
  pair of distinct genes of G), ``tf_rooted`` (pairs whose source is a TF of G; undirected: pairs
  with at least one TF), ``predicted`` (only the pairs the method listed, both genes in G).

Pairs not listed by a method are never materialised: they enter the ranking as two weighted
rows with score 0 (true and false), so universes of millions of pairs stay cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError

UNIVERSES = ("all_pairs", "tf_rooted", "predicted")


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
        Normalised reference (:mod:`scgrn_assets.lib.benchmarks.references`).
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
