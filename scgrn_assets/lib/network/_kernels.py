"""Numba kernels of the network stage: the per-cell partial-correlation read-out, the dense
per-pair moment updates, the cross-cell outer products (Chan et al.'s parallel formula; Welford's update for one value)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def negated_scaled_triangle(memory: np.ndarray, n_valid: int, slot_map: np.ndarray, out: np.ndarray) -> None:
    """Read a cell's partial correlations out of its precision matrix in triangle form, one pass.

    ``out[t] = −m_rs / √(m_rr·m_ss)`` for pair ``t = (a, b)`` of the triangle form, with
    ``r = slot_map[a]``, ``s = slot_map[b]``; pairs with a negative map entry (invalid slots)
    are not written. ``memory`` is the k × k precision matrix of which only entries
    ``r·k + s`` with ``r ≤ s`` are read (the lower triangle of a Fortran-ordered LAPACK result).
    """
    inverse_sqrt_diagonal = np.empty(n_valid, dtype=memory.dtype)
    for r in range(n_valid):
        inverse_sqrt_diagonal[r] = 1.0 / np.sqrt(memory[r * (n_valid + 1)])
    for b in range(1, slot_map.shape[0]):
        s = slot_map[b]
        if s < 0:
            continue
        base = b * (b - 1) // 2
        scale_s = -inverse_sqrt_diagonal[s]
        for a in range(b):
            r = slot_map[a]
            if r < 0:
                continue
            value = memory[r * n_valid + s] if r < s else memory[s * n_valid + r]
            out[base + a] = value * scale_s * inverse_sqrt_diagonal[r]


@numba.njit(cache=True, nogil=True)
def chan_update_one(count: np.ndarray, mean: np.ndarray, m2: np.ndarray, key: int, value: float) -> None:
    """Chan et al.'s merge of one observation (n_b = 1, M2_b = 0) into pair ``key``: Welford's update.

    ``n = n_a + 1``, ``δ = x − mean_a``, ``mean = mean_a + δ/n``,
    ``M2 = M2_a + δ²·n_a/n = M2_a + δ·(x − mean)``.
    """
    n = count[key] + 1.0
    delta = value - mean[key]
    new_mean = mean[key] + delta / n
    count[key] = n
    mean[key] = new_mean
    m2[key] += delta * (value - new_mean)


@numba.njit(cache=True, nogil=True)
def chan_update_pairs(count, mean, m2, keys, values) -> None:
    for index in range(keys.shape[0]):
        chan_update_one(count, mean, m2, keys[index], values[index])


@numba.njit(cache=True, nogil=True)
def chan_merge_pairs(count, mean, m2, keys, n_b, mean_b, m2_b) -> None:
    """Chan et al.'s merge of part ``t`` (``n_b[t]``, ``mean_b[t]``, ``M2_b[t]``) into pair ``keys[t]``.

    ``n = n_a + n_b``, ``δ = mean_b − mean_a``, ``mean = mean_a + δ·n_b/n``,
    ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``; parts with ``n_b = 0`` change nothing.
    """
    for index in range(keys.shape[0]):
        if n_b[index] == 0:
            continue
        key = keys[index]
        if n_b[index] == 1:  # a single value: Welford's form, like chan_update_one and the hash map
            chan_update_one(count, mean, m2, key, mean_b[index])
            m2[key] += m2_b[index]
            continue
        n_a = count[key]
        n = n_a + n_b[index]
        delta = mean_b[index] - mean[key]
        share = n_b[index] / n
        count[key] = n
        mean[key] += delta * share
        m2[key] += m2_b[index] + delta * delta * n_a * share


@numba.njit(cache=True, nogil=True)
def chan_update_triangles(count, mean, m2, high_offset, sorted_genes, n_valid, values) -> None:
    """Every valid pair of every cell, in triangle order
    (:func:`~scgrn_assets.lib.network.partial_correlation.triangle_pairs`), one pass."""
    for cell in range(sorted_genes.shape[0]):
        pair = 0
        for j in range(1, n_valid[cell]):
            base = high_offset[sorted_genes[cell, j]]
            for i in range(j):
                chan_update_one(count, mean, m2, base + sorted_genes[cell, i], values[cell, pair])
                pair += 1


@numba.njit(cache=True, nogil=True)
def touched_pairs(count, mean, m2, high_offset, low_out, high_out, count_out, mean_out, m2_out) -> None:
    """Pairs with a count, written in (low, high) order: the layout (rows = high) transposed.

    First the pairs per low gene (one sequential pass), then the layout is read in tiles of
    64 lows (short sequential runs per row) and each low's pairs are written where they go.
    """
    n_genes = high_offset.shape[0] - 1
    start = np.zeros(n_genes + 1, dtype=np.int64)
    for high in range(n_genes):
        base = high_offset[high]
        for low in range(high):
            if count[base + low] != 0:
                start[low + 1] += 1
    for low in range(n_genes):
        start[low + 1] += start[low]
    tile = 64
    for first in range(0, n_genes, tile):
        last = min(first + tile, n_genes)
        for high in range(first + 1, n_genes):
            base = high_offset[high]
            for low in range(first, min(last, high)):
                key = base + low
                if count[key] != 0:
                    position = start[low]
                    start[low] += 1
                    low_out[position] = low
                    high_out[position] = high
                    count_out[position] = count[key]
                    mean_out[position] = mean[key]
                    m2_out[position] = m2[key]


# Cross-cell moments (:mod:`.feature_moments`). Output rows per tile of the sparse loop: 16 rows of a 3,000-gene universe (384 kB) stay in L2 while
# every cell of the chunk streams past; measured best of 8-128 (CPU time, 2,048-cell chunks).
SPARSE_TILE_ROWS = 16


@numba.njit(cache=True, nogil=True)
def add_sparse_outer_products(indptr, indices, data, cross_rows, tile_rows, shard, n_shards):
    """Σ_c x_c x_cᵀ, the upper triangle, over CSR rows with sorted column indices, one tile of output rows at a time.

    For each tile of ``tile_rows`` output rows (tiles ``t % n_shards == shard``: shards write
    disjoint rows, so threads never collide), every cell adds, for each of its genes ``i`` in the
    tile, ``x_ci · x_cj`` for its genes ``j ≥ i`` (the rest of its sorted CSR row). A per-cell
    cursor walks each row once over all tiles. The tile stays in cache while the cells stream past,
    and a cell's row is read once per tile rather than once per gene: walking cell by cell instead
    scatters nnz²/2 adds per cell over the whole n_genes² matrix (measured 4-10x slower).
    """
    n_genes = cross_rows.shape[0]
    n_cells = len(indptr) - 1
    cursor = indptr[:-1].copy()
    n_tiles = (n_genes + tile_rows - 1) // tile_rows
    for tile in range(n_tiles):
        row_stop = min((tile + 1) * tile_rows, n_genes)
        mine = tile % n_shards == shard
        for cell in range(n_cells):
            stop = indptr[cell + 1]
            b = cursor[cell]
            while b < stop and indices[b] < row_stop:
                if mine:
                    value = data[b]
                    row = indices[b]
                    for a in range(b, stop):
                        cross_rows[row, indices[a]] += value * data[a]
                b += 1
            cursor[cell] = b


@numba.njit(cache=True, nogil=True)
def symmetrised_from_upper(upper):
    """A new C-ordered symmetric matrix from the upper triangle of ``upper`` (any memory order)."""
    n = upper.shape[0]
    full = np.empty((n, n))
    for i in range(n):
        full[i, i] = upper[i, i]
        for j in range(i + 1, n):
            full[i, j] = upper[i, j]
            full[j, i] = upper[i, j]
    return full
