"""Materialise the ingest assets and the corpus for any catalog, in this process: the study
partitions come from :func:`scgrn_assets.definitions.build_definitions`, not from the environment."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

# Any QC would empty a corpus of miniature cells; the thresholds are not what is under test.
NO_QC = {"ops": {"combined_corpus": {"config": {"min_counts_per_cell": 1, "min_genes_per_cell": 1,
                                                 "min_cells_per_gene": 1}}}}
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def _plain(value):
    inner = getattr(value, "value", value)
    if isinstance(inner, (str, int, float, bool, dict, list)) or inner is None:
        return inner
    return str(inner)


def _summary(result) -> dict:
    failures = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error is not None:
                failures.append(error.message)
                error = error.cause
    materialised = {}
    for event in result.get_asset_materialization_events():
        materialisation = event.event_specific_data.materialization
        materialised[materialisation.asset_key.to_user_string()] = {
            key: _plain(value) for key, value in materialisation.metadata.items()}
    checks = [{"asset": e.asset_key.to_user_string(), "check": e.check_name, "passed": e.passed}
              for e in result.get_asset_check_evaluations()]
    return {"success": result.success, "failures": failures, "materialised": materialised, "checks": checks}


def materialise_catalog(home: Path, catalog: Path | str, *, partitions: list[str] | None = None,
                        corpus: bool = True) -> dict:
    """Per run (each study's ingest, then ``corpus``): success, the failure message chain, the
    materialised assets' metadata (plain values) and the asset check results."""
    from scgrn_assets.definitions import build_definitions

    built = build_definitions(str(catalog), home=home, quick=True)
    assets = [*built.assets, *built.asset_checks]
    resources = dict(built.resources)
    instance = dg.DagsterInstance.ephemeral()
    runs = {}
    for accession in partitions or resources["storage"].load_catalog().accessions:
        result = dg.materialize(assets, selection=dg.AssetSelection.groups("ingest"), partition_key=accession,
                                instance=instance, resources=resources, raise_on_error=False, run_config=QUIET)
        runs[accession] = _summary(result)
    if corpus:
        result = dg.materialize(assets, selection=dg.AssetSelection.assets("gene_annotation", "combined_corpus"),
                                instance=instance, resources=resources, raise_on_error=False,
                                run_config={**NO_QC, **QUIET})
        runs["corpus"] = _summary(result)
    return runs
