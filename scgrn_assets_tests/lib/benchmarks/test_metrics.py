"""The benchmark table: a universe's ranking metrics, cutoff sweeps, the long table and its pictures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scgrn_assets.lib.benchmarks import metrics as grn_metrics
from scgrn_assets.lib.benchmarks import universes
from scgrn_assets.lib.benchmarks.reference_files import normalise_reference
from scgrn_assets_tests.support.benchmarks import brute_force_pairs, random_problem


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
