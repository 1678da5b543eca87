"""The combined corpus: every study's cells over the union of genes, QC-filtered, as AnnData Zarr.

Studies are streamed in blocks of rows straight from the CSR arrays of their ``.h5ad`` files
(gene QC needs one pass over the indices, the values one more) and X's chunks are written as
they fill, so memory stays bounded by a few blocks (plus ``obs``), whatever the corpus size.
Genes a study did not measure are zero in its cells (sparse padding); which study
measured which gene is kept in ``var["measured_in_<study>"]`` so models can tell a
padded zero from an observed one.
"""

from __future__ import annotations

import queue
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numcodecs
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import write_elem

from scgrn_assets.lib.corpus._kernels import _align_kernel, _count_columns
from scgrn_assets.lib.corpus.study_files import (BLOCK_VALUES, CHUNK_CELLS, BlockBuffers, iter_csr_blocks,
                                                 iter_row_chunks, read_study_frames, read_study_obs, study_gene_names)
from scgrn_assets.lib.corpus.thresholds import QCThresholds
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.read_ahead import read_ahead
from scgrn_assets.lib.memory import release_free_memory
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.storage import atomic_path


# Values per chunk of the corpus' X data/indices: few, large, compressed chunks (16 MB before compression).
X_CHUNK_VALUES = 4 << 20


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


class _ChunkWriter:
    """Sequential values of a 1-D zarr v2 array, written chunk by chunk as the array's own chunk files.

    The array's metadata (``.zarray``: shape, chunks, dtype, compressor) is written by zarr;
    the chunks are not, because zarr's per-call machinery costs more than compressing a 16 MB
    chunk. Values are gathered in a one-chunk buffer; each full chunk is compressed with the
    array's compressor and written once (on ``pool``, while the next one fills), the last one
    padded with the fill value (zeros), as the zarr v2 format stores it.
    """

    def __init__(self, folder: Path, n_values: int, chunk: int, dtype, pool: ThreadPoolExecutor) -> None:
        self.folder = folder
        self.n_values = n_values
        self.pool = pool
        self.buffers = [np.zeros(chunk, dtype=dtype), np.zeros(chunk, dtype=dtype)]
        self.pending: list[Future | None] = [None, None]
        self.current = 0
        self.n_buffered = 0
        self.n_chunks = 0
        self.position = 0

    def write(self, values: np.ndarray) -> None:
        done = 0
        while done < len(values):
            buffer = self.buffers[self.current]
            n = min(len(values) - done, len(buffer) - self.n_buffered)
            buffer[self.n_buffered:self.n_buffered + n] = values[done:done + n]
            self.n_buffered += n
            done += n
            if self.n_buffered == len(buffer):
                self._flush()

    def close(self) -> None:
        if self.n_buffered:
            self.buffers[self.current][self.n_buffered:] = 0
            self._flush()
        for future in self.pending:
            if future is not None:
                future.result()
        if self.position != self.n_values:
            raise AssertionError(f"wrote {self.position} of {self.n_values} values to {self.folder.name}")

    def _flush(self) -> None:
        path = self.folder / str(self.n_chunks)
        self.pending[self.current] = self.pool.submit(_write_chunk, path, self.buffers[self.current])
        self.n_chunks += 1
        self.position += self.n_buffered
        self.n_buffered = 0
        self.current = 1 - self.current
        if self.pending[self.current] is not None:  # the other buffer's chunk must be on disk before reuse
            self.pending[self.current].result()
            self.pending[self.current] = None


def _write_chunk(path: Path, values: np.ndarray) -> None:
    path.write_bytes(_compressor().encode(values))


def combine_studies(study_files: dict[str, Path], output: Path, *, gene_annotation: pd.DataFrame | None = None,
                    qc: QCThresholds = QCThresholds(), chunk_cells: int = CHUNK_CELLS,
                    progress: Progress | None = None) -> CorpusSummary:
    """Combine per-study AnnData files into one AnnData Zarr store at ``output`` (atomically).

    Parameters
    ----------
    study_files
        ``{accession: path to .h5ad}``, in corpus order.
    gene_annotation
        Optional table indexed by gene symbol with ``gene_length_bp`` (and ``ensembl_id``).
    qc
        Filters; removed cells and genes are counted in the summary and in ``uns["qc"]``.
    chunk_cells
        Most cells read and written at a time (memory is also bounded by stored values).
    progress
        Called as ``progress(cells_done, cells_total, study=study)`` (counts within that study).

    Two streamed passes over each study's CSR arrays: the first counts, per gene, the kept
    cells that store it (gene QC, and the corpus' exact number of stored values); the second
    moves each value's column to its corpus gene (a lookup table, no per-cell work) and
    writes X's ``data``/``indices`` in large chunk-aligned blocks.
    """
    frames = {study: read_study_frames(path) for study, path in study_files.items()}
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

    # Gene QC: stored values per gene over kept cells (one streamed pass over the indices only).
    detected = np.zeros(len(union), dtype=np.int64)
    buffers = BlockBuffers()
    for study, path in study_files.items():
        positions = union.get_indexer(frames[study][1].index)
        study_detected = np.zeros(len(positions), dtype=np.int64)
        for block in iter_csr_blocks(path, keep_rows[study], max_rows=chunk_cells, max_values=BLOCK_VALUES,
                                     with_data=False, buffers=buffers):
            if not _count_columns(block.indptr, block.indices, block.selected, study_detected):
                raise _index_error(len(positions), study, path)
        detected[positions] += study_detected
    del buffers
    release_free_memory()
    keep_genes = detected >= qc.min_cells_per_gene
    genes = union[keep_genes]
    if sum(len(r) for r in keep_rows.values()) == 0:
        raise _every_cell_removed(frames, qc)
    if len(genes) == 0:
        raise ScgrnInputError(
            f"QC removed every gene of the corpus: no gene is detected in min_cells_per_gene="
            f"{qc.min_cells_per_gene} of the {sum(len(r) for r in keep_rows.values())} cells that passed cell QC "
            f"(the most any gene reaches is {int(detected.max(initial=0))})",
            fix="lower min_cells_per_gene under the catalog's qc: (e.g. qc: {min_cells_per_gene: 1})")

    var = _corpus_var(genes, frames, gene_annotation)
    var["n_cells_detected"] = detected[keep_genes]
    # Studies that lost every cell to QC add no rows. A study whose metadata column is all NA (no
    # condition rule) is still concatenated: pandas' notice about its dtype says nothing to act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The behavior of DataFrame concatenation with empty or all-NA",
                                category=FutureWarning)
        obs = pd.concat([frames[s][0].iloc[keep_rows[s]] for s in study_files if len(keep_rows[s])] or
                        [frames[s][0].iloc[:0] for s in study_files][:1], axis=0)
    obs = _corpus_obs(obs)
    uns = {"qc": {**asdict(qc), "cells_removed": removed_cells,
                  "genes_removed": union[~keep_genes].tolist()},
           "studies": list(study_files)}

    n_nonzero = int(detected[keep_genes].sum())
    chunk = max(1, min(X_CHUNK_VALUES, n_nonzero))
    indptr_chunk = max(1, min(X_CHUNK_VALUES, len(obs) + 1))
    x_attrs = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [len(obs), len(genes)]}
    x_arrays = (("data", n_nonzero, chunk, np.float32), ("indices", n_nonzero, chunk, np.int32),
                ("indptr", len(obs) + 1, indptr_chunk, np.int64))
    with atomic_path(output) as tmp, ThreadPoolExecutor(max_workers=2, thread_name_prefix="combine") as pool:
        for name, *_ in x_arrays:
            (tmp / "X" / name).mkdir(parents=True)
        # obs, var, uns and all metadata are written by a thread while X's values stream below.
        metadata_written = pool.submit(_write_metadata, tmp, obs, var, uns, x_attrs, x_arrays)
        try:
            data = _ChunkWriter(tmp / "X" / "data", n_nonzero, chunk, np.float32, pool)
            indices = _ChunkWriter(tmp / "X" / "indices", n_nonzero, chunk, np.int32, pool)
            indptr = np.zeros(len(obs) + 1, dtype=np.int64)
            n_rows = n_values = 0
            done = dict.fromkeys(study_files, 0)
            # Blocks are read and aligned in a thread while the previous ones are compressed and written;
            # their arrays go round a small pool instead of being allocated block after block.
            free: queue.SimpleQueue = queue.SimpleQueue()

            def aligned_blocks():
                read_buffers = BlockBuffers()
                for study, path in study_files.items():
                    column_map = genes.get_indexer(frames[study][1].index).astype(np.int32)  # -1: removed by QC
                    for block in iter_csr_blocks(path, keep_rows[study], max_rows=chunk_cells,
                                                 max_values=BLOCK_VALUES, buffers=read_buffers):
                        try:
                            out = free.get_nowait()
                        except queue.Empty:
                            out = BlockBuffers()
                        yield study, out, align_csr(block.indptr, block.indices, block.data, column_map,
                                                    selected=block.selected, out=out, study=study, file=str(path))

            for study, out, (block_indptr, block_indices, block_data) in read_ahead(aligned_blocks(), depth=1,
                                                                                    name="combine-read"):
                data.write(block_data)
                indices.write(block_indices)
                n_block_rows = len(block_indptr) - 1
                indptr[n_rows + 1:n_rows + n_block_rows + 1] = block_indptr[1:] + n_values
                n_rows += n_block_rows
                n_values += len(block_indices)
                free.put(out)
                done[study] += n_block_rows
                report(progress, done[study], len(keep_rows[study]), study=study)
            data.close()
            indices.close()
            if n_rows != len(obs) or n_values != n_nonzero:
                raise AssertionError(f"combine wrote {n_rows} cells / {n_values} values, expected {len(obs)} / "
                                     f"{n_nonzero}")
            indptr_writer = _ChunkWriter(tmp / "X" / "indptr", len(indptr), indptr_chunk, np.int64, pool)
            indptr_writer.write(indptr)
            indptr_writer.close()
        finally:
            wait([metadata_written])  # never leave a thread writing into a folder about to be removed
        metadata_written.result()

    return CorpusSummary(n_cells=len(obs), n_genes=len(genes), n_nonzero=n_nonzero,
                         cells_per_study={s: len(r) for s, r in keep_rows.items()},
                         cells_removed_by_qc=removed_cells, genes_removed_by_qc=union[~keep_genes].tolist(),
                         union_genes=union.tolist())


def _every_cell_removed(frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], qc: QCThresholds) -> ScgrnInputError:
    """The error for a corpus that cell QC emptied, naming the threshold(s) that did it and how far off they are."""
    n_counts = np.concatenate([obs["n_counts"].to_numpy() for obs, _ in frames.values()])
    n_genes = np.concatenate([obs["n_genes"].to_numpy() for obs, _ in frames.values()])
    reasons = []
    if (n_counts < qc.min_counts_per_cell).any():
        reasons.append(f"{int((n_counts < qc.min_counts_per_cell).sum())} have fewer than min_counts_per_cell="
                       f"{qc.min_counts_per_cell} counts (the largest library has {int(n_counts.max(initial=0))})")
    if (n_genes < qc.min_genes_per_cell).any():
        reasons.append(f"{int((n_genes < qc.min_genes_per_cell).sum())} detect fewer than min_genes_per_cell="
                       f"{qc.min_genes_per_cell} genes (the most any cell detects is {int(n_genes.max(initial=0))})")
    return ScgrnInputError(
        f"QC removed every cell of the corpus: of {len(n_counts)} cells, {' and '.join(reasons) or 'none pass'}",
        fix="lower that threshold under the catalog's qc: (e.g. qc: {min_counts_per_cell: 100, "
            "min_genes_per_cell: 50})")


def _write_metadata(folder: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict, x_attrs: dict,
                    x_arrays: tuple) -> None:
    """Everything of the corpus store but X's chunks: obs, var, uns, X's group and array metadata,
    the consolidated metadata. Zarr v2: readable by every zarr and anndata release our users have.

    Built in memory, then written out as files in one go: zarr's per-operation cost on a local
    folder is the larger part of writing some hundred small arrays.
    """
    metadata: dict = {}
    root = zarr.open_group(zarr.storage.MemoryStore(metadata), mode="w", zarr_format=2)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    write_elem(root, "obs", obs)
    write_elem(root, "var", var)
    write_elem(root, "uns", uns)
    x = root.create_group("X")  # anndata's csr_matrix encoding
    x.attrs.update(x_attrs)
    for name, size, chunk_size, dtype in x_arrays:
        x.create_array(name, shape=(size,), chunks=(chunk_size,), dtype=dtype, fill_value=0,
                       compressors=_compressor())
    for name in ("obsm", "varm", "obsp", "varp", "layers"):
        write_elem(root, name, {})
    zarr.consolidate_metadata(root.store)
    for key, value in metadata.items():
        path = folder.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value.to_bytes())


def _compressor() -> numcodecs.Blosc:
    # Blosc lz4 + byte shuffle, anndata's default for zarr v2 stores: ~600 MB/s to compress on
    # one core, ~3x smaller for counts.
    return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)


def align_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, column_map: np.ndarray, *,
              selected: np.ndarray | None = None, out: BlockBuffers | None = None, study: str | None = None,
              file: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (of the ``selected`` rows; default all) with column j moved to ``column_map[j]``
    (columns mapped to -1 dropped); values as float32.

    An index remap in one compiled pass, not a sparse product, and no per-cell Python. Rows
    come out with sorted columns (sorted here only when the source or the map leaves them not).
    With ``out``, the results are views of its arrays.
    """
    selected = np.arange(len(indptr) - 1, dtype=np.int64) if selected is None else selected
    out = out if out is not None else BlockBuffers()
    n_stored = int(indptr[selected + 1].sum() - indptr[selected].sum()) if len(selected) else 0
    out_indptr = out.get("indptr", len(selected) + 1, np.int64)
    out_indices = out.get("indices", n_stored, np.int32)
    out_data = out.get("data", n_stored, np.float32)
    n_values, status = _align_kernel(indptr, indices, data, selected, column_map, out_indptr, out_indices,
                                     out_data)
    if status == 2:
        raise _index_error(len(column_map), study, file)
    out_indices, out_data = out_indices[:n_values], out_data[:n_values]
    if status == 1:
        matrix = sp.csr_matrix((out_data, out_indices, out_indptr),
                               shape=(len(selected), int(out_indices.max()) + 1))
        matrix.sort_indices()
        out_indices, out_data = matrix.indices.astype(np.int32, copy=False), matrix.data
    return out_indptr, out_indices, out_data


def _index_error(n_genes: int, study: str | None, file) -> ScgrnInputError:
    return ScgrnInputError(f"X holds a gene index outside its {n_genes} genes", study=study,
                           file=str(file) if file is not None else None,
                           fix="re-materialise study_anndata for this study")


def _corpus_obs(obs: pd.DataFrame) -> pd.DataFrame:
    columns = ["study", "sample", "sample_name", "animal", "barcode", "condition", "condition_source", "n_counts",
               "n_genes"]
    obs = obs[[c for c in columns if c in obs.columns]].copy()
    # Columns of few distinct values as categoricals: smaller, and faster to write and read than strings.
    for column in ("study", "sample", "sample_name", "animal"):
        if column in obs:
            obs[column] = obs[column].astype(str).astype("category")
    if "condition_source" in obs:  # unknown stays NA
        source = obs["condition_source"].astype(object)
        obs["condition_source"] = pd.Categorical(source.where(source.notna(), None))
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
            ensembl = ensembl.where(ensembl.notna(), annotation["ensembl_id"].astype(object))
    var["ensembl_id"] = pd.Categorical(ensembl)
    var["gene_length_bp"] = length.to_numpy()
    return var


def read_corpus(path: Path) -> ad.AnnData:
    """Open the combined corpus (AnnData Zarr) in memory."""
    if not Path(path).exists():
        raise ScgrnInputError(f"combined corpus {path} does not exist", fix="materialise combined_corpus first")
    return ad.read_zarr(str(path))


__all__ = ["CorpusSummary", "measured_column", "combine_studies", "align_csr", "read_corpus",
           # A study's .h5ad is read in study_files.py; importable from here too.
           "read_study_obs", "study_gene_names", "iter_row_chunks", "QCThresholds"]
