"""Each asset group materialised on its own, in pipeline order, on a tiny simulated catalog (600 cells over
the demo's four studies), with the smoke-test settings: what each stage writes, where the IO managers put
it, and that its checks pass. One module-scoped SCGRN_HOME: each stage reads the one before."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from scgrn_assets.cli import materialisation_plan
from scgrn_assets.definitions import build_definitions
from scgrn_assets.lib.demo.geo_layouts import demo_catalog, write_catalog_yaml, write_demo_geo
from scgrn_assets.lib.demo.simulator import DemoConfig
from scgrn_assets.lib.sql_store import list_tables, query

pytestmark = pytest.mark.slow  # every stage of the graph: a few minutes on two busy cores

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


@dataclass
class Staged:
    home: Path
    defs: dg.Definitions
    instance: dg.DagsterInstance

    def run_group(self, group: str) -> list:
        """Materialise ``group`` (each study for partitioned assets); the runs' check evaluations."""
        return self.run([a for a in self.defs.assets if group in a.group_names_by_key.values()])

    def run_assets(self, *names: str) -> list:
        return self.run([a for a in self.defs.assets if a.key.to_user_string() in names])

    def run(self, assets: list) -> list:
        group = ", ".join(a.key.to_user_string() for a in assets)
        everything = [*self.defs.assets, *self.defs.asset_checks]
        accessions = self.defs.resources["storage"].load_catalog().accessions
        evaluations = []
        for runs, partitioned in materialisation_plan(assets):
            for partition in accessions if partitioned else [None]:
                result = dg.materialize(everything, selection=dg.AssetSelection.assets(*runs), partition_key=partition,
                                        instance=self.instance, resources=dict(self.defs.resources),
                                        raise_on_error=False, run_config=QUIET)
                assert result.success, (group, partition, [e.step_failure_data.error.to_string()[-2000:]
                                                           for e in result.all_events if e.is_step_failure])
                evaluations += result.get_asset_check_evaluations()
        return evaluations

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.home / "assets" / name / f"{name}.parquet")

    def row_count(self, name: str) -> int:
        event = self.instance.get_latest_materialization_event(dg.AssetKey(name))
        return event.asset_materialization.metadata["dagster/row_count"].value

    @property
    def views(self) -> set[str]:
        return set(list_tables(self.home / "scgrn.duckdb"))


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Staged:
    home = tmp_path_factory.mktemp("stages")
    config = DemoConfig.scaled(n_cells=600, n_genes=450, seed=3)
    _, written = write_demo_geo(home / "demo_geo", config)
    catalog = home / "tiny.yaml"
    write_catalog_yaml(demo_catalog(config, written), catalog)
    return Staged(home=home, defs=build_definitions(catalog, home=home, quick=True),
                  instance=dg.DagsterInstance.ephemeral())


def test_ingest_and_corpus(staged):
    evaluations = staged.run_group("ingest") + staged.run_group("corpus")
    assert all(e.passed for e in evaluations), [e.check_name for e in evaluations if not e.passed]
    for study in staged.defs.resources["storage"].load_catalog().accessions:
        assert (staged.home / "assets" / "study_anndata" / study / f"{study}.h5ad").exists()
    assert (staged.home / "assets" / "combined_corpus" / "combined_corpus.zarr").is_dir()
    assert staged.row_count("gene_annotation") == len(staged.table("gene_annotation")) > 0
    assert "gene_annotation" not in staged.views and "corpus_studies" in staged.views


def test_condition_effects(staged):
    evaluations = staged.run_group("condition_effects")
    assert {e.check_name for e in evaluations} >= {"design_has_replicated_contrast", "posterior_predictive_fits"}
    assert (staged.home / "assets" / "nb_posterior" / "nb_posterior.nc").exists()
    for name in ("condition_effects", "condition_effects_by_study", "condition_effects_pydeseq2"):
        assert name in staged.views
        assert staged.row_count(name) == len(staged.table(name))
    assert len(staged.table("condition_effects")) > 0


def test_network(staged):
    staged.run_group("network")
    for study in staged.defs.resources["storage"].load_catalog().accessions:
        assert (staged.home / "assets" / "attention_moments" / study / f"{study}.npz").exists()
        assert (staged.home / "assets" / "network_moments" / study).is_dir()
    assert (staged.home / "assets" / "gene_universe" / "gene_universe.json").exists()
    assert {"edges", "network_edges"} <= staged.views
    assert staged.row_count("edge_stability") == len(staged.table("edge_stability")) > 0
    assert query(staged.home / "scgrn.duckdb", "SELECT count(*) AS n FROM network_edges")["n"].iloc[0] == \
        staged.row_count("network_edges") > 0


def test_validation(staged):
    # The MI candidates include the Pearson baseline: baseline_edges (benchmarks group) comes first.
    staged.run_assets("baseline_edges")
    staged.run_group("validation")
    assert {"mi_edges", "cmi_edges", "cmi_triplets"} <= staged.views
    assert staged.row_count("mi_edges") == len(staged.table("mi_edges")) > 0
    assert (staged.home / "assets" / "cmi_edges" / "cmi_triplets.parquet").exists()


def test_benchmarks(staged):
    staged.run_assets("reference_networks", "benchmark_metrics")
    assert {"reference_edges", "baseline_edges", "benchmark_metrics"} <= staged.views
    metrics = staged.table("benchmark_metrics")
    assert staged.row_count("benchmark_metrics") == len(metrics) > 0
    assert {"epr", "auprc_ratio"} <= set(metrics["metric"])
