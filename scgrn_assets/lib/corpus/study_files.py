"""A study's ``.h5ad`` as the corpus reads it: obs and var alone, or X in blocks of rows.

Blocks come straight from the CSR arrays, so memory stays bounded whatever the study's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset


CHUNK_CELLS = 20_000
# Stored values read per block when combining (about 100 MB of int32 + float32 arrays in flight).
BLOCK_VALUES = 8 << 20


def read_study_frames(path: Path, parts: tuple[str, ...] = ("obs", "var")) -> tuple[pd.DataFrame, ...]:
    """The named frames (``obs``, ``var``) of a study's .h5ad, read without loading its counts."""
    with h5py.File(path, "r") as handle:
        return tuple(ad.io.read_elem(handle[part]) for part in parts)


def read_study_obs(path: Path) -> pd.DataFrame:
    """obs of an .h5ad, read without loading its counts."""
    return read_study_frames(path, ("obs",))[0]


def study_gene_names(path: Path) -> list[str]:
    """Gene symbols of a study's .h5ad, read without loading its counts."""
    return read_study_frames(path, ("var",))[0].index.tolist()


@dataclass
class CsrBlock:
    """A range of consecutive rows of a study's X (CSR arrays local to the range) and which of
    them are selected; only the selected rows count."""

    indptr: np.ndarray          # int64, starts at 0, one entry per row of the range + 1
    indices: np.ndarray
    data: np.ndarray | None     # None when only the indices were asked for
    selected: np.ndarray        # int64 positions of the selected rows within the range, ascending
    n_columns: int

    @property
    def n_rows(self) -> int:
        """Selected rows."""
        return len(self.selected)

    def to_scipy(self) -> sp.csr_matrix:
        """The selected rows as a scipy CSR matrix (of a block read without reused buffers)."""
        matrix = sp.csr_matrix((self.data, self.indices, self.indptr), shape=(len(self.indptr) - 1, self.n_columns))
        return matrix if len(self.selected) == len(self.indptr) - 1 else matrix[self.selected]


class BlockBuffers:
    """Arrays reused block after block: fresh memory costs page faults, which are slow on shared VMs."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype) -> np.ndarray:
        array = self.arrays.get(name)
        if array is None or array.shape[0] < size or array.dtype != np.dtype(dtype):
            array = self.arrays[name] = np.empty(max(size, 1), dtype=dtype)
        return array[:size]


def iter_csr_blocks(path: Path, rows: np.ndarray | None = None, *, max_rows: int = CHUNK_CELLS,
                     max_values: int | None = BLOCK_VALUES, with_data: bool = True,
                     buffers: BlockBuffers | None = None):
    """Yield the selected rows (ascending; default all) of an .h5ad's X as :class:`CsrBlock`s.

    A CSR X (what anndata and :func:`write_study_h5ad` write) is read straight from its three
    HDF5 datasets in large contiguous ranges: no per-row work, no scipy fancy indexing, and the
    data not read at all when only the indices are needed. Any other X (dense, CSC) goes through
    anndata. A block holds at most ``max_rows`` selected rows and, unless one row alone is larger,
    ``max_values`` stored values (None: no limit), so memory stays bounded whatever the study's
    size. With ``buffers``, blocks are read into the same arrays each time: a block is then valid
    only until the next one is asked for.
    """
    with h5py.File(path, "r") as handle:
        x = handle["X"]
        n_rows, n_columns = (int(v) for v in (x.attrs["shape"] if isinstance(x, h5py.Group) else x.shape))
        rows = np.arange(n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        if np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be strictly increasing")
        if not (isinstance(x, h5py.Group) and x.attrs.get("encoding-type") == "csr_matrix"):
            matrix = sparse_dataset(x) if isinstance(x, h5py.Group) else x
            for start in range(0, len(rows), max_rows):
                selected = rows[start:start + max_rows]
                block = sp.csr_matrix(matrix[int(selected[0]):int(selected[-1]) + 1])
                yield CsrBlock(block.indptr.astype(np.int64), block.indices, block.data if with_data else None,
                                selected - selected[0], n_columns)
            return
        indptr = x["indptr"][:].astype(np.int64)
        indices_ds, data_ds = x["indices"], x["data"]
        position = 0
        while position < len(rows):
            # Source rows [first, last] hold selected rows position..end-1: at most max_rows of them and,
            # unless the first alone is larger, at most max_values stored values in the range read.
            first = int(rows[position])
            end = min(len(rows), position + max_rows)
            if max_values is not None:
                n_fitting = int(np.searchsorted(indptr[rows[position:end] + 1], indptr[first] + max_values, "right"))
                end = position + max(1, n_fitting)
            last = int(rows[end - 1])
            start_value, stop_value = int(indptr[first]), int(indptr[last + 1])
            if buffers is None:
                indices = indices_ds[start_value:stop_value]
                data = data_ds[start_value:stop_value] if with_data else None
            else:
                indices = buffers.get("indices", stop_value - start_value, indices_ds.dtype)
                data = buffers.get("data", stop_value - start_value, data_ds.dtype) if with_data else None
                if stop_value > start_value:
                    indices_ds.read_direct(indices, np.s_[start_value:stop_value])
                    if with_data:
                        data_ds.read_direct(data, np.s_[start_value:stop_value])
            yield CsrBlock(indptr[first:last + 2] - start_value, indices, data, rows[position:end] - first,
                            n_columns)
            position = end


def iter_row_chunks(path: Path, rows: np.ndarray | None = None, chunk_cells: int = CHUNK_CELLS):
    """Yield CSR blocks of the selected rows (default: all; ascending) of an .h5ad's X, ``chunk_cells`` at a time."""
    for block in iter_csr_blocks(path, rows, max_rows=chunk_cells, max_values=None):
        yield block.to_scipy()
