"""Per-study ingest: the raw GEO files and the study's AnnData, one partition per study."""


import dagster as dg
import pandas as pd

from scgrn_assets.metadata import table_preview
from scgrn_assets.defs.ingest.checks import STUDY_CHECKS
from scgrn_assets.io_managers import file_artefact, output_path
from scgrn_assets.lib.corpus import iter_row_chunks, read_study_obs, scan_counts
from scgrn_assets.lib.ingest import ChecksumLock, fetch_pinned, url_for_messages, write_study_h5ad
from scgrn_assets.lib.storage import remove_stale_temporaries
from scgrn_assets.partitions import STUDY
from scgrn_assets.resources import GeoDownloader, ScgrnStorage
from scgrn_assets.run_console import asset_progress


@dg.asset(partitions_def=STUDY, group_name="ingest", io_manager_key="artefact_io_manager",
          kinds={"geo"}, tags={"stage": "ingest"})
def geo_raw_archive(context: dg.AssetExecutionContext, storage: ScgrnStorage, downloader: GeoDownloader):
    """The study's supplementary files (count archive, metadata table) fetched from the catalog URLs,
    sha256-verified (the catalog's sha256, or the pin its first download wrote to the catalog's
    lock file), written atomically."""
    catalog = storage.load_catalog()
    study = catalog.study(context.partition_key)
    lock = ChecksumLock(catalog.lock_path)
    folder = output_path(context, storage.layout)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    rows = []
    for study_file in study.files:
        context.log.info(f"{study.accession}: fetching {url_for_messages(study_file.url)}")  # no query: tokens
        pinned_before = study_file.sha256 or lock.pinned_sha256(study_file.url)
        result = fetch_pinned(study_file.url, folder / study_file.name, sha256=study_file.sha256, lock=lock,
                              study=study.accession, policy=downloader.policy, mirrors=downloader.mirrors)
        rows.append({"file": study_file.name, "role": study_file.role, "bytes": result.n_bytes,
                     "sha256": result.sha256[:16], "attempts": result.n_attempts,
                     "verified_by": "catalog" if study_file.sha256 else
                     "lock file" if pinned_before else "pinned now (first use)"})
    return dg.Output(folder, metadata={
        "files": table_preview(pd.DataFrame(rows), n_rows=len(rows)),
        "total_bytes": sum(r["bytes"] for r in rows),
        "path": dg.MetadataValue.path(str(folder)),
    })


@dg.asset(partitions_def=STUDY, group_name="ingest", io_manager_key="artefact_io_manager",
          metadata=file_artefact(".h5ad"), kinds={"anndata"}, check_specs=STUDY_CHECKS, tags={"stage": "ingest"})
def study_anndata(context: dg.AssetExecutionContext, storage: ScgrnStorage, geo_raw_archive):
    """One study as AnnData (.h5ad): samples streamed from the archive, gene IDs harmonised,
    metadata joined, ``condition`` derived by the catalog's rule."""
    catalog = storage.load_catalog()
    study = catalog.study(context.partition_key)
    path = output_path(context, storage.layout)
    adata = write_study_h5ad(study, geo_raw_archive, path, condition_levels=catalog.condition_levels,
                             progress=asset_progress(context, f"{study.accession} sample files", "files"))
    ingest = adata.uns["ingest"]
    if ingest["n_skipped_samples"]:
        context.log.warning(f"{study.accession}: left out {ingest['n_skipped_samples']} sample file(s) (failed to "
                            f"parse with skip_bad_samples: true, or listed under exclude_samples): "
                            f"{ingest['skipped_samples']}")
    if ingest["n_cells_without_metadata"]:
        context.log.warning(f"{study.accession}: {ingest['n_cells_without_metadata']} cells have no metadata row "
                            "and keep NA metadata (cells_without_metadata: na)")
    # What the reader noticed (unread members, unmapped condition values, one Ensembl ID under two symbols...).
    for line in str(ingest.get("warnings", "") or "").splitlines():
        context.log.warning(f"{study.accession}: {line}")
    # Checks read the file back: they vouch for what downstream will read, not for memory.
    scan = scan_counts(iter_row_chunks(path))
    obs = read_study_obs(path)
    yield dg.Output(path, metadata={
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "sparsity": float(1 - scan.n_values / max(1, adata.n_obs * adata.n_vars)),
        "cells_by_condition": dg.MetadataValue.json(
            adata.obs["condition"].astype(object).fillna("NA").value_counts().to_dict()),
        "median_counts_per_cell": float(adata.obs["n_counts"].median()),
        "skipped_samples": dg.MetadataValue.md(ingest["skipped_samples"] or "none"),
        "ingest_warnings": dg.MetadataValue.md(str(ingest.get("warnings", "") or "none")),
        "n_cells_without_metadata": ingest["n_cells_without_metadata"],
        "n_spike_ins_dropped": ingest["n_spike_ins_dropped"],
        "condition_na_reason": study.condition_na_reason or "-",
        "metadata_table": ingest["metadata_table"],
        "preview": table_preview(adata.obs),
        "path": dg.MetadataValue.path(str(path)),
    })
    yield dg.AssetCheckResult(check_name="counts_are_non_negative_integers", passed=scan.ok,
                              metadata={"negative": scan.n_negative, "sentinel": scan.n_sentinel,
                                        "non_integer": scan.n_non_integer, "non_finite": scan.n_non_finite})
    missing_study = int(obs["study"].isna().sum()) + int((obs["study"] != study.accession).sum())
    yield dg.AssetCheckResult(check_name="every_cell_has_a_study", passed=missing_study == 0,
                              metadata={"cells_without_study": missing_study})
