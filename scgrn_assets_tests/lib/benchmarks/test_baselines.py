"""Baselines against numpy / scipy and on data whose regulator is known."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse
import scipy.stats

from scgrn_assets.lib.benchmarks.baselines import pearson_edges, random_edges, spearman_edges, tree_edges
from scgrn_assets.lib.errors import ScgrnInputError


@pytest.fixture
def expression_with_ties():
    generator = np.random.default_rng(7)
    counts = generator.poisson(1.5, size=(200, 8)).astype(float)  # many ties, as in scRNA-seq
    counts[:, 3] += 2 * counts[:, 0]  # one real dependency
    return counts, [f"gene{index}" for index in range(8)]


def pair_scores(predictions):
    return {(source, target): score for source, target, score in
            zip(predictions["source"], predictions["target"], predictions["correlation"])}


def test_pearson_matches_numpy_corrcoef_on_every_unordered_pair(expression_with_ties):
    counts, names = expression_with_ties
    predictions = pearson_edges(counts, names)
    expected = np.corrcoef(counts, rowvar=False)
    scores = pair_scores(predictions)
    assert len(predictions) == 8 * 7 // 2
    assert predictions.attrs["directed"] is False
    for first, second in itertools.combinations(range(8), 2):
        assert scores[(names[first], names[second])] == pytest.approx(expected[first, second], abs=1e-10)
    assert np.allclose(predictions["score"], np.abs(predictions["correlation"]))


def test_spearman_matches_scipy_with_ties_and_sparse_input(expression_with_ties):
    counts, names = expression_with_ties
    predictions = spearman_edges(scipy.sparse.csr_matrix(counts), names)
    expected = scipy.stats.spearmanr(counts).statistic
    scores = pair_scores(predictions)
    for first, second in itertools.combinations(range(8), 2):
        assert scores[(names[first], names[second])] == pytest.approx(expected[first, second], abs=1e-10)


def test_constant_gene_scores_zero_instead_of_nan(expression_with_ties):
    counts, names = expression_with_ties
    counts = counts.copy()
    counts[:, 5] = 3.0
    predictions = pearson_edges(counts, names)
    involving_constant = (predictions["source"] == "gene5") | (predictions["target"] == "gene5")
    assert np.isfinite(predictions["score"]).all()
    assert (predictions.loc[involving_constant, "score"] == 0).all()


def test_tree_baseline_ranks_the_true_regulator_first():
    generator = np.random.default_rng(3)
    n_cells = 600
    regulators = generator.normal(size=(n_cells, 4))
    target = np.tanh(2 * regulators[:, 1]) + 0.1 * generator.normal(size=n_cells)
    expression = np.column_stack([regulators, target, generator.normal(size=n_cells)])
    names = ["tf0", "tf1", "tf2", "tf3", "target", "noise"]
    progress_calls = []
    predictions = tree_edges(expression, names, n_trees=20, max_cells=400,
                             progress=lambda done, total: progress_calls.append((done, total)))
    assert predictions.attrs["directed"] is True
    assert len(predictions) == 6 * 5
    assert not (predictions["source"] == predictions["target"]).any()
    into_target = predictions[predictions["target"] == "target"].sort_values("score", ascending=False)
    assert into_target["source"].iloc[0] == "tf1"
    assert progress_calls[-1] == (6, 6)


def test_tree_baseline_only_uses_listed_tfs_as_regulators():
    generator = np.random.default_rng(4)
    expression = generator.normal(size=(100, 5))
    names = ["a", "b", "c", "d", "e"]
    predictions = tree_edges(expression, names, tf_list=["b", "d", "not_in_data"], n_trees=5)
    assert set(predictions["source"]) == {"b", "d"}
    assert len(predictions) == 2 * 4  # each TF regulates the 4 other genes


def test_tree_baseline_without_any_tf_in_data_says_so():
    with pytest.raises(ScgrnInputError, match="TF"):
        tree_edges(np.ones((10, 3)), ["a", "b", "c"], tf_list=["x"])


def test_random_baseline_is_seeded_and_tf_rooted():
    names = ["a", "b", "c", "d"]
    first = random_edges(names, seed=1)
    assert len(first) == 4 * 3
    assert first.equals(random_edges(names, seed=1))
    assert not first["score"].equals(random_edges(names, seed=2)["score"])
    rooted = random_edges(names, tf_list=["c"])
    assert set(rooted["source"]) == {"c"} and set(rooted["target"]) == {"a", "b", "d"}


def test_expression_shape_must_match_gene_names():
    with pytest.raises(ScgrnInputError, match="expected"):
        pearson_edges(np.zeros((5, 3)), ["a", "b"])


# --- within-study baselines, GRNBoost2, RegDiffusion, the gene-level null -------------------------------------

from scgrn_assets.lib.benchmarks.baselines import (gene_level_null_edges, grnboost2_edges, regdiffusion_edges,  # noqa: E402
                                        within_group_centred)


def study_shifted_expression(seed: int = 11):
    """Two studies whose genes 0 and 1 differ in level between studies but are independent within each."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(300, 5))
    study = np.repeat(["plate", "droplet"], 150)
    values[study == "plate", :2] += 3.0  # a study effect shared by genes 0 and 1: pooled, they correlate
    values[:, 4] += values[:, 2]  # a real dependency inside every study
    return values, [f"g{i}" for i in range(5)], study


def test_within_study_pearson_and_spearman_remove_a_shared_study_shift():
    values, names, study = study_shifted_expression()
    pooled = pair_scores(pearson_edges(values, names))
    within = pair_scores(pearson_edges(values, names, groups=study))
    centred = np.vstack([values[study == s] - values[study == s].mean(axis=0) for s in ("plate", "droplet")])
    order = np.r_[np.flatnonzero(study == "plate"), np.flatnonzero(study == "droplet")]
    assert np.allclose(within_group_centred(values, study)[order], centred)
    expected = np.corrcoef(centred.T)
    for (source, target), value in within.items():
        assert value == pytest.approx(expected[names.index(source), names.index(target)], abs=1e-12)
    assert abs(pooled[("g0", "g1")]) > 0.5 and abs(within[("g0", "g1")]) < 0.2
    spearman = pair_scores(spearman_edges(values, names, groups=study))
    assert abs(spearman[("g0", "g1")]) < 0.2 and spearman[("g2", "g4")] > 0.5
    # One group: exactly the plain Spearman.
    one = pair_scores(spearman_edges(values, names, groups=np.zeros(300)))
    for pair, value in pair_scores(spearman_edges(values, names)).items():
        assert one[pair] == pytest.approx(value, abs=1e-12)


def test_grnboost2_finds_the_regulator_and_equals_a_direct_sklearn_fit(expression_with_ties):
    from sklearn.ensemble import GradientBoostingRegressor

    counts, names = expression_with_ties
    predictions = grnboost2_edges(counts, names, max_estimators=300, seed=2)
    assert predictions.attrs["directed"] and len(predictions) == 8 * 7
    of_gene3 = predictions[predictions["target"] == "gene3"].sort_values("score", ascending=False)
    assert of_gene3["source"].iloc[0] == "gene0"
    # Independent computation for that target: the same booster fitted directly.
    standardised = (counts - counts.mean(axis=0)) / counts.std(axis=0)
    regulators = [i for i in range(8) if i != 3]
    booster = GradientBoostingRegressor(learning_rate=0.01, n_estimators=300, max_features=0.1, subsample=0.9,
                                        random_state=2 + 3)
    stopped = []

    def monitor(i, regressor, _):
        stop = i >= 25 and np.mean(regressor.oob_improvement_[i - 24: i + 1]) < 0
        stopped.append(stop)
        return stop

    booster.fit(standardised[:, regulators], standardised[:, 3], monitor=monitor)
    expected = dict(zip(np.asarray(names)[regulators], booster.feature_importances_ * len(booster.estimators_)))
    for source, score in zip(of_gene3["source"], of_gene3["score"]):
        assert score == pytest.approx(expected[source], rel=1e-9)


def test_regdiffusion_scores_every_ordered_pair_reproducibly(expression_with_ties):
    counts, names = expression_with_ties
    first = regdiffusion_edges(np.log1p(counts), names, n_steps=3, max_cells=150, seed=1)
    second = regdiffusion_edges(np.log1p(counts), names, n_steps=3, max_cells=150, seed=1)
    assert first.attrs["directed"] and len(first) == 8 * 7
    assert (first["source"] != first["target"]).all() and np.isfinite(first["score"]).all()
    assert first["score"].to_numpy() == pytest.approx(second["score"].to_numpy())


def test_gene_level_null_is_the_product_of_the_two_standard_deviations(expression_with_ties):
    counts, names = expression_with_ties
    null = gene_level_null_edges(counts, names)
    sd = counts.std(axis=0)
    assert len(null) == 28 and not null.attrs["directed"]
    for source, target, score in zip(null["source"], null["target"], null["score"]):
        assert score == pytest.approx(sd[names.index(source)] * sd[names.index(target)])
