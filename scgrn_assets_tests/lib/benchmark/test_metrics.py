"""GRN metrics against scikit-learn, scipy and brute-force counts on seeded random scores with ties."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from scgrn_assets.lib.benchmark import metrics as grn_metrics
from scgrn_assets.lib.benchmark import network_metrics, ranking, universes
from scgrn_assets.lib.benchmark.reference_files import normalise_reference


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


def brute_force_early_precision(labels, scores):
    """BEELINE's rule written out: k = #true, keep pairs scoring >= the k-th best score and > 0."""
    k = int(labels.sum())
    ranked = sorted(scores, reverse=True)
    kth_score = ranked[min(k, len(ranked)) - 1]
    selected = [index for index, score in enumerate(scores) if score >= kth_score and score > 0]
    if not selected:
        return 0.0
    return sum(labels[index] for index in selected) / len(selected)


@pytest.mark.parametrize("seed", range(5))
def test_early_precision_matches_a_brute_force_count_with_ties(seed):
    labels, scores, _ = tied_scores(seed, n_pairs=60)
    assert ranking.early_precision(labels, scores) == pytest.approx(brute_force_early_precision(labels, scores))


def test_epr_on_a_hand_made_case_with_ties_at_the_kth_score():
    # 4 genes, directed: 12 ordered pairs; 3 true edges, so k = 3 and the random precision is 3 / 12
    reference = normalise_reference(
        pd.DataFrame({"source": ["A", "A", "B", "C"], "target": ["B", "C", "D", "C"]}), name="toy", directed=True)
    prediction = pd.DataFrame({
        "source": ["A", "B", "B", "C", "D", "A", "C"],
        "target": ["B", "A", "D", "A", "A", "C", "C"],
        # third-best score 0.5 is shared by B->D (true), C->A and D->A: all three are kept
        "score": [0.9, 0.8, 0.5, 0.5, -0.5, 0.0, 5.0],  # A->C (true) scores 0: never counted; C->C is a self-loop
    })
    pairs = universes.evaluation_pairs(prediction, reference, ["A", "B", "C", "D"])
    assert pairs.n_pairs == 12 and pairs.n_true == 3
    metrics = grn_metrics.ranking_metrics(pairs)
    assert metrics["early_precision"] == pytest.approx(2 / 5)
    assert metrics["epr"] == pytest.approx((2 / 5) / (3 / 12))
    # with fewer non-zero scores than true edges, every non-zero pair is the prediction
    sparse = prediction.iloc[:2]
    assert grn_metrics.ranking_metrics(
        universes.evaluation_pairs(sparse, reference, ["A", "B", "C", "D"]))["early_precision"] == pytest.approx(1 / 2)


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


def test_cutoff_sweep_matches_a_brute_force_threshold():
    reference, prediction, data_genes = random_problem(4)
    pairs = universes.evaluation_pairs(prediction, reference, data_genes)
    labels, scores = brute_force_pairs(reference, prediction, data_genes, "all_pairs", True, None)
    sweep = grn_metrics.cutoff_sweep(pairs, [0.3, 0.7])
    for row in sweep.itertuples():
        kept = scores >= row.cutoff
        assert row.n_predicted == (kept & (scores > 0)).sum()
        assert row.precision == pytest.approx(labels[kept].mean())
        assert row.recall == pytest.approx(labels[kept].sum() / labels.sum())
        assert row.auroc == pytest.approx(roc_auc_score(labels, np.where(kept, scores, 0.0)))


def test_benchmark_table_shape_directedness_and_values():
    reference, prediction, data_genes = random_problem(9)
    undirected = prediction.copy()
    undirected.attrs["directed"] = False
    table = grn_metrics.benchmark_table(
        {"ours": prediction, "coexpression": undirected}, {"ref": reference}, data_genes,
        n_null=20, sweep_cutoffs={"ours": [0.5]},
    )
    assert list(table.columns) == grn_metrics.METRIC_COLUMNS
    value = table.set_index(["method", "universe", "metric"])["value"]
    assert value[("ours", "all_pairs", "directed")] == 1
    assert value[("coexpression", "all_pairs", "directed")] == 0
    assert ("ours", "all_pairs", "tfs_tested") in value.index
    assert ("coexpression", "all_pairs", "tfs_tested") not in value.index
    labels, scores = brute_force_pairs(reference, prediction, data_genes, "all_pairs", True, None)
    assert value[("ours", "all_pairs", "auroc")] == pytest.approx(roc_auc_score(labels, scores))
    assert value[("ours", "all_pairs", "auprc_ratio")] == pytest.approx(
        average_precision_score(labels, scores) / labels.mean())
    sweep_rows = table[table["metric"].str.startswith("sweep_")]
    assert set(sweep_rows["method"]) == {"ours"} and (sweep_rows["cutoff"] == 0.5).all()
    top_k_rows = table[table["metric"].str.startswith("top_k_")]
    assert top_k_rows["cutoff"].notna().all()
    assert table.loc[table["metric"] == "auroc", "cutoff"].isna().all()


def test_pr_curves_and_epr_chart_are_png():
    reference, prediction, data_genes = random_problem(6)
    table = grn_metrics.benchmark_table({"ours": prediction}, {"ref": reference}, data_genes, n_null=0)
    for picture in (
        grn_metrics.pr_curves_png({"ours": prediction}, reference, data_genes, reference_name="ref"),
        grn_metrics.epr_bar_chart_png(table, "ref"),
    ):
        assert picture[:8] == b"\x89PNG\r\n\x1a\n"
