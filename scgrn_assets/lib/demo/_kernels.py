"""Numba kernels of the demo's count sampler (:func:`simulator.sample_negative_binomial_outer`)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _negative_binomial_bursts(
    rng, sorted_sizes, gene_means, phi, bin_starts, bound_rate, n_bursts, dense_genes, dense_counts
):  # pragma: no cover - jitted
    """CSR parts (indptr, indices, data) of the counts of cells sorted by library size.

    Places the drawn bursts (thinned to each cell's own rate) and the dense genes' counts.
    Only ``rng.random`` is used here, which keeps numba's compile time short.
    """
    n_cells, n_genes = sorted_sizes.size, gene_means.size
    n_bins = bin_starts.size
    dense_column = np.full(n_genes, -1, dtype=np.int64)
    for column in range(dense_genes.size):
        dense_column[dense_genes[column]] = column
    max_bin = 1
    for b in range(n_bins):
        max_bin = max(max_bin, (bin_starts[b + 1] if b + 1 < n_bins else n_cells) - bin_starts[b])
    # Gene-major, so the bursts of one gene land in one cached row.
    counts_buffer = np.zeros((n_genes, max_bin), dtype=np.int32)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    indices = np.empty(0, dtype=np.int32)
    data = np.empty(0, dtype=np.int32)
    touched_cell = np.empty(0, dtype=np.int64)
    touched_gene = np.empty(0, dtype=np.int32)
    nnz = 0
    for b in range(n_bins):
        start = bin_starts[b]
        n_bin = (bin_starts[b + 1] if b + 1 < n_bins else n_cells) - start
        capacity = n_bursts[b].sum() + n_bin * dense_genes.size
        if touched_cell.size < capacity:
            touched_cell = np.empty(2 * capacity, dtype=np.int64)
            touched_gene = np.empty(2 * capacity, dtype=np.int32)
        n_touched = 0
        for gene in range(n_genes):
            if dense_column[gene] >= 0:
                for local_cell in range(n_bin):
                    count = dense_counts[start + local_cell, dense_column[gene]]
                    if count > 0:
                        touched_cell[n_touched] = local_cell
                        touched_gene[n_touched] = gene
                        n_touched += 1
                        counts_buffer[gene, local_cell] = count
                continue
            for _ in range(n_bursts[b, gene]):
                local_cell = min(int(rng.random() * n_bin), n_bin - 1)
                mean = sorted_sizes[start + local_cell] * gene_means[gene]
                scaled_mean = mean / phi[gene]
                threshold = rng.random() * bound_rate[b, gene] / phi[gene]
                # log1p(x) >= 2x / (2 + x) accepts most bursts without a logarithm.
                if threshold < 2.0 * scaled_mean / (2.0 + scaled_mean) or threshold < np.log1p(scaled_mean):
                    if counts_buffer[gene, local_cell] == 0:
                        touched_cell[n_touched] = local_cell
                        touched_gene[n_touched] = gene
                        n_touched += 1
                    counts_buffer[gene, local_cell] += _logseries(rng, mean / (mean + phi[gene]))
        if indices.size < nnz + n_touched:
            grown = max(2 * indices.size, nnz + n_touched)
            new_indices = np.empty(grown, dtype=np.int32)
            new_data = np.empty(grown, dtype=np.int32)
            new_indices[:nnz] = indices[:nnz]
            new_data[:nnz] = data[:nnz]
            indices, data = new_indices, new_data
        # Counting sort by cell; genes were visited in order, so each row comes out sorted.
        row_length = np.zeros(n_bin, dtype=np.int64)
        for k in range(n_touched):
            row_length[touched_cell[k]] += 1
        for local_cell in range(n_bin):
            indptr[start + local_cell + 1] = indptr[start + local_cell] + row_length[local_cell]
        cursor = indptr[start : start + n_bin].copy()
        for k in range(n_touched):
            local_cell, gene = touched_cell[k], touched_gene[k]
            position = cursor[local_cell]
            indices[position] = gene
            data[position] = counts_buffer[gene, local_cell]
            counts_buffer[gene, local_cell] = 0
            cursor[local_cell] += 1
        nnz += n_touched
    return indptr, indices[:nnz], data[:nnz]


@numba.njit(cache=True)
def _logseries(rng, p):  # pragma: no cover - jitted
    """One Logarithmic(p) draw (Kemp's algorithm, as numpy), skipping its logarithm for most draws."""
    while True:
        v = rng.random()
        if v >= p:  # the common case for small p: a burst of size 1
            return 1
        q = -np.expm1(np.log1p(-p) * rng.random())
        if v <= q * q:
            size = np.floor(1.0 + np.log(v) / np.log(q))
            if size >= 1.0 and v > 0.0:
                return int(size)
        elif v >= q:
            return 1
        else:
            return 2
