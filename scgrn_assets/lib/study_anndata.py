"""One study as an AnnData: read its samples, harmonise genes, join metadata, derive condition."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

from scgrn_assets.lib.archive import ExtractionLimits
from scgrn_assets.lib.catalog import Study
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.genes import harmonise_gene_ids, sum_duplicate_genes
from scgrn_assets.lib.readers import SampleCounts, normalise_plate_id, read_metadata_table, read_study_samples
from scgrn_assets.lib.storage import atomic_path


class GeneUnion:
    """The study's genes in order of first appearance, growing sample by sample.

    New genes are appended at the end, so column indices of rows already written stay
    valid: samples can be streamed to disk before the union is complete.
    """

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}
        self.ensembl: list[str | None] = []

    def __len__(self) -> int:
        return len(self.positions)

    def remap(self, counts: sp.csr_matrix, symbols: list[str], ensembl: list[str | None]) -> sp.csr_matrix:
        """``counts`` (columns = ``symbols``, unique) with columns moved to their union position."""
        for symbol, ensembl_id in zip(symbols, ensembl):
            if symbol not in self.positions:
                self.positions[symbol] = len(self.positions)
                self.ensembl.append(ensembl_id)
            elif ensembl_id and self.ensembl[self.positions[symbol]] is None:
                self.ensembl[self.positions[symbol]] = ensembl_id
        column_map = np.fromiter((self.positions[s] for s in symbols), dtype=np.int32, count=len(symbols))
        remapped = sp.csr_matrix((counts.data.astype(np.int32), column_map[counts.indices], counts.indptr),
                                 shape=(counts.shape[0], len(self.positions)))
        remapped.sort_indices()
        return remapped

    def var(self) -> pd.DataFrame:
        symbols = list(self.positions)
        # Categoricals store "unknown" as a missing code that every anndata version reads back.
        return pd.DataFrame({"gene_symbol": symbols, "ensembl_id": pd.Categorical(self.ensembl)},
                            index=pd.Index(symbols))


def iter_study_blocks(study: Study, raw_dir: Path, genes: GeneUnion, *,
                      condition_levels: tuple[str, str] = ("control", "AD"),
                      progress: Callable[[str], None] | None = None,
                      limits: ExtractionLimits = ExtractionLimits()) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
    """Yield each sample as (counts remapped into ``genes``, its obs rows), one sample in memory at a time.

    ``limits`` bound the archive and every decompressed file (decompression bombs).
    """
    metadata = read_metadata_table(raw_dir / study.metadata.file, study=study.accession, limits=limits)
    ensembl_to_symbol = _read_gene_map(study, raw_dir)
    for sample in read_study_samples(study, raw_dir, progress, limits=limits):
        _check_barcodes(study, sample)
        symbols, ensembl = harmonise_gene_ids(sample.gene_ids, gene_id_type=study.gene_id_type,
                                              symbols=sample.gene_symbols, strip_r=study.strip_r_prefix,
                                              ensembl_to_symbol=ensembl_to_symbol, study=study.accession,
                                              file=sample.source_file)
        counts, symbols, ensembl = sum_duplicate_genes(sample.counts, symbols, ensembl)
        obs = _join_cell_metadata(study, sample, metadata, condition_levels)
        obs["n_counts"] = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
        obs["n_genes"] = np.diff(counts.indptr).astype(np.int64)
        yield genes.remap(counts, symbols, ensembl), obs


def _finish_obs(study: Study, frames: list[pd.DataFrame], condition_levels: tuple[str, str]) -> pd.DataFrame:
    obs = pd.concat(frames, ignore_index=True)
    obs["condition"] = pd.Categorical(obs["condition"], categories=list(condition_levels))
    obs["condition_source"] = pd.Categorical(obs["condition_source"])
    obs.index = pd.Index(study.accession + ":" + obs["sample"].astype(str) + ":" + obs["barcode"].astype(str))
    return obs


def _study_uns(study: Study) -> dict:
    return {"study": {"accession": study.accession, "title": study.title, "species": study.species,
                      "format": study.format, "gene_id_type": study.gene_id_type}}


def build_study_anndata(study: Study, raw_dir: Path, *, condition_levels: tuple[str, str] = ("control", "AD"),
                        progress: Callable[[str], None] | None = None,
                        limits: ExtractionLimits = ExtractionLimits()) -> ad.AnnData:
    """Read, harmonise and annotate one study in memory (for notebooks and tests).

    Returns an AnnData with integer counts in ``X`` (CSR, int32, cells x genes), ``obs``
    columns ``study``, ``sample``, ``sample_name``, ``barcode``, ``condition`` (categorical,
    NA where unknown), ``condition_source`` (the metadata value the rule read),
    ``n_counts`` (total counts of the cell over all its genes) and ``n_genes`` (detected),
    and ``var`` indexed by gene symbol with ``gene_symbol`` and ``ensembl_id``.
    :func:`write_study_h5ad` writes the same object to disk without holding the study.
    """
    genes = GeneUnion()
    blocks, frames = [], []
    for block, obs in iter_study_blocks(study, raw_dir, genes, condition_levels=condition_levels, progress=progress,
                                        limits=limits):
        blocks.append(block)
        frames.append(obs)
    width = len(genes)
    counts = sp.vstack([sp.csr_matrix((b.data, b.indices, b.indptr), shape=(b.shape[0], width)) for b in blocks],
                       format="csr").astype(np.int32)
    adata = ad.AnnData(X=counts, obs=_finish_obs(study, frames, condition_levels), var=genes.var())
    adata.uns.update(_study_uns(study))
    return adata


def write_study_h5ad(study: Study, raw_dir: Path, output: Path, *,
                     condition_levels: tuple[str, str] = ("control", "AD"),
                     progress: Callable[[str], None] | None = None,
                     limits: ExtractionLimits = ExtractionLimits()) -> ad.AnnData:
    """Stream one study into an ``.h5ad`` at ``output`` (atomically); memory holds one sample.

    X is appended sample by sample as CSR (anndata's on-disk ``csr_matrix`` encoding);
    returns the written object's obs/var as an AnnData without X, for metadata.
    """
    genes = GeneUnion()
    frames: list[pd.DataFrame] = []
    with atomic_path(output) as tmp, h5py.File(tmp, "w") as handle:
        group = handle.create_group("X")
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = [np.zeros(1, dtype=np.int64)]
        n_values = 0
        for block, obs in iter_study_blocks(study, raw_dir, genes, condition_levels=condition_levels,
                                            progress=progress, limits=limits):
            data.resize((n_values + block.nnz,))
            indices.resize((n_values + block.nnz,))
            data[n_values:] = block.data
            indices[n_values:] = block.indices
            indptr.append(block.indptr[1:].astype(np.int64) + n_values)
            n_values += block.nnz
            frames.append(obs)
        obs = _finish_obs(study, frames, condition_levels)
        var = genes.var()
        group.create_dataset("indptr", data=np.concatenate(indptr))
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                            "shape": (len(obs), len(var))})
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", var)
        write_elem(handle, "uns", _study_uns(study))
        for name in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(handle, name, {})
        handle.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    return ad.AnnData(obs=obs, var=var)


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
