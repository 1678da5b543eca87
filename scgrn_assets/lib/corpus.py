"""The combined corpus: every study's cells over the union of genes, QC-filtered, as AnnData Zarr.

Studies are streamed in row chunks from their ``.h5ad`` files and appended to the Zarr
store, so memory stays bounded by one chunk (plus ``obs``), whatever the corpus size.
Genes a study did not measure are zero in its cells (sparse padding); which study
measured which gene is kept in ``var["measured_in_<study>"]`` so models can tell a
padded zero from an observed one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import sparse_dataset, write_elem

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path

CHUNK_CELLS = 20_000


@dataclass(frozen=True)
class QCThresholds:
    """Cell and gene filters applied when combining. Defaults suit UMI and plate data alike."""

    min_counts_per_cell: int = 500     # library size over all of the study's genes
    min_genes_per_cell: int = 100      # genes detected (count > 0)
    min_cells_per_gene: int = 3        # a gene detected in fewer cells carries no signal


@dataclass
class CorpusSummary:
    n_cells: int
    n_genes: int
    n_nonzero: int
    cells_per_study: dict[str, int]
    cells_removed_by_qc: dict[str, int]
    genes_removed_by_qc: list[str]
    union_genes: list[str]

    @property
    def sparsity(self) -> float:
        total = self.n_cells * self.n_genes
        return 1.0 - self.n_nonzero / total if total else 1.0


def measured_column(study: str) -> str:
    return f"measured_in_{study}"


def _read_study_frames(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with h5py.File(path, "r") as handle:
        obs = ad.io.read_elem(handle["obs"])
        var = ad.io.read_elem(handle["var"])
    return obs, var


def read_study_obs(path: Path) -> pd.DataFrame:
    """obs of an .h5ad, read without loading its counts."""
    with h5py.File(path, "r") as handle:
        return ad.io.read_elem(handle["obs"])


def study_gene_names(path: Path) -> list[str]:
    """Gene symbols of a study's .h5ad, read without loading its counts."""
    with h5py.File(path, "r") as handle:
        return ad.io.read_elem(handle["var"]).index.tolist()


def iter_row_chunks(path: Path, rows: np.ndarray | None = None, chunk_cells: int = CHUNK_CELLS):
    """Yield CSR blocks of the selected rows (default: all) of an .h5ad's X, ``chunk_cells`` at a time."""
    with h5py.File(path, "r") as handle:
        if rows is None:
            rows = np.arange(handle["X"].attrs["shape"][0])
        matrix = sparse_dataset(handle["X"])
        for start in range(0, len(rows), chunk_cells):
            selected = rows[start:start + chunk_cells]
            # Contiguous slice then local selection: backed sparse reads are fastest by range.
            block = matrix[int(selected[0]):int(selected[-1]) + 1]
            yield sp.csr_matrix(block[selected - selected[0]])


def combine_studies(study_files: dict[str, Path], output: Path, *, gene_annotation: pd.DataFrame | None = None,
                    qc: QCThresholds = QCThresholds(), chunk_cells: int = CHUNK_CELLS,
                    progress: Callable[[str, int, int], None] | None = None) -> CorpusSummary:
    """Combine per-study AnnData files into one AnnData Zarr store at ``output`` (atomically).

    Parameters
    ----------
    study_files
        ``{accession: path to .h5ad}``, in corpus order.
    gene_annotation
        Optional table indexed by gene symbol with ``gene_length_bp`` (and ``ensembl_id``).
    qc
        Filters; removed cells and genes are counted in the summary and in ``uns["qc"]``.
    progress
        Called as ``progress(study, cells_done, cells_total)``.
    """
    frames = {study: _read_study_frames(path) for study, path in study_files.items()}
    union = pd.Index(pd.unique(np.concatenate([var.index.to_numpy(dtype=object) for _, var in frames.values()])))

    # Cell QC needs only obs: n_counts and n_genes were computed per study over all its genes.
    keep_rows: dict[str, np.ndarray] = {}
    removed_cells: dict[str, int] = {}
    for study, (obs, _) in frames.items():
        if "n_counts" not in obs or "study" not in obs:
            raise ScgrnInputError("study AnnData lacks obs n_counts/study", study=study, file=str(study_files[study]),
                                  fix="re-materialise study_anndata for this study")
        passed = (obs["n_counts"].to_numpy() >= qc.min_counts_per_cell) & \
                 (obs["n_genes"].to_numpy() >= qc.min_genes_per_cell)
        keep_rows[study] = np.flatnonzero(passed)
        removed_cells[study] = int((~passed).sum())

    # Gene QC: detection counts over kept cells (one streamed pass).
    detected = np.zeros(len(union), dtype=np.int64)
    for study, path in study_files.items():
        positions = union.get_indexer(frames[study][1].index)
        for block in iter_row_chunks(path, keep_rows[study], chunk_cells):
            detected[positions] += np.bincount(block.indices, minlength=block.shape[1])
    keep_genes = detected >= qc.min_cells_per_gene
    genes = union[keep_genes]
    if len(genes) == 0 or sum(len(r) for r in keep_rows.values()) == 0:
        raise ScgrnInputError(f"QC removed every {'gene' if len(genes) == 0 else 'cell'} of the corpus",
                              fix=f"relax the QC thresholds ({qc})")

    var = _corpus_var(genes, frames, gene_annotation)
    var["n_cells_detected"] = detected[keep_genes]
    obs = pd.concat([frames[s][0].iloc[keep_rows[s]] for s in study_files], axis=0)
    obs = _corpus_obs(obs)
    uns = {"qc": {**asdict(qc), "cells_removed": removed_cells,
                  "genes_removed": union[~keep_genes].tolist()},
           "studies": list(study_files)}

    n_nonzero = 0
    with atomic_path(output) as tmp:
        # Zarr v2: readable by every zarr and anndata release our users have.
        store = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        store.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(store, "obs", obs)
        write_elem(store, "var", var)
        write_elem(store, "uns", uns)
        matrix = None
        for study, path in study_files.items():
            source_genes = frames[study][1].index
            kept = genes.get_indexer(source_genes)  # -1 for genes QC removed
            done = 0
            for block in iter_row_chunks(path, keep_rows[study], chunk_cells):
                aligned = align_columns(block, kept, len(genes))
                n_nonzero += aligned.nnz
                if matrix is None:
                    # Large chunks: appends then write few, big compressed blocks.
                    write_elem(store, "X", aligned, dataset_kwargs={"chunks": (1 << 20,)})
                    matrix = sparse_dataset(store["X"])
                else:
                    matrix.append(aligned)
                done += block.shape[0]
                if progress:
                    progress(study, done, len(keep_rows[study]))
        for name in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(store, name, {})
        zarr.consolidate_metadata(str(tmp))

    return CorpusSummary(n_cells=len(obs), n_genes=len(genes), n_nonzero=n_nonzero,
                         cells_per_study={s: len(r) for s, r in keep_rows.items()},
                         cells_removed_by_qc=removed_cells, genes_removed_by_qc=union[~keep_genes].tolist(),
                         union_genes=union.tolist())


def align_columns(block: sp.csr_matrix, column_map: np.ndarray, n_columns: int) -> sp.csr_matrix:
    """Move column j of ``block`` to ``column_map[j]`` (dropping columns mapped to -1), as float32.

    An index remap, not a sparse product: it touches each stored value once.
    """
    new_columns = column_map[block.indices]
    keep = new_columns >= 0
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    row_nnz = np.bincount(rows[keep], minlength=block.shape[0])
    indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    aligned = sp.csr_matrix((block.data[keep].astype(np.float32), new_columns[keep].astype(np.int32), indptr),
                            shape=(block.shape[0], n_columns))
    aligned.sort_indices()
    return aligned


def _corpus_obs(obs: pd.DataFrame) -> pd.DataFrame:
    columns = ["study", "sample", "sample_name", "barcode", "condition", "condition_source", "n_counts", "n_genes"]
    obs = obs[[c for c in columns if c in obs.columns]].copy()
    for column in ("study", "sample"):
        obs[column] = obs[column].astype(str).astype("category")
    levels = next((list(o.cat.categories) for o in [obs["condition"]] if hasattr(o, "cat")), ["control", "AD"])
    obs["condition"] = pd.Categorical(obs["condition"].astype(object).where(obs["condition"].notna(), None),
                                      categories=levels)
    return obs


def _corpus_var(genes: pd.Index, frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
                gene_annotation: pd.DataFrame | None) -> pd.DataFrame:
    var = pd.DataFrame(index=genes.astype(str))
    var["gene_symbol"] = var.index
    ensembl = pd.Series(None, index=var.index, dtype=object)
    for study, (_, study_var) in frames.items():
        known = study_var["ensembl_id"].astype(object).dropna() if "ensembl_id" in study_var else pd.Series(dtype=object)
        known = known[known.index.isin(var.index)]
        ensembl.loc[known.index] = ensembl.loc[known.index].fillna(known)
        var[measured_column(study)] = var.index.isin(study_var.index)
    length = pd.Series(np.nan, index=var.index)
    if gene_annotation is not None:
        annotation = gene_annotation.reindex(var.index)
        length = annotation["gene_length_bp"].astype(float)
        if "ensembl_id" in annotation:
            ensembl = ensembl.fillna(annotation["ensembl_id"].astype(object))
    var["ensembl_id"] = pd.Categorical(ensembl)
    var["gene_length_bp"] = length.to_numpy()
    return var


def read_corpus(path: Path) -> ad.AnnData:
    """Open the combined corpus (AnnData Zarr) in memory."""
    if not Path(path).exists():
        raise ScgrnInputError(f"combined corpus {path} does not exist", fix="materialise combined_corpus first")
    return ad.read_zarr(str(path))
