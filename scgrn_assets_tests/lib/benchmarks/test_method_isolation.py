"""One method must not take the others down (issue #24): a method that raises, runs past its time limit or
returns NaN / infinite scores is recorded as failed with its reason, and every other method is still run
and scored. RegDiffusion on cells that express no gene is fixed at the root (those cells are left out)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest

from scgrn_assets.lib.benchmarks import pipeline
from scgrn_assets.lib.benchmarks.baselines import regdiffusion_edges
from scgrn_assets.lib.benchmarks.expression import log_normalized
from scgrn_assets.lib.benchmarks.metrics import METRIC_COLUMNS, benchmark_table
from scgrn_assets.lib.benchmarks.pipeline import BASELINE_METHODS, MethodFailure, baseline_predictions, score_methods
from scgrn_assets.lib.benchmarks.reference_files import normalise_reference
from scgrn_assets_tests.support.benchmarks import expression_with_empty_cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = dict(tree_n_trees=5, tree_max_cells=300, seed=0, grnboost2_max_cells=300, grnboost2_max_estimators=50,
             regdiffusion_n_steps=3, regdiffusion_max_cells=2000)


@pytest.fixture(scope="module")
def empty_cells():
    values, genes, empty = expression_with_empty_cells()
    n_counts = values.sum(axis=1)
    n_counts[n_counts == 0] = 1.0  # log_normalized wants a positive library size; the cell stays all zero
    expression = log_normalized(values, n_counts).toarray()
    assert (expression[empty] == 0).all() and (expression.sum(axis=1) > 0).sum() == len(values) - len(empty)
    return expression, genes, empty


def test_regdiffusion_leaves_out_cells_that_express_no_gene(empty_cells):
    # Before: RegDiffusion's per-cell min-max divided by a zero range and every score came back NaN.
    expression, genes, empty = empty_cells
    with np.errstate(divide="raise", invalid="raise"):  # its "invalid value encountered in divide" is an error
        predictions = regdiffusion_edges(expression, genes, n_steps=3, max_cells=2000, seed=0)
    assert len(predictions) == len(genes) * (len(genes) - 1)
    assert np.isfinite(predictions["score"]).all() and (predictions["score"] > 0).any()
    assert predictions.attrs["n_cells_dropped"] == len(empty) == 19
    assert predictions.attrs["n_cells_used"] == len(expression) - 19


def test_every_real_baseline_is_scored_on_a_matrix_with_empty_cells(empty_cells):
    expression, genes, _ = empty_cells
    predictions, failures = baseline_predictions(expression, genes, **QUICK)
    assert failures == []
    assert list(predictions) == list(BASELINE_METHODS)
    for method, table in predictions.items():
        assert len(table) > 0 and np.isfinite(table["score"].to_numpy(dtype=float)).all(), method


def _raise(*args, **kwargs):
    raise RuntimeError("boom: a bug inside the method")


def _nan_scores(expression, genes, **kwargs):
    table = pd.DataFrame({"source": [genes[0], genes[1]], "target": [genes[1], genes[2]], "score": [np.nan, 1.0]})
    table.attrs["directed"] = False
    return table


def test_a_method_that_raises_or_returns_nan_is_recorded_and_the_others_are_kept(empty_cells, monkeypatch):
    expression, genes, _ = empty_cells
    monkeypatch.setattr(pipeline, "regdiffusion_edges", _raise)
    monkeypatch.setattr(pipeline, "spearman_edges", _nan_scores)
    predictions, failures = baseline_predictions(expression, genes, **QUICK)
    assert sorted(predictions) == sorted(set(BASELINE_METHODS) - {"regdiffusion", "spearman"})
    by_method = {failure.method: failure for failure in failures}
    assert set(by_method) == {"regdiffusion", "spearman"}
    assert by_method["regdiffusion"].step == "baselines"
    assert "RuntimeError: boom: a bug inside the method" in by_method["regdiffusion"].reason
    assert "in _raise" in by_method["regdiffusion"].traceback  # kept for run.json, never printed
    assert "1 of 2 scores are NaN or infinite" in by_method["spearman"].reason


def test_a_method_past_its_time_limit_is_stopped_and_the_others_are_kept(empty_cells, monkeypatch):
    expression, genes, _ = empty_cells
    released = threading.Event()

    def reports_progress_forever(*args, progress=None, **kwargs):
        for step in range(10 ** 9):  # a method that reports progress is stopped at its next report
            time.sleep(0.01)
            progress(step, 10 ** 9)

    def never_reports(*args, **kwargs):
        released.wait(60)  # a method that never reports: abandoned, its result discarded
        return _nan_scores(expression, genes)

    monkeypatch.setattr(pipeline, "tree_edges", reports_progress_forever)
    monkeypatch.setattr(pipeline, "grnboost2_edges", never_reports)
    started = time.monotonic()
    try:
        predictions, failures = baseline_predictions(expression, genes, **QUICK, time_limit_s=1.0,
                                                     methods=("pearson", "tree", "grnboost2", "random"))
    finally:
        released.set()
    assert time.monotonic() - started < 30
    assert sorted(predictions) == ["pearson", "random"]
    reasons = {failure.method: failure.reason for failure in failures}
    assert set(reasons) == {"tree", "grnboost2"}
    assert all("time limit of 1 s" in reason for reason in reasons.values()), reasons


def test_without_a_time_limit_a_method_runs_in_the_callers_thread(empty_cells, monkeypatch):
    expression, genes, _ = empty_cells
    threads, real_pearson = [], pipeline.pearson_edges

    def pearson(*args, **kwargs):
        threads.append(threading.current_thread())
        return real_pearson(*args, **kwargs)

    monkeypatch.setattr(pipeline, "pearson_edges", pearson)
    predictions, failures = baseline_predictions(expression, genes, **QUICK, methods=("pearson",))
    assert failures == [] and list(predictions) == ["pearson"]
    assert threads == [threading.main_thread()]


def _reference(genes):
    return normalise_reference(pd.DataFrame({"source": genes[:-1], "target": genes[1:]}), name="cascade",
                               directed=True)


def test_score_methods_records_a_method_whose_scores_are_not_finite(empty_cells):
    expression, genes, _ = empty_cells
    predictions, _ = baseline_predictions(expression, genes, **QUICK, methods=("pearson", "random"))
    predictions["broken"] = _nan_scores(expression, genes)
    references = {"cascade": _reference(genes)}
    upstream = [MethodFailure("regdiffusion", "baselines", "RuntimeError: boom")]
    table, failures = score_methods(predictions, references, genes, upstream, top_k=None, n_null=10, seed=0)
    assert [(f.method, f.step) for f in failures] == [("regdiffusion", "baselines"), ("broken", "metrics")]
    assert "NaN or infinite" in failures[1].reason
    assert list(table.columns) == [*METRIC_COLUMNS, "error"]
    scored = table[table["error"].isna()]
    # The scored rows are exactly what benchmark_table gives on the good methods alone.
    alone = benchmark_table({m: predictions[m] for m in ("pearson", "random")}, references, genes, n_null=10, seed=0)
    pd.testing.assert_frame_equal(scored[METRIC_COLUMNS].reset_index(drop=True), alone)
    failed = table[table["error"].notna()]
    assert sorted(failed["method"]) == ["broken", "regdiffusion"]
    assert (failed["metric"] == "failed").all() and (failed["reference"] == "cascade").all()
    assert failed.set_index("method").loc["regdiffusion", "error"] == "baselines: RuntimeError: boom"
