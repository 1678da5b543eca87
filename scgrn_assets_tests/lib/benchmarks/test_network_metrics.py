"""Degree correlation, the two enrichment nulls and top-K enrichment against scipy and brute-force counts."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from scgrn_assets.lib.benchmarks import metrics as grn_metrics
from scgrn_assets.lib.benchmarks import network_metrics, ranking, universes
from scgrn_assets.lib.benchmarks.reference_files import normalise_reference
from scgrn_assets_tests.support.benchmarks import random_problem


def test_degree_correlation_matches_scipy_on_brute_force_degrees():
    reference, prediction, data_genes = random_problem(5)
    pairs = universes.evaluation_pairs(prediction, reference, data_genes)
    labels, scores, weights = pairs.ranking()
    selected = ranking.early_selection(labels, scores, weights)[: len(pairs.scores)]
    genes = list(pairs.genes)
    predicted_degree = dict.fromkeys(genes, 0)
    true_degree = dict.fromkeys(genes, 0)
    for source, target in zip(pairs.source_index[selected], pairs.target_index[selected]):
        predicted_degree[genes[source]] += 1
        predicted_degree[genes[target]] += 1
    filtered = reference[(reference["source"] != reference["target"])
                         & reference["source"].isin(genes) & reference["target"].isin(genes)]
    for source, target in zip(filtered["source"], filtered["target"]):
        true_degree[source] += 1
        true_degree[target] += 1
    expected = scipy.stats.spearmanr([predicted_degree[g] for g in genes], [true_degree[g] for g in genes]).statistic
    assert network_metrics.degree_correlation(pairs) == pytest.approx(expected)


@pytest.mark.parametrize("directed", [True, False])
def test_rewiring_preserves_every_in_and_out_degree(directed):
    generator = np.random.default_rng(2)
    n_genes = 30
    all_pairs = [(a, b) for a in range(n_genes) for b in range(n_genes) if a != b and (directed or a < b)]
    chosen = generator.choice(len(all_pairs), size=120, replace=False)
    sources = np.array([all_pairs[index][0] for index in chosen])
    targets = np.array([all_pairs[index][1] for index in chosen])
    new_sources, new_targets = network_metrics.rewire_network(sources, targets, n_genes=n_genes, directed=directed, seed=3)
    assert np.array_equal(np.bincount(new_sources, minlength=n_genes), np.bincount(sources, minlength=n_genes))
    assert np.array_equal(np.bincount(new_targets, minlength=n_genes), np.bincount(targets, minlength=n_genes))
    assert not (new_sources == new_targets).any()
    keys = {(a, b) if directed else tuple(sorted((a, b))) for a, b in zip(new_sources, new_targets)}
    assert len(keys) == len(sources)  # no duplicate pair was created
    original = {(a, b) if directed else tuple(sorted((a, b))) for a, b in zip(sources, targets)}
    assert len(keys & original) < 0.5 * len(original)  # the network really was rewired


def test_in_degree_null_draws_without_replacement_proportional_to_in_degree():
    # one source g0 with 2 predicted targets; reference in-degrees g1:3, g2:1, g3:2, g6:1 (g0, g4, g5 have none)
    reference = normalise_reference(pd.DataFrame({
        "source": ["g0", "g5", "g6", "g5", "g6", "g5", "g4"],
        "target": ["g1", "g1", "g1", "g2", "g3", "g3", "g6"],
    }), name="toy", directed=True)
    prediction = pd.DataFrame({"source": ["g0", "g0"], "target": ["g2", "g4"], "score": [1.0, 0.5]})
    genes = ["g0", "g1", "g2", "g3", "g4", "g5", "g6"]
    pairs = universes.evaluation_pairs(prediction, reference, genes)
    n_null = 20000
    sources, hits = network_metrics.in_degree_null_hits(pairs, network_metrics.top_k_network(pairs, 2), n_null=n_null, seed=1)
    assert list(pairs.genes[sources]) == ["g0"]
    # exact expectation of successive weighted sampling without replacement; g0's only true target is g1
    weights = {"g1": 3, "g2": 1, "g3": 2, "g6": 1}
    total = sum(weights.values())
    expected_hits = 0.0
    for first, second in itertools.permutations(weights, 2):
        probability = weights[first] / total * weights[second] / (total - weights[first])
        expected_hits += probability * ((first == "g1") + (second == "g1"))
    standard_error = hits.std() / np.sqrt(n_null)
    assert abs(hits.mean() - expected_hits) < 4 * standard_error
    assert hits.max() <= 1  # without replacement g1 is never drawn twice


def test_empirical_p_value_formula():
    assert network_metrics.empirical_p_value(3, np.array([1, 3, 5, 2])) == pytest.approx((1 + 2) / (1 + 4))
    assert network_metrics.empirical_p_value(10, np.zeros(99)) == pytest.approx(1 / 100)


def test_top_k_enrichment_counts_match_a_brute_force_count():
    reference, prediction, data_genes = random_problem(8)
    pairs = universes.evaluation_pairs(prediction, reference, data_genes)
    global_metrics, per_source = network_metrics.top_k_enrichment(pairs, top_k=6, n_null=50)
    positive = prediction[prediction["score"] != 0].copy()
    positive = positive[positive["source"].isin(pairs.genes) & positive["target"].isin(pairs.genes)
                        & (positive["source"] != positive["target"])]
    positive["magnitude"] = positive["score"].abs()
    top = positive.sort_values("magnitude", ascending=False, kind="mergesort")
    assert global_metrics["top_k"] == min(6, len(top))
    kth = top["magnitude"].iloc[int(global_metrics["top_k"]) - 1]
    truth = set(zip(reference["source"], reference["target"]))
    # hits are bounded by the tie at the K-th score, whichever tied pairs were taken
    certain = top[top["magnitude"] > kth]
    tied = top[top["magnitude"] == kth]
    certain_hits = sum(pair in truth for pair in zip(certain["source"], certain["target"]))
    tied_hits = sum(pair in truth for pair in zip(tied["source"], tied["target"]))
    assert certain_hits <= global_metrics["top_k_hits"] <= certain_hits + tied_hits
    assert global_metrics["top_k_precision"] == pytest.approx(global_metrics["top_k_hits"] / global_metrics["top_k"])
    assert global_metrics["top_k_enrichment"] == pytest.approx(global_metrics["top_k_precision"] / pairs.base_rate)
    assert per_source["n_predicted"].sum() == global_metrics["top_k"]
    assert per_source["hits"].sum() == global_metrics["top_k_hits"]
    assert 1 / 51 <= global_metrics["top_k_p_in_degree"] <= 1 and 1 / 51 <= global_metrics["top_k_p_rewired"] <= 1


def test_a_perfect_predictor_beats_both_nulls():
    generator = np.random.default_rng(0)
    genes = [f"g{index}" for index in range(40)]
    ordered = [(a, b) for a in genes[:8] for b in genes if a != b]
    chosen = generator.choice(len(ordered), size=40, replace=False)
    reference = normalise_reference(pd.DataFrame([ordered[index] for index in chosen], columns=["source", "target"]),
                                    name="truth", directed=True)
    prediction = reference[["source", "target"]].assign(score=1.0)
    table = grn_metrics.benchmark_table({"oracle": prediction}, {"truth": reference}, genes, n_null=200,
                                        universes=["tf_rooted"])
    value = table.set_index("metric")["value"]
    assert value["early_precision"] == 1.0 and value["auroc"] == 1.0
    assert value["top_k_p_in_degree"] == pytest.approx(1 / 201)
    assert value["top_k_p_rewired"] == pytest.approx(1 / 201)
