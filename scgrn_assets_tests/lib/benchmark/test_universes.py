"""Universes of gene pairs against a brute-force enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scgrn_assets.lib.benchmark import ranking, universes
from scgrn_assets.lib.benchmark.reference_files import normalise_reference
from scgrn_assets_tests.lib.benchmark.test_ranking import brute_force_early_precision


def random_problem(seed: int, n_genes: int = 9, directed_reference: bool = True):
    generator = np.random.default_rng(seed)
    genes = [f"g{index}" for index in range(n_genes)]
    ordered = [(a, b) for a in genes for b in genes]
    chosen = generator.choice(len(ordered), size=25, replace=False)
    reference = normalise_reference(
        pd.DataFrame([ordered[index] for index in chosen], columns=["source", "target"]),
        name="ref", directed=directed_reference,
    )
    data_genes = genes[:-1] + ["not_in_reference"]  # one reference gene absent from the data
    listed = generator.choice(len(ordered), size=40, replace=False)
    prediction = pd.DataFrame([ordered[index] for index in listed], columns=["source", "target"])
    prediction["score"] = generator.integers(-3, 4, size=len(prediction)) / 3  # ties, zeros, negatives
    return reference, prediction, data_genes


def brute_force_pairs(reference, prediction, data_genes, universe, directed, tf_list):
    """Every pair of the universe enumerated, with its label and score."""
    reference = reference[reference["source"] != reference["target"]]
    genes = [gene for gene in data_genes if gene in set(reference["source"]) | set(reference["target"])]
    tfs = set(tf_list if tf_list is not None else reference["source"]) & set(genes)

    def key(a, b):
        return (a, b) if directed else tuple(sorted((a, b)))

    truth = {key(a, b) for a, b in zip(reference["source"], reference["target"]) if a in genes and b in genes}
    scores = {}
    for a, b, score in zip(prediction["source"], prediction["target"], prediction["score"]):
        if a in genes and b in genes and a != b:
            scores[key(a, b)] = max(scores.get(key(a, b), 0.0), abs(score))
    if directed:
        candidates = [(a, b) for a, b in itertools.permutations(genes, 2)]
        if universe == "tf_rooted":
            candidates = [(a, b) for a, b in candidates if a in tfs]
    else:
        candidates = [tuple(sorted(pair)) for pair in itertools.combinations(genes, 2)]
        if universe == "tf_rooted":
            candidates = [(a, b) for a, b in candidates if a in tfs or b in tfs]
    listed_keys = {key(a, b) for a, b in zip(prediction["source"], prediction["target"])
                   if a in genes and b in genes and a != b}
    if universe == "predicted":
        candidates = [pair for pair in candidates if pair in listed_keys]
    labels = np.array([pair in truth for pair in candidates])
    values = np.array([scores.get(pair, 0.0) for pair in candidates])
    return labels, values


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
