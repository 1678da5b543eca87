"""Materialise the ingest assets and the corpus for SCGRN_CATALOG, in a process of its own.

Study partitions are fixed when the definitions are imported (from SCGRN_CATALOG), so a test of
a catalog other than the demo runs this module in a subprocess with the environment it needs::

    python -m scgrn_assets_tests.assets.materialise_catalog OUT.json [--partitions GSE1 ...] [--no-corpus]

It writes a JSON summary: per run, success, the failure message chain, the materialised assets'
metadata (plain values) and the asset check results.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--partitions", nargs="*")
    parser.add_argument("--no-corpus", action="store_true")
    args = parser.parse_args(argv)

    from scgrn_assets import definitions
    from scgrn_assets.settings import current_catalog

    assets = [*definitions.all_assets, *definitions.all_asset_checks]
    resources = definitions.build_resources(home=os.environ["SCGRN_HOME"], catalog=os.environ["SCGRN_CATALOG"],
                                            quick=True)
    instance = dg.DagsterInstance.ephemeral()
    runs = {}
    for accession in args.partitions or current_catalog().accessions:
        result = dg.materialize(assets, selection=dg.AssetSelection.groups("ingest"), partition_key=accession,
                                instance=instance, resources=resources, raise_on_error=False, run_config=QUIET)
        runs[accession] = _summary(result)
    if not args.no_corpus:
        result = dg.materialize(assets, selection=dg.AssetSelection.assets("gene_annotation", "combined_corpus"),
                                instance=instance, resources=resources, raise_on_error=False,
                                run_config={**NO_QC, **QUIET})
        runs["corpus"] = _summary(result)
    Path(args.out).write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
