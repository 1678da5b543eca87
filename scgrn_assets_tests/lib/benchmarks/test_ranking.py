"""Ranking metrics against scikit-learn, a hand-made case and brute-force counts on seeded random scores with ties."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from scgrn_assets.lib.benchmarks import ranking
from scgrn_assets_tests.support.benchmarks import brute_force_early_precision


def tied_scores(seed: int, n_pairs: int = 300):
    generator = np.random.default_rng(seed)
    labels = generator.random(n_pairs) < 0.3
    scores = generator.integers(0, 6, size=n_pairs) / 5 + 0.3 * labels * generator.integers(0, 2, size=n_pairs)
    weights = generator.integers(1, 4, size=n_pairs).astype(float)
    return labels, np.round(scores, 6), weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties_and_weights(seed):
    labels, scores, weights = tied_scores(seed)
    assert ranking.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ranking.auroc(labels, scores, weights) == pytest.approx(
        roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn_with_ties_and_weights(seed):
    labels, scores, weights = tied_scores(seed)
    assert ranking.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)
    # integer weights are the same as repeated rows
    repeated = np.repeat(np.arange(len(labels)), weights.astype(int))
    assert ranking.average_precision(labels, scores, weights) == pytest.approx(
        average_precision_score(labels[repeated], scores[repeated]), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trapezoid_auprc_matches_sklearn_auc_of_pr_curve(seed):
    labels, scores, _ = tied_scores(seed)
    precision, recall, _ = precision_recall_curve(labels, scores)
    assert ranking.auprc_trapezoid(labels, scores) == pytest.approx(auc(recall, precision), abs=1e-12)


def test_ranking_metrics_by_hand_with_a_tie_and_a_weight():
    # Positives score 0.9 and 0.8, negatives 0.8 and 0.1: the tie at 0.8 counts half.
    labels = np.array([True, False, True, False])
    scores = np.array([0.9, 0.8, 0.8, 0.1])
    assert ranking.auroc(labels, scores) == pytest.approx(3.5 / 4)
    # Thresholds 0.9 (precision 1, recall 1/2), 0.8 (2/3, 1), 0.1 (1/2, 1).
    assert ranking.average_precision(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert ranking.auprc_trapezoid(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * (1 + 2 / 3) / 2)
    # The negative at 0.8 counted twice: 0.9 beats 3 negative units, 0.8 ties 2 and beats 1.
    assert ranking.auroc(labels, scores, np.array([1.0, 2.0, 1.0, 1.0])) == pytest.approx(5 / 6)
    assert np.isnan(ranking.auroc(labels[[0, 2]], scores[[0, 2]]))
    assert np.isnan(ranking.average_precision(labels[[1, 3]], scores[[1, 3]]))


def test_metrics_rank_by_absolute_score():
    labels = np.array([True, False, True, False])
    scores = np.array([-0.9, 0.1, 0.8, -0.2])
    assert ranking.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, np.abs(scores)))


@pytest.mark.parametrize("seed", range(5))
def test_early_precision_matches_a_brute_force_count_with_ties(seed):
    labels, scores, _ = tied_scores(seed, n_pairs=60)
    assert ranking.early_precision(labels, scores) == pytest.approx(brute_force_early_precision(labels, scores))
