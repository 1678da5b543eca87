"""Numba kernels of the corpus build (:mod:`.build`): per-gene counts of kept cells, and column remapping."""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True)
def _count_columns(indptr, indices, selected, counts):  # pragma: no cover - compiled
    """counts[j] += stored values of column j in the selected rows; False on an index out of range."""
    n_columns = counts.shape[0]
    for row in selected:
        for k in range(indptr[row], indptr[row + 1]):
            column = indices[k]
            if column < 0 or column >= n_columns:
                return False
            counts[column] += 1
    return True


@numba.njit(cache=True, nogil=True)
def _align_kernel(indptr, indices, data, selected, column_map, out_indptr, out_indices,
                  out_data):  # pragma: no cover - compiled
    """One pass over the selected rows of a CSR range: remap columns, drop those mapped to -1,
    values to float32. Returns (values written, 0 if every row stays sorted / 1 if not / 2 on an
    index out of range)."""
    k = 0
    status = 0
    n_columns = column_map.shape[0]
    out_indptr[0] = 0
    for i in range(selected.shape[0]):
        row = selected[i]
        previous = -1
        for j in range(indptr[row], indptr[row + 1]):
            source = indices[j]
            if source < 0 or source >= n_columns:
                return k, 2
            column = column_map[source]
            if column >= 0:
                out_indices[k] = column
                out_data[k] = data[j]
                k += 1
                if column <= previous:
                    status = 1
                previous = column
        out_indptr[i + 1] = k
    return k, status
