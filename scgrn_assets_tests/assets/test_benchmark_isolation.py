"""Inside the assets, one failed method does not fail the asset (issue #24): ``baseline_edges`` and
``benchmark_metrics`` keep every other method, list the failed one in their metadata with its reason, and
log it as a warning. The assets are invoked directly on a small corpus with 19 cells that express no gene."""

from __future__ import annotations

import json

import anndata as ad
import dagster as dg
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgrn_assets.defs.benchmarks.assets import baseline_edges, benchmark_metrics
from scgrn_assets.lib.benchmarks import pipeline
from scgrn_assets.lib.benchmarks.pipeline import BASELINE_METHODS
from scgrn_assets.resources import BenchmarkSettings, GeneformerSettings
from scgrn_assets_tests.support.benchmarks import expression_with_empty_cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = dict(tree_n_trees=5, tree_max_cells=300, grnboost2_max_cells=300, grnboost2_max_estimators=50,
             regdiffusion_n_steps=3, n_null=10)


@pytest.fixture
def corpus_and_universe(tmp_path):
    values, genes, _ = expression_with_empty_cells(n_cells=600)
    n_counts = values.sum(axis=1)
    n_counts[n_counts == 0] = 1.0  # the corpus's library size is over all genes; these cells have others
    corpus = ad.AnnData(X=sp.csr_matrix(values.astype(np.float32)),
                        obs=pd.DataFrame({"n_counts": n_counts, "study": np.repeat(["S1", "S2"], 300)},
                                         index=[f"c{i}" for i in range(len(values))]),
                        var=pd.DataFrame(index=genes))
    corpus_path = tmp_path / "combined_corpus.zarr"
    corpus.write_zarr(corpus_path)
    universe = tmp_path / "gene_universe.json"
    universe.write_text(json.dumps({"genes": genes, "keys": genes}))
    return corpus_path, universe, genes


def _warnings(capfd) -> list[str]:
    """The WARNING lines the Dagster context logged (its console handler writes to stderr)."""
    return [line for line in capfd.readouterr().err.splitlines() if " - WARNING - " in line]


def test_a_failed_baseline_is_listed_and_warned_and_the_others_are_kept(corpus_and_universe, monkeypatch, capfd):
    corpus_path, universe, genes = corpus_and_universe

    def broken(*args, **kwargs):
        raise RuntimeError("boom: injected failure")

    monkeypatch.setattr(pipeline, "regdiffusion_edges", broken)
    capfd.readouterr()
    output = baseline_edges(dg.build_asset_context(), BenchmarkSettings(**QUICK), corpus_path, universe)
    table, metadata = output.value, output.metadata
    assert set(table["method"]) == set(BASELINE_METHODS) - {"regdiffusion"}
    assert np.isfinite(table["score"]).all()
    failed = metadata["failed_methods"].value
    assert set(failed) == {"regdiffusion"}
    assert "RuntimeError: boom: injected failure" in failed["regdiffusion"]["reason"]
    assert any("regdiffusion" in message and "boom" in message for message in _warnings(capfd))

    # benchmark_metrics scores what baseline_edges kept and lists the absent method as failed.
    edges = pd.DataFrame({"gene_i": genes[:-1], "gene_j": genes[1:], "n_cells": 500, "abs_stability": 1.0})
    network = pd.DataFrame({"gene_i": genes[:-1], "gene_j": genes[1:], "abs_pcorr": np.nan,
                            "method": "pcorr_rank_value"})  # a readout whose scores cannot be ranked
    mi = pd.DataFrame({"parent": genes[:-1], "target": genes[1:], "mi": 0.5})
    cmi = pd.DataFrame({"parent": genes[:-1], "target": genes[1:], "cmi_min": 0.2, "direct": True})
    reference = pd.DataFrame({"source": genes[:-1], "target": genes[1:], "sign": "+", "directed": True,
                              "reference": "cascade"})
    output = benchmark_metrics(dg.build_asset_context(), BenchmarkSettings(**QUICK), GeneformerSettings(), edges,
                               network, table, mi, cmi, reference, universe)
    metrics, metadata = output.value, output.metadata
    failed = metadata["failed_methods"].value
    assert set(failed) == {"regdiffusion", "pcorr_rank_value"}
    assert "NaN or infinite" in failed["pcorr_rank_value"]["reason"]
    scored = metrics[metrics["error"].isna()]
    assert set(scored["method"]) == set(BASELINE_METHODS) - {"regdiffusion"} | {"attention_stability", "mi",
                                                                              "cmi_pruned"}
    assert set(metrics.loc[metrics["error"].notna(), "method"]) == {"regdiffusion", "pcorr_rank_value"}
    assert any("pcorr_rank_value" in message for message in _warnings(capfd))


def test_baseline_edges_on_a_corpus_with_empty_cells_keeps_every_method(corpus_and_universe):
    corpus_path, universe, _ = corpus_and_universe
    output = baseline_edges(dg.build_asset_context(), BenchmarkSettings(**QUICK), corpus_path, universe)
    assert set(output.value["method"]) == set(BASELINE_METHODS)
    assert output.metadata["failed_methods"].value == {}
    assert output.metadata["method_notes"].value["regdiffusion"]["n_cells_dropped"] == 19


def test_mi_uses_the_candidates_that_were_built_and_names_the_one_that_failed(corpus_and_universe, capfd):
    from scgrn_assets.defs.validation.assets import mi_edges
    from scgrn_assets.lib.errors import ScgrnInputError
    from scgrn_assets.resources import ValidationSettings

    corpus_path, _universe, genes = corpus_and_universe
    pearson = pd.DataFrame({"source": genes[:-1], "target": genes[1:], "score": np.linspace(1, 0.1, len(genes) - 1),
                            "method": "pearson", "directed": False})
    network = pd.DataFrame(columns=["gene_i", "gene_j", "abs_pcorr", "method"])  # pcorr_rank_value failed upstream
    settings = ValidationSettings(candidates=["pcorr_rank_value", "pearson"], n_permutations=20, top_k=3)
    capfd.readouterr()
    output = mi_edges(dg.build_asset_context(), settings, corpus_path, network, pearson)
    assert output.metadata["candidates_used"].value == ["pearson"]
    assert output.metadata["candidates_failed_upstream"].value == ["pcorr_rank_value"]
    assert len(output.value) > 0 and set(output.value["target"]) <= set(genes)
    assert any("pcorr_rank_value is absent" in line for line in _warnings(capfd))
    # A name that is no network at all is a settings error, named with the choices.
    with pytest.raises(ScgrnInputError, match="were not computed"):
        mi_edges(dg.build_asset_context(), ValidationSettings(candidates=["pearsn"], n_permutations=20), corpus_path,
                 network, pearson)
    # Every candidate failed: nothing to test, said as such.
    with pytest.raises(ScgrnInputError, match="were not computed"):
        mi_edges(dg.build_asset_context(), ValidationSettings(candidates=["pcorr_rank_value"], n_permutations=20),
                 corpus_path, network, pearson.iloc[:0])
