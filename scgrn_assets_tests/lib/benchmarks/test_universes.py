"""Universes of gene pairs against a brute-force enumeration."""

from __future__ import annotations

import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scgrn_assets.lib.benchmarks import ranking, universes
from scgrn_assets_tests.support.benchmarks import brute_force_early_precision, brute_force_pairs, random_problem


@pytest.mark.parametrize("universe", universes.UNIVERSES)
@pytest.mark.parametrize(("prediction_directed", "reference_directed"), [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("use_tf_list", [False, True])
def test_universes_match_a_brute_force_enumeration(universe, prediction_directed, reference_directed, use_tf_list):
    reference, prediction, data_genes = random_problem(11, directed_reference=reference_directed)
    tf_list = ["g0", "g2", "g5", "elsewhere"] if use_tf_list else None
    pairs = universes.evaluation_pairs(prediction, reference, data_genes, universe=universe, tf_list=tf_list,
                                         prediction_directed=prediction_directed)
    directed = prediction_directed and reference_directed
    assert pairs.directed == directed
    labels, scores = brute_force_pairs(reference, prediction, data_genes, universe, directed, tf_list)
    if universe == "tf_rooted" and not reference_directed and not use_tf_list:
        # an undirected reference has no regulators, so without a TF list the universe is empty
        assert pairs.n_pairs == 0
        return
    assert pairs.n_pairs == len(labels)
    assert pairs.n_true == labels.sum()
    assert ranking.auroc(*pairs.ranking()) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ranking.average_precision(*pairs.ranking()) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)
    assert ranking.early_precision(*pairs.ranking()) == pytest.approx(brute_force_early_precision(labels, scores))
