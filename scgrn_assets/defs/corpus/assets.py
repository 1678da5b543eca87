"""The combined corpus: every study over the union of genes, QC-filtered, as AnnData Zarr."""


import dagster as dg
import numpy as np
import pandas as pd
import pydantic
import zarr
from anndata.io import read_elem, sparse_dataset

from scgrn_assets.metadata import png_metadata, table_preview
from scgrn_assets.defs.corpus.checks import CORPUS_CHECKS
from scgrn_assets.io_managers import asset_folder, file_artefact, output_path, table_artefact
from scgrn_assets.lib.corpus import (cells_repeated_across_studies, combine_studies, measured_column, QC_FIELDS,
                                     QCThresholds, row_fingerprints, scan_counts, study_gene_names)
from scgrn_assets.lib.ingest import ChecksumLock, empty_gene_annotation, fetch_pinned, read_gene_annotation
from scgrn_assets.lib.plotting import plot_cells_by_condition, plot_library_sizes
from scgrn_assets.lib.sql_store import write_table
from scgrn_assets.resources import GeoDownloader, ScgrnStorage
from scgrn_assets.run_console import asset_progress


@dg.asset(group_name="corpus", io_manager_key="table_io_manager", metadata=table_artefact(None), kinds={"parquet"},
          tags={"stage": "corpus"})
def gene_annotation(context: dg.AssetExecutionContext, storage: ScgrnStorage, downloader: GeoDownloader):
    """Gene symbol, Ensembl ID and length (bp) from the catalog's annotation file (empty when it has none)."""
    catalog = storage.load_catalog()
    if catalog.gene_annotation is None:
        context.log.warning("the catalog names no gene_annotation file: gene lengths stay unknown (NaN)")
        table = empty_gene_annotation()
    else:
        source = asset_folder(context, storage.layout) / catalog.gene_annotation.name
        fetch_pinned(catalog.gene_annotation.url, source, sha256=catalog.gene_annotation.sha256,
                     lock=ChecksumLock(catalog.lock_path), study="catalog", policy=downloader.policy,
                     mirrors=downloader.mirrors)
        table = read_gene_annotation(source)
    return dg.Output(table.reset_index(drop=True), metadata={"n_genes": len(table), "preview": table_preview(table)})


# One field per QC threshold of the library (QC_FIELDS), each unset by default: the fields are not
# repeated here, so a threshold added to QCThresholds reaches the launchpad without an edit.
CorpusQCConfig = pydantic.create_model(
    "CorpusQCConfig", __base__=dg.Config,
    __doc__="QC filters applied when combining; unset fields come from the catalog's ``qc`` section, "
            "then from the library defaults (see the README).",
    **{name: (int | None, None) for name in QC_FIELDS})


@dg.asset(group_name="corpus", io_manager_key="artefact_io_manager", metadata=file_artefact(".zarr"),
          kinds={"zarr", "anndata"},
          ins={"study_anndata": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
          check_specs=CORPUS_CHECKS, tags={"stage": "corpus"})
def combined_corpus(context: dg.AssetExecutionContext, config: CorpusQCConfig, storage: ScgrnStorage,
                    study_anndata: dict, gene_annotation: pd.DataFrame):
    """All studies over the union of genes (sparse zero padding), QC-filtered, as AnnData Zarr;
    ``var["measured_in_<study>"]`` tells a padded zero from a measured one."""
    catalog = storage.load_catalog()
    study_files = {accession: study_anndata[accession] for accession in catalog.accessions if accession in study_anndata}
    annotation = gene_annotation.set_index("gene_symbol", drop=False)
    path = output_path(context, storage.layout)
    overrides = {k: v for k, v in config.model_dump().items() if v is not None}
    qc = QCThresholds(**{**(catalog.qc or {}), **overrides})
    summary = combine_studies(study_files, path, gene_annotation=annotation, qc=qc,
                              progress=asset_progress(context, "combine", "cells"))

    store = zarr.open_group(str(path), mode="r")
    obs = read_elem(store["obs"])
    var = read_elem(store["var"])
    fingerprints = []

    def count_blocks():
        matrix = sparse_dataset(store["X"])
        for start in range(0, len(obs), 20_000):
            block = matrix[start:start + 20_000]
            fingerprints.append(row_fingerprints(block))
            yield block

    scan = scan_counts(count_blocks())
    repeated = cells_repeated_across_studies(np.concatenate(fingerprints) if fingerprints else np.zeros(0, np.uint64),
                                             obs["study"])

    # Per-study summary as a SQL table: the first thing a user queries.
    studies = (obs.assign(condition=obs["condition"].astype(object).fillna("NA"))
               .groupby(["study", "condition"], observed=True)
               .agg(n_cells=("n_counts", "size"), median_counts=("n_counts", "median")).reset_index())
    studies["n_genes_measured"] = [int(var[measured_column(s)].sum()) for s in studies["study"]]
    write_table(storage.layout.duckdb_path, studies, asset_folder(context, storage.layout) / "corpus_studies.parquet",
                "corpus_studies")

    yield dg.Output(path, metadata={
        "n_cells": summary.n_cells,
        "n_genes": summary.n_genes,
        "sparsity": round(summary.sparsity, 4),
        "cells_per_study": dg.MetadataValue.json(summary.cells_per_study),
        "cells_removed_by_qc": dg.MetadataValue.json(summary.cells_removed_by_qc),
        "genes_removed_by_qc": len(summary.genes_removed_by_qc),
        "studies": table_preview(studies, n_rows=len(studies)),
        "library_sizes": png_metadata(plot_library_sizes(obs)),
        "cells_by_condition": png_metadata(plot_cells_by_condition(obs)),
        "path": dg.MetadataValue.path(str(path)),
    })
    yield dg.AssetCheckResult(check_name="counts_are_non_negative_integers", passed=scan.ok,
                              metadata={"negative": scan.n_negative, "sentinel": scan.n_sentinel,
                                        "non_integer": scan.n_non_integer, "non_finite": scan.n_non_finite})
    # The union is recomputed from the study files, independently of the combine step.
    union = set().union(*(study_gene_names(p) for p in study_files.values()))
    corpus_genes = set(var.index) | set(summary.genes_removed_by_qc)
    yield dg.AssetCheckResult(check_name="genes_are_the_union_of_studies", passed=corpus_genes == union,
                              metadata={"union_size": len(union), "corpus_genes": len(var),
                                        "removed_by_qc": len(summary.genes_removed_by_qc)})
    no_study = int(obs["study"].isna().sum()) + int((~obs["study"].isin(list(study_files))).sum())
    yield dg.AssetCheckResult(check_name="every_cell_has_a_study", passed=no_study == 0,
                              metadata={"cells_without_study": no_study})
    yield dg.AssetCheckResult(
        check_name="cells_are_not_repeated_across_studies", passed=repeated.empty,
        severity=dg.AssetCheckSeverity.WARN,
        description=None if repeated.empty else "studies share identical cells: drop one of each pair from the catalog",
        metadata={"repeated_cells": int(repeated["n_cells"].sum()),
                  "study_pairs": table_preview(repeated, n_rows=len(repeated))})
