"""One study as an AnnData: read its samples, harmonise genes, join metadata, derive condition."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.catalog import Study
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.genes import harmonise_gene_ids, sum_duplicate_genes
from scgrn_assets.lib.readers import SampleCounts, normalise_plate_id, read_metadata_table, read_study_samples


def reindex_genes(counts: sp.csr_matrix, genes: list[str], target: pd.Index) -> sp.csr_matrix:
    """Columns of ``counts`` (named ``genes``) placed at their position in ``target``; others are zero."""
    positions = target.get_indexer(genes)
    if (positions < 0).any():
        raise ValueError("every gene must be in the target index")
    mapping = sp.csr_matrix((np.ones(len(genes), dtype=counts.dtype), (np.arange(len(genes)), positions)),
                            shape=(len(genes), len(target)))
    return (counts @ mapping).tocsr()


def build_study_anndata(study: Study, raw_dir: Path, *, condition_levels: tuple[str, str] = ("control", "AD"),
                        progress: Callable[[str], None] | None = None) -> ad.AnnData:
    """Read, harmonise and annotate one study.

    Returns an AnnData with integer counts in ``X`` (CSR, int32, cells x genes), ``obs``
    columns ``study``, ``sample``, ``sample_name``, ``barcode``, ``condition`` (categorical,
    NA where unknown), ``condition_source`` (the metadata value the rule read) and
    ``n_counts`` (total counts of the cell over all its genes), and ``var`` indexed by
    gene symbol with ``gene_symbol`` and ``ensembl_id``.
    """
    metadata = read_metadata_table(raw_dir / study.metadata.file, study=study.accession)
    ensembl_to_symbol = _read_gene_map(study, raw_dir)
    samples: list[tuple[SampleCounts, list[str], list[str | None]]] = []
    for sample in read_study_samples(study, raw_dir, progress):
        _check_barcodes(study, sample)
        symbols, ensembl = harmonise_gene_ids(sample.gene_ids, gene_id_type=study.gene_id_type,
                                              symbols=sample.gene_symbols, strip_r=study.strip_r_prefix,
                                              ensembl_to_symbol=ensembl_to_symbol, study=study.accession,
                                              file=sample.source_file)
        counts, symbols, ensembl = sum_duplicate_genes(sample.counts, symbols, ensembl)
        samples.append((SampleCounts(sample.sample, sample.sample_name, sample.source_file, sample.cell_names,
                                     symbols, counts, cell_plates=sample.cell_plates), symbols, ensembl))

    # The union over samples (normally identical gene lists) in order of first appearance.
    gene_index = pd.Index(pd.unique(np.concatenate([np.asarray(s, dtype=object) for _, s, _ in samples])))
    ensembl_by_symbol: dict[str, str] = {}
    for _, symbols, ensembl in samples:
        for symbol, ensembl_id in zip(symbols, ensembl):
            if ensembl_id and symbol not in ensembl_by_symbol:
                ensembl_by_symbol[symbol] = ensembl_id
    blocks = [reindex_genes(s.counts, symbols, gene_index) for s, symbols, _ in samples]
    obs = pd.concat([_join_cell_metadata(study, s, metadata, condition_levels) for s, _, _ in samples],
                    ignore_index=True)
    counts = sp.vstack(blocks, format="csr").astype(np.int32)
    obs["n_counts"] = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    obs["n_genes"] = np.diff(counts.indptr).astype(np.int64)
    obs.index = pd.Index(study.accession + ":" + obs["sample"].astype(str) + ":" + obs["barcode"].astype(str))
    var = pd.DataFrame({"gene_symbol": gene_index.astype(str),
                        "ensembl_id": [ensembl_by_symbol.get(g) for g in gene_index]},
                       index=gene_index.astype(str))
    # Categoricals store "unknown" as a missing code that every anndata version reads back.
    var["ensembl_id"] = var["ensembl_id"].astype("category")
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.uns["study"] = {"accession": study.accession, "title": study.title, "species": study.species,
                          "format": study.format, "gene_id_type": study.gene_id_type}
    return adata


def _check_barcodes(study: Study, sample: SampleCounts) -> None:
    names = pd.Index(sample.cell_names)
    if names.has_duplicates:
        duplicated = names[names.duplicated()].unique()[:3].tolist()
        raise ScgrnInputError(f"sample {sample.sample} has duplicate cell barcodes {duplicated}", study=study.accession,
                              file=sample.source_file, fix="re-download the file or exclude the sample")


def _read_gene_map(study: Study, raw_dir: Path) -> dict[str, str] | None:
    files = study.files_with_role("gene_map")
    if not files:
        return None
    table = read_metadata_table(raw_dir / files[0].name, study=study.accession)
    if table.shape[1] < 2:
        raise ScgrnInputError("gene map needs two columns (ensembl_id, gene_symbol)", study=study.accession,
                              file=files[0].name, fix="fix the gene_map file")
    return dict(zip(table.iloc[:, 0].str.split(".").str[0], table.iloc[:, 1]))


def _join_cell_metadata(study: Study, sample: SampleCounts, metadata: pd.DataFrame,
                        condition_levels: tuple[str, str]) -> pd.DataFrame:
    n_cells = len(sample.cell_names)
    where = study.metadata.file
    if sample.cell_plates is not None:
        rows = _rows_by_well_and_plate(study, sample, metadata)
    else:
        column = study.metadata.sample_column
        if column not in metadata.columns:
            raise ScgrnInputError(f"has no column {column!r} to join samples on (columns: {list(metadata.columns)[:12]})",
                                  study=study.accession, file=where, fix="set metadata.sample_column in the catalog")
        matches = metadata.index[metadata[column].str.strip() == sample.sample]
        if len(matches) == 0:
            raise ScgrnInputError(f"has no row for sample {sample.sample} (file {sample.source_file}) in column "
                                  f"{column!r}", study=study.accession, file=where,
                                  fix="re-download the metadata table or exclude the sample")
        rows = np.full(n_cells, matches[0])
    condition_source = pd.Series(pd.Categorical([None] * n_cells))
    condition = pd.Series(pd.Categorical([None] * n_cells, categories=list(condition_levels)))
    if study.condition is not None:
        column = study.condition.column
        if column not in metadata.columns:
            raise ScgrnInputError(f"has no column {column!r} for the condition rule (columns: "
                                  f"{list(metadata.columns)[:12]})", study=study.accession, file=where,
                                  fix="fix condition.column in the catalog")
        if sample.cell_plates is None:
            # Several runs of one sample must agree on the condition, or the label is meaningless.
            values = metadata.loc[metadata[study.metadata.sample_column].str.strip() == sample.sample, column]
            if values.str.strip().nunique() > 1:
                raise ScgrnInputError(f"sample {sample.sample} has conflicting {column!r} values "
                                      f"{sorted(values.unique())}", study=study.accession, file=where,
                                      fix="fix the metadata table or the catalog's condition rule")
        raw_values = metadata.loc[rows, column].str.strip().to_numpy()
        condition_source = pd.Series(pd.Categorical(raw_values))
        mapped = [study.condition.values.get(v) for v in raw_values]
        condition = pd.Series(pd.Categorical(mapped, categories=list(condition_levels)))
    return pd.DataFrame({
        "study": study.accession,
        "sample": sample.sample,
        "sample_name": sample.sample_name,
        "barcode": sample.cell_names,
        "condition": condition.array,
        "condition_source": condition_source.array,
    })


def _rows_by_well_and_plate(study: Study, sample: SampleCounts, metadata: pd.DataFrame) -> np.ndarray:
    join = study.metadata
    for column in (join.well_column, join.plate_column):
        if column not in metadata.columns:
            raise ScgrnInputError(f"has no column {column!r} to join cells on", study=study.accession, file=join.file,
                                  fix="set metadata.well_column / plate_column in the catalog")
    keys = (metadata[join.well_column].str.strip().str.upper() + "." +
            metadata[join.plate_column].map(normalise_plate_id))
    lookup = pd.Series(metadata.index, index=keys)
    lookup = lookup[~lookup.index.duplicated()]
    cell_keys = [f"{w}.{p}" for w, p in zip(sample.cell_names, sample.cell_plates)]
    rows = lookup.reindex(cell_keys)
    missing = rows.isna()
    if missing.any():
        examples = [k for k, m in zip(cell_keys, missing) if m][:3]
        raise ScgrnInputError(f"{int(missing.sum())} of {len(cell_keys)} cells of {sample.sample} have no "
                              f"{join.well_column}+{join.plate_column} row (e.g. {examples})", study=study.accession,
                              file=join.file, fix="check that the metadata table belongs to this study's counts")
    return rows.to_numpy(dtype=np.int64)
