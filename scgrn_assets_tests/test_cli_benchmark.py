"""`scgrn benchmark`: the GRN path on an expression file plus a truth file, and its bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scgrn_assets.cli import main
from scgrn_assets.lib.benchmarks.metrics import ranking_metrics
from scgrn_assets.lib.benchmarks.universes import evaluation_pairs
from scgrn_assets.lib.benchmarks.pipeline import METHOD_LABELS
from scgrn_assets.lib.benchmarks.references import load_ground_truth
from scgrn_assets_tests.conftest import shared_data


def predictions_from_long(table: pd.DataFrame, directed: dict[str, bool]) -> dict[str, pd.DataFrame]:
    """``predictions.parquet`` read back per method; ``directed`` (``run.json``'s ``methods``) gives the
    order and the methods that listed no pair."""
    predictions = {}
    for method, is_directed in directed.items():
        prediction = table.loc[table["method"] == method, ["source", "target", "score"]].reset_index(drop=True)
        prediction.attrs["directed"] = bool(is_directed)
        predictions[method] = prediction
    return predictions


TRUTH = [("G0", "G1", "+"), ("G0", "G2", "+"), ("G1", "G3", "-"), ("G2", "G4", "+"), ("G5", "G6", "+"),
         ("G5", "G7", "-"), ("G6", "G8", "+")]
QUICK = ["--train-steps", "10", "--n-permutations", "20", "--n-null", "10", "--min-cells-per-edge", "5",
         "--grnboost2-max-estimators", "100", "--regdiffusion-steps", "5"]
RANKING_METRICS = ("auroc", "auprc_ap", "auprc_trapezoid", "auprc_ratio", "auprc_trapezoid_ratio",
                   "early_precision", "epr", "degree_correlation")


def _simulated_expression(n_genes: int = 10, n_cells: int = 300, seed: int = 3) -> pd.DataFrame:
    """Genes x cells, positive continuous values driven by the TRUTH network (a linear cascade, softplus)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_genes, n_cells))
    index = {f"G{i}": i for i in range(n_genes)}
    for source, target, sign in TRUTH:  # TRUTH lists parents before their children
        latent[index[target]] += (1.5 if sign == "+" else -1.5) * latent[index[source]]
    values = np.log1p(np.exp(latent))
    return pd.DataFrame(values, index=[f"G{i}" for i in range(n_genes)],
                        columns=[f"cell_{c}" for c in range(n_cells)])


@pytest.fixture
def small_benchmark_files(tmp_path):
    expression = tmp_path / "ExpressionData.csv"
    _simulated_expression().to_csv(expression)
    truth = tmp_path / "refNetwork.csv"
    pd.DataFrame(TRUTH, columns=["Gene1", "Gene2", "Type"]).to_csv(truth, index=False)
    return expression, truth


def test_benchmark_writes_every_method_and_metric_matching_a_direct_computation(small_benchmark_files, tmp_path,
                                                                                capsys):
    expression, truth = small_benchmark_files
    out = tmp_path / "out"
    database = tmp_path / "bench.duckdb"
    assert main(["benchmark", "--expression", str(expression), "--truth", str(truth), "--values", "normalized",
                 "--out", str(out), "--name", "toy", "--duckdb", str(database), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "genes-x-cells (auto: 9 of 10 distinct row labels" in printed
    for label in METHOD_LABELS.values():
        assert label in printed

    metrics = pd.read_parquet(out / "benchmark_metrics.parquet")
    assert (metrics["dataset"] == "toy").all()
    all_pairs = metrics[metrics["universe"] == "all_pairs"]
    assert set(all_pairs["method"]) == set(METHOD_LABELS)
    present = set(zip(all_pairs["method"], all_pairs["metric"]))
    assert {(m, k) for m in METHOD_LABELS for k in RANKING_METRICS} <= present
    summary = pd.read_csv(out / "benchmark_summary.csv")
    assert set(summary["method"]) == set(METHOD_LABELS)
    assert {"epr", "auprc_ratio", "auroc", "epr_tf_rooted"} <= set(summary.columns)
    assert "attention stability" in (out / "benchmark_summary.md").read_text()
    assert pd.read_csv(out / "benchmark_metrics.csv").shape == metrics.shape

    # Recompute every ranking metric from the written predictions, directly with grn_metrics.
    run = json.loads((out / "run.json").read_text())
    genes = run["genes_benchmarked"]
    assert run["values"] == "normalized" and run["settings"]["train_steps"] == 10
    reference = load_ground_truth(truth)
    predictions = predictions_from_long(pd.read_parquet(out / "predictions.parquet"), run["methods"])
    assert set(predictions) == set(METHOD_LABELS)
    for method, prediction in predictions.items():
        for universe in ("all_pairs", "tf_rooted"):
            expected = ranking_metrics(evaluation_pairs(prediction, reference, genes, universe=universe))
            written = metrics[(metrics["method"] == method) & (metrics["universe"] == universe)]
            written = written.set_index("metric")["value"]
            for metric, value in expected.items():
                assert written[metric] == pytest.approx(value, nan_ok=True), (method, universe, metric)

    # Pearson against scikit-learn on every unordered pair, from the expression file itself.
    genes = [gene for gene in genes if gene in set(reference["source"]) | set(reference["target"])]
    values = pd.read_csv(expression, index_col=0).loc[genes]
    correlation = np.corrcoef(np.log1p(values.to_numpy()))
    true_pairs = {frozenset((s, t)) for s, t, _ in TRUTH}
    upper = np.triu_indices(len(genes), k=1)
    labels = np.array([frozenset((genes[i], genes[j])) in true_pairs for i, j in zip(*upper)])
    scores = np.abs(correlation[upper])
    pearson = all_pairs[all_pairs["method"] == "pearson"].set_index("metric")["value"]
    assert pearson["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert pearson["auprc_ap"] == pytest.approx(average_precision_score(labels, scores))
    k = labels.sum()
    chosen = scores >= np.sort(scores)[::-1][k - 1]
    assert pearson["epr"] == pytest.approx(labels[chosen].mean() / (k / len(labels)))

    from scgrn_assets.lib.sql_store import query

    viewed = query(database, "SELECT count(*) AS n FROM grn_benchmark WHERE method = ?", ["pearson"])
    assert int(viewed["n"].iloc[0]) == int((metrics["method"] == "pearson").sum())


@pytest.mark.slow
def test_benchmark_is_reproducible_for_a_seed(small_benchmark_files, tmp_path):
    expression, truth = small_benchmark_files
    tables = []
    for run in ("a", "b"):
        assert main(["benchmark", "--expression", str(expression), "--truth", str(truth), "--values", "normalized",
                     "--out", str(tmp_path / run), *QUICK]) == 0
        tables.append(pd.read_parquet(tmp_path / run / "benchmark_metrics.parquet"))
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_the_cli_path_has_the_assets_settings():
    from scgrn_assets.lib.benchmarks.pipeline import GrnPathSettings
    from scgrn_assets.resources import BenchmarkSettings, GeneformerSettings, ValidationSettings

    settings, geneformer = GrnPathSettings(), GeneformerSettings()
    validation, benchmark = ValidationSettings(), BenchmarkSettings()
    for name in ("convention", "train_steps", "train_batch_size", "max_genes_per_cell", "pcorr_method",
                 "attention_batch_size", "min_cells_per_edge", "device", "min_loss_margin", "attention_layers",
                 "attention_heads"):
        assert getattr(settings, name) == getattr(geneformer, name), name
    for name in ("n_bins", "n_permutations", "alpha", "min_cmi_ratio", "miller_madow"):
        assert getattr(settings, name) == getattr(validation, name), name
    assert (settings.mi_top_k, settings.validation_seed) == (validation.top_k, validation.seed)
    for name in ("tree_max_cells", "tree_n_trees", "tree_max_features", "tf_list", "n_null", "top_k",
                 "grnboost2_max_cells", "grnboost2_max_estimators", "regdiffusion_n_steps", "regdiffusion_max_cells"):
        assert getattr(settings, name) == getattr(benchmark, name), name
    assert settings.network_features == tuple(geneformer.network_features)
    assert settings.max_universe_genes == geneformer.max_universe_genes
    assert settings.mi_candidates == tuple(validation.candidates)
    assert settings.benchmark_seed == benchmark.seed


def _error_of(capsys, *args: str) -> str:
    assert main(["benchmark", *args, *QUICK]) == 2
    return capsys.readouterr().err


def test_benchmark_bad_inputs_name_the_file_and_the_fix(small_benchmark_files, tmp_path, capsys):
    expression, truth = small_benchmark_files
    common = ["--out", str(tmp_path / "out")]

    error = _error_of(capsys, "--expression", str(tmp_path / "absent.csv"), "--truth", str(truth),
                      "--values", "normalized", *common)
    assert "absent.csv: expression file not found" in error
    error = _error_of(capsys, "--expression", str(expression), "--truth", str(tmp_path / "absent_truth.csv"),
                      "--values", "normalized", *common)
    assert "absent_truth.csv" in error and "not found" in error

    # Truth genes the matrix does not have.
    foreign = tmp_path / "foreign.csv"
    pd.DataFrame([("G0", "G1"), ("G0", "GX"), ("G1", "GY")], columns=["Gene1", "Gene2"]).to_csv(foreign, index=False)
    error = _error_of(capsys, "--expression", str(expression), "--truth", str(foreign), "--values", "normalized",
                      *common)
    assert "2 of the truth's 4 genes are not genes of the expression matrix (e.g. GX, GY)" in error
    assert "--allow-missing-genes" in error

    # The wrong orientation: cell labels read as genes.
    error = _error_of(capsys, "--expression", str(expression), "--truth", str(truth), "--values", "normalized",
                      "--orientation", "cells-x-genes", *common)
    assert "9 of the truth's 9 genes are not genes of the expression matrix" in error
    assert "9 of 10 distinct row labels and 0 of 300 distinct column labels are truth genes" in error
    assert "check --orientation" in error

    # Continuous values declared as counts are refused rather than library-size normalised.
    error = _error_of(capsys, "--expression", str(expression), "--truth", str(truth), "--values", "counts", *common)
    assert "non-integer values" in error and "--values normalized" in error

    # Negative values: refused unless clipped on purpose.
    negative = tmp_path / "negative.csv"
    frame = _simulated_expression()
    frame.iloc[0, 0] = -0.01
    frame.to_csv(negative)
    error = _error_of(capsys, "--expression", str(negative), "--truth", str(truth), "--values", "normalized",
                      *common)
    assert "1 negative values" in error and "--clip-negative" in error

    # Orientation cannot be decided: truth genes on both axes equally.
    square = tmp_path / "square.csv"
    pd.DataFrame(np.ones((2, 2)), index=["G0", "G1"], columns=["G0", "G1"]).to_csv(square)
    error = _error_of(capsys, "--expression", str(square), "--truth", str(truth), "--values", "normalized",
                      *common)
    assert "cannot tell genes from cells" in error and "--orientation" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_benchmark_on_beeline_gsd(tmp_path, capsys):
    folder = shared_data("reference", "beeline_example_gsd")
    out = tmp_path / "gsd"
    assert main(["benchmark", "--expression", str(folder / "ex1" / "ExpressionData.csv"),
                 "--truth", str(folder / "GroundTruthNetwork.csv"), "--values", "normalized", "--out", str(out),
                 "--name", "GSD", "--train-steps", "50", "--n-permutations", "100", "--n-null", "20"]) == 0
    assert "2000 cells x 19 genes, read as genes-x-cells" in capsys.readouterr().out
    metrics = pd.read_parquet(out / "benchmark_metrics.parquet").set_index(["method", "universe", "metric"])["value"]
    # SOURCE.md: 76 unique non-self directed edges among 19 genes; random precision 76 / (19 * 18) = 0.222.
    assert metrics["tree", "all_pairs", "n_true"] == 76
    assert metrics["tree", "all_pairs", "base_rate"] == pytest.approx(76 / (19 * 18))
    assert metrics["tree", "all_pairs", "directed"] == 1
    assert metrics["pearson", "all_pairs", "directed"] == 0
    for method in METHOD_LABELS:
        assert 0.0 <= metrics[method, "all_pairs", "auroc"] <= 1.0
    # The tree baseline regresses on the expression the truth was simulated from: better than random.
    assert metrics["tree", "all_pairs", "auroc"] > 0.55


def _tree_predictions(out) -> pd.DataFrame:
    run = json.loads((out / "run.json").read_text())
    table = predictions_from_long(pd.read_parquet(out / "predictions.parquet"), run["methods"])["tree"]
    return table.sort_values(["source", "target"]).reset_index(drop=True)


def test_tree_baseline_never_sees_the_truth_and_takes_an_explicit_tf_list(small_benchmark_files, tmp_path):
    expression, truth = small_benchmark_files
    common = ["--expression", str(expression), "--values", "normalized", *QUICK]
    assert main(["benchmark", *common, "--truth", str(truth), "--out", str(tmp_path / "a")]) == 0
    # Another truth on the same genes, with other regulators.
    other_truth = tmp_path / "other.csv"
    pd.DataFrame([("G9", "G3", "+"), ("G8", "G0", "-"), ("G4", "G7", "+"), ("G4", "G1", "+")],
                 columns=["Gene1", "Gene2", "Type"]).to_csv(other_truth, index=False)
    assert main(["benchmark", *common, "--truth", str(other_truth), "--out", str(tmp_path / "b")]) == 0

    first, second = _tree_predictions(tmp_path / "a"), _tree_predictions(tmp_path / "b")
    # The baseline is a function of the expression alone: the truth file changes nothing it predicts.
    pd.testing.assert_frame_equal(first, second)
    # Every gene is a candidate regulator, so in all_pairs it ranks every ordered pair, as the others do,
    # including pairs rooted at genes that regulate nothing in the truth.
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    genes = run["genes_benchmarked"]
    assert run["tree_regulators"] == "all genes" and run["tf_list"] is None
    assert len(first) == len(genes) * (len(genes) - 1)
    assert set(first["source"]) == set(genes)
    truth_regulators = {source for source, _, _ in TRUTH}
    assert set(first["source"]) - truth_regulators  # e.g. G3, G4: not regulators of the truth
    assert run["settings"]["tree_max_features"] == "sqrt"

    # An explicit TF list (BEELINE's TF,Sources format) restricts the sources, and is recorded.
    tf_file = tmp_path / "toy-tfs.csv"
    tf_file.write_text("TF,Sources\nG3,x\nG7,x\nNOT_A_GENE,x\n")
    assert main(["benchmark", *common, "--truth", str(truth), "--out", str(tmp_path / "c"),
                 "--tf-list", str(tf_file)]) == 0
    listed = _tree_predictions(tmp_path / "c")
    listed_run = json.loads((tmp_path / "c" / "run.json").read_text())
    present = [gene for gene in ("G3", "G7") if gene in genes]
    assert present and set(listed["source"]) == set(present)
    assert len(listed) == len(present) * (len(genes) - 1)
    assert listed_run["tf_list"] == str(tf_file) and listed_run["settings"]["tf_list"] == str(tf_file)
    assert listed_run["tree_regulators"]["genes"] == present
    assert str(tf_file) in listed_run["sha256"]
    # The other methods are untouched by the TF list.
    for out in ("a", "c"):
        assert (tmp_path / out / "predictions.parquet").exists()
    pearson = [pd.read_parquet(tmp_path / out / "predictions.parquet").query("method == 'pearson'")
               .reset_index(drop=True) for out in ("a", "c")]
    pd.testing.assert_frame_equal(*pearson)


def test_a_tf_list_without_any_gene_of_the_matrix_is_refused_before_training(small_benchmark_files, tmp_path,
                                                                               capsys):
    expression, truth = small_benchmark_files
    tf_file = tmp_path / "human-tfs.csv"
    tf_file.write_text("TF,Sources\nSOX2,x\nPOU5F1,x\n")
    error = _error_of(capsys, "--expression", str(expression), "--truth", str(truth), "--values", "normalized",
                      "--out", str(tmp_path / "out"), "--tf-list", str(tf_file))
    assert "none of the 2 TFs in the TF list" in error and "human-tfs.csv" in error
    assert not (tmp_path / "out").exists()


def test_the_baseline_asset_does_not_read_the_references():
    import dagster as dg

    from scgrn_assets.defs.benchmarks.assets import baseline_edges, benchmark_metrics

    assert dg.AssetKey("reference_networks") not in baseline_edges.dependency_keys
    assert dg.AssetKey("reference_networks") in benchmark_metrics.dependency_keys


def test_tree_regulators_come_from_a_tf_list_file_never_from_a_reference():
    import inspect

    from scgrn_assets.lib.errors import ScgrnInputError
    from scgrn_assets.lib.benchmarks.pipeline import tree_regulators

    assert "reference" not in inspect.signature(tree_regulators).parameters
    genes = ["Sox2", "Pou5f1", "Actb", "Gapdh", "Nanog"]
    assert tree_regulators(None, genes) is None
    mouse = shared_data("reference", "beeline_networks", "mouse-tfs.csv")
    chosen = tree_regulators(mouse, genes)
    assert chosen == ["Sox2", "Pou5f1", "Nanog"]  # the list says SOX2: symbol case is ignored
    with pytest.raises(ScgrnInputError, match="none of the"):
        tree_regulators(mouse, ["NOT_A_GENE"])


# --- one method must not take the others down (issue #24) --------------------------------------------------------


def test_a_matrix_with_cells_that_express_no_gene_is_benchmarked_with_every_method(tmp_path, capsys):
    # Before: RegDiffusion scored every pair NaN and the run stopped with "prediction scores contain NaN or
    # infinite values", losing every other method's result.
    from scgrn_assets_tests.support.benchmarks import expression_with_empty_cells

    values, genes, empty = expression_with_empty_cells()  # 2,000 cells x 8 genes, 19 of them empty
    expression = tmp_path / "ExpressionData.csv"
    pd.DataFrame(values.T, index=genes, columns=[f"cell_{c}" for c in range(len(values))]).to_csv(expression)
    truth = tmp_path / "refNetwork.csv"
    pd.DataFrame({"Gene1": genes[:-1], "Gene2": genes[1:]}).to_csv(truth, index=False)
    out = tmp_path / "out"
    assert main(["benchmark", "--expression", str(expression), "--truth", str(truth), "--values", "normalized",
                 "--out", str(out), *QUICK]) == 0
    metrics = pd.read_parquet(out / "benchmark_metrics.parquet")
    assert metrics["error"].isna().all()
    epr = metrics[(metrics["universe"] == "all_pairs") & (metrics["metric"] == "epr")].set_index("method")["value"]
    assert set(epr.index) == set(METHOD_LABELS) and np.isfinite(epr).all()
    run = json.loads((out / "run.json").read_text())
    assert run["failed_methods"] == {}
    assert run["method_notes"]["regdiffusion"]["n_cells_dropped"] == len(empty) == 19


def test_a_method_that_fails_is_reported_the_others_are_scored_and_the_exit_status_says_so(
        small_benchmark_files, tmp_path, capsys, monkeypatch):
    from scgrn_assets.lib.benchmarks import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("boom: injected failure")

    monkeypatch.setattr(pipeline, "regdiffusion_edges", broken)
    expression, truth = small_benchmark_files
    out = tmp_path / "out"
    assert main(["benchmark", "--expression", str(expression), "--truth", str(truth), "--values", "normalized",
                 "--out", str(out), *QUICK]) == 3
    captured = capsys.readouterr()
    assert "1 method failed" in captured.err and "regdiffusion" in captured.err and "boom" in captured.err
    others = {m: label for m, label in METHOD_LABELS.items() if m != "regdiffusion"}
    for label in others.values():
        assert label in captured.out
    assert "RuntimeError: boom: injected failure" in captured.out  # the printed failed-methods list
    # Every output is still written; the other methods are scored as usual.
    for name in ("benchmark_metrics.parquet", "benchmark_summary.md", "predictions.parquet", "run.json"):
        assert (out / name).is_file()
    metrics = pd.read_parquet(out / "benchmark_metrics.parquet")
    scored = metrics[metrics["error"].isna() & (metrics["universe"] == "all_pairs")]
    assert set(scored["method"]) == set(others)
    assert {(m, k) for m in others for k in RANKING_METRICS} <= set(zip(scored["method"], scored["metric"]))
    failed = metrics[metrics["error"].notna()]
    assert set(failed["method"]) == {"regdiffusion"} and (failed["metric"] == "failed").all()
    assert failed["error"].str.contains("RuntimeError: boom: injected failure").all()
    run = json.loads((out / "run.json").read_text())
    assert run["failed_methods"]["regdiffusion"]["step"] == "baselines"
    assert "boom" in run["failed_methods"]["regdiffusion"]["reason"]
    assert "regdiffusion" not in run["methods"]
    assert "RegDiffusion" in (out / "benchmark_summary.md").read_text().split("Failed")[-1]
