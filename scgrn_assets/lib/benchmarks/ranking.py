"""Ranking metrics on (labels, scores, weights): AUROC, both AUPRCs, early precision.

Scores are ranked by absolute value; a weight counts a row as that many pairs (the universes enter
unlisted pairs as two weighted score-0 rows). AUROC, average precision and the trapezoid AUPRC are
scikit-learn's; early precision is BEELINE's rule, written here.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from scgrn_assets.lib.errors import ScgrnInputError


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


def _both_classes(labels: np.ndarray, weights: np.ndarray) -> bool:
    """Whether some weight is on a true pair and some on a false one (else the curves are undefined)."""
    return len(labels) > 0 and weights[labels].sum() > 0 and weights[~labels].sum() > 0


def auroc(labels, scores, weights=None) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``; ties give the average).

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
    if not _both_classes(labels, weights):
        return float("nan")
    return float(roc_auc_score(labels, scores, sample_weight=weights))


def precision_recall_points(labels, scores, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at each distinct threshold, highest threshold first
    (``sklearn.metrics.precision_recall_curve`` without its closing (recall 0, precision 1) point).

    Returns
    -------
    precision, recall, thresholds
        Arrays of shape (n_thresholds,); precision at threshold t counts pairs with |score| >= t;
        recall is NaN when no pair is true.
    """
    labels, scores, weights = _as_ranking(labels, scores, weights)
    if len(scores) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    if weights[labels].sum() == 0:  # scikit-learn would set recall to 1; without true pairs it is undefined
        thresholds = np.unique(scores)[::-1]
        return np.zeros(len(thresholds)), np.full(len(thresholds), np.nan), thresholds
    precision, recall, thresholds = precision_recall_curve(labels, scores, sample_weight=weights,
                                                           drop_intermediate=False)
    return precision[-2::-1], recall[-2::-1], thresholds[::-1]


def average_precision(labels, scores, weights=None) -> float:
    """AUPRC as average precision: sum over thresholds of (recall step) x precision
    (``sklearn.metrics.average_precision_score``). NaN when no pair is true."""
    labels, scores, weights = _as_ranking(labels, scores, weights)
    if len(scores) == 0 or weights[labels].sum() == 0:
        return float("nan")
    return float(average_precision_score(labels, scores, sample_weight=weights))


def auprc_trapezoid(labels, scores, weights=None) -> float:
    """AUPRC as the trapezoid under the PR curve, starting at (recall 0, precision 1)
    (``sklearn.metrics.auc(recall, precision)`` on ``precision_recall_curve``). NaN when no pair is true."""
    labels, scores, weights = _as_ranking(labels, scores, weights)
    if len(scores) == 0 or weights[labels].sum() == 0:
        return float("nan")
    precision, recall, _ = precision_recall_curve(labels, scores, sample_weight=weights, drop_intermediate=False)
    return float(auc(recall, precision))


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
