"""Gene networks from Geneformer attention: attention → partial correlation → streaming edge moments.

Per cell, the last layer's attention (summed over heads) is restricted to the genes present
(first occurrence, at most ``max_genes``, highest-ranked first); a partial correlation
matrix is computed from that gene × gene block by a named method; every gene pair's
value updates per-edge moments (n, mean, M2). Moments merge exactly with Chan et al.'s
parallel formula, so batches, studies and machines combine into one edge table.

On a GPU everything runs batched on torch. On the CPU the partial correlation runs one cell
at a time through LAPACK on one triangle (``syrk``/``potrf``/``potri``, no full matrices,
no symmetrising) and the moments through a numba loop, one pass over the values: about
2.5× less CPU time per cell there than the batched torch path (measured side by side).
Moments live in dense per-pair arrays for small gene universes and, for real corpora
(20-30k genes), in a numba open-addressing hash map holding only the pairs seen
(:mod:`scgrn_assets.lib.network.pair_moments`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numba
import numpy as np
import pandas as pd
import torch
from scipy import linalg as scipy_linalg
from threadpoolctl import threadpool_limits

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path
from scgrn_assets.lib.network.model import pick_device
from scgrn_assets.lib.network.pair_moments import DEFAULT_INITIAL_CAPACITY, DEFAULT_MAX_LOAD, PairMomentHashMap
from scgrn_assets.lib.network.tokens import GeneformerDictionaries, TokenizedCells

DEFAULT_MAX_GENES = 256
DEFAULT_SHRINKAGE = 1e-3
DEFAULT_MAX_DENSE_PAIRS = 2**24  # dense per-pair moment arrays up to 4,096 genes, the pair hash map above

# ---------------------------------------------------------------------------------------
# Partial correlation methods
# ---------------------------------------------------------------------------------------
#
# Two output forms. Full: (n_cells, n_slots, n_slots) matrices. Triangle: (n_cells, n_pairs)
# with n_pairs = n_slots·(n_slots − 1)/2, the strict upper triangle in column-major order:
# pair (i, j), i < j, sits at j·(j − 1)/2 + i. The pairs of the leading k × k block are the
# first k·(k − 1)/2, so a cell whose valid slots are a prefix fills a prefix of its row, and
# with slots sorted by gene the pairs come out in the dense accumulator's key order.


def triangle_pairs(n_slots: int, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot pairs of the triangle form: ``(rows[t], columns[t])``, ``rows < columns``, int64."""
    columns, rows = torch.tril_indices(n_slots, n_slots, offset=-1, device=device)
    return rows, columns


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _negated_scaled_triangle(memory: np.ndarray, n_valid: int, slot_map: np.ndarray, out: np.ndarray) -> None:
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


@functools.lru_cache(maxsize=None)
def _lapack_functions(dtype: np.dtype) -> tuple[Callable, Callable, Callable]:
    """``syrk``, ``potrf``, ``potri`` for ``dtype`` (looking them up costs milliseconds)."""
    syrk, = scipy_linalg.get_blas_funcs(("syrk",), dtype=dtype)
    potrf, potri = scipy_linalg.get_lapack_funcs(("potrf", "potri"), dtype=dtype)
    return syrk, potrf, potri


def _lapack_cosine_shrunk_pinv_triangle(blocks: np.ndarray, valid: np.ndarray, shrinkage: float,
                                        dtype: np.dtype, order: np.ndarray | None = None) -> np.ndarray:
    """Triangle-form partial correlation on the CPU, one cell at a time, LAPACK on one triangle.

    Per cell: unit rows U over the valid slots; ``dsyrk`` writes the lower triangle of
    ``(1 − λ)·U·Uᵀ`` (half the flops of a full product), λ goes on the diagonal, ``dpotrf``
    factors it and ``dpotri`` turns the factor into the lower triangle of the inverse.
    Nothing is symmetrised, permuted or copied to a full matrix: the triangle is read out in
    the output order (slots permuted by ``order``) directly. A cell whose factorisation fails
    falls back to ``numpy.linalg.pinv``. Blocks are cast to ``dtype`` one cell at a time (in
    cache), not as a whole batch.
    """
    n_cells, n_slots, _ = blocks.shape
    dtype = np.dtype(dtype)
    syrk, potrf, potri = _lapack_functions(dtype)
    out = np.zeros((n_cells, n_slots * (n_slots - 1) // 2), dtype=dtype)
    tiny = np.finfo(dtype).tiny
    counts = valid.sum(axis=1)
    # Row/column of each slot in the compressed k × k matrix of valid slots; -1 when invalid.
    compressed = np.where(valid, np.cumsum(valid, axis=1) - 1, -1)
    slot_maps = compressed if order is None else np.take_along_axis(compressed, order, axis=1)
    for cell in range(n_cells):
        n_valid = int(counts[cell])
        if n_valid < 2:
            continue
        if valid[cell, :n_valid].all():
            attention = blocks[cell, :n_valid, :n_valid]
        else:
            slots = np.flatnonzero(valid[cell])
            attention = blocks[cell][np.ix_(slots, slots)]
        attention = attention.astype(dtype, copy=False)
        norms = np.sqrt(np.einsum("ij,ij->i", attention, attention))
        unit_rows = attention / np.maximum(norms, tiny)[:, None]
        # unit_rows.T is Fortran-ordered (no copy); syrk(trans=1) gives (Uᵀ)ᵀ·Uᵀ = U·Uᵀ, Fortran-ordered.
        shrunk = syrk(1.0 - shrinkage, unit_rows.T, trans=1, lower=1)
        # Fortran memory: entry (row r ≥ column c) of the lower triangle sits at c·k + r, the
        # diagonal every k + 1; entry (r, s), r ≤ s, of the symmetric matrix is at r·k + s.
        memory = shrunk.reshape(-1, order="F")
        memory[:: n_valid + 1] += shrinkage
        factor, info = potrf(shrunk, lower=1, clean=0, overwrite_a=1)
        if info == 0:
            precision, info = potri(factor, lower=1, overwrite_c=1)
            memory = precision.reshape(-1, order="F")
        if info != 0:
            full = (1.0 - shrinkage) * (unit_rows @ unit_rows.T)
            full[np.diag_indices(n_valid)] += shrinkage
            memory = np.linalg.pinv(full, hermitian=True).reshape(-1)
        _negated_scaled_triangle(memory, n_valid, slot_maps[cell], out[cell])
    return out


def _torch_cosine_shrunk_pinv(blocks: torch.Tensor, valid: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Full-form partial correlation, batched on torch: one Cholesky per cell in a batched call."""
    all_valid = bool(valid.all())
    pair_valid = valid[:, :, None] & valid[:, None, :]
    if not all_valid:
        blocks = torch.where(pair_valid, blocks, torch.zeros((), dtype=blocks.dtype, device=blocks.device))
    row_norms = torch.linalg.vector_norm(blocks, dim=-1, keepdim=True)
    unit_rows = blocks / row_norms.clamp_min(torch.finfo(blocks.dtype).tiny)
    shrunk = unit_rows @ unit_rows.transpose(-1, -2)
    shrunk.mul_(1.0 - shrinkage).diagonal(dim1=-2, dim2=-1).add_(shrinkage)
    cholesky_factor, info = torch.linalg.cholesky_ex(shrunk)
    failed = info != 0
    any_failed = bool(failed.any())
    if any_failed:  # a failed factor may hold a zero pivot, which cholesky_inverse refuses
        cholesky_factor[failed] = torch.eye(shrunk.shape[-1], dtype=shrunk.dtype, device=shrunk.device)
    precision = torch.cholesky_inverse(cholesky_factor)
    if any_failed:
        precision[failed] = torch.linalg.pinv(shrunk[failed], hermitian=True)
    inverse_sqrt_diagonal = torch.diagonal(precision, dim1=-2, dim2=-1).rsqrt()
    pcorr = precision.mul_(inverse_sqrt_diagonal[:, :, None]).mul_(-inverse_sqrt_diagonal[:, None, :])
    if not all_valid:
        pcorr = torch.where(pair_valid, pcorr, torch.zeros((), dtype=pcorr.dtype, device=pcorr.device))
    pcorr.diagonal(dim1=-2, dim2=-1).copy_(valid.to(pcorr.dtype))
    return pcorr


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "lapack" if device.type == "cpu" else "torch"
    if backend not in ("lapack", "torch"):
        raise ScgrnInputError(f"unknown backend {backend!r}", fix="use 'auto', 'lapack' (CPU) or 'torch'")
    return backend


def pcorr_triangle_cosine_shrunk_pinv(blocks: torch.Tensor, valid: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE,
                                      backend: str = "auto", dtype: torch.dtype | None = None,
                                      order: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pcorr_cosine_shrunk_pinv` in triangle form (see :func:`partial_correlation_triangle`)."""
    dtype = dtype or blocks.dtype
    if _pick_backend(backend, blocks.device) == "lapack":
        values = _lapack_cosine_shrunk_pinv_triangle(
            blocks.detach().cpu().numpy(), valid.cpu().numpy(), shrinkage, torch.empty((), dtype=dtype).numpy().dtype,
            None if order is None else order.cpu().numpy())
        return torch.from_numpy(values).to(blocks.device)
    return _full_to_triangle(_torch_cosine_shrunk_pinv(blocks.to(dtype), valid, shrinkage), order)


def _full_to_triangle(full: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Triangle form of full (symmetric) matrices, slots permuted by ``order`` first."""
    n_cells, n_slots, _ = full.shape
    rows, columns = triangle_pairs(n_slots, full.device)
    flat = full.reshape(n_cells, n_slots * n_slots)
    if order is None:
        return flat.index_select(1, rows * n_slots + columns)
    return flat.gather(1, order.index_select(1, rows) * n_slots + order.index_select(1, columns))


def pcorr_cosine_shrunk_pinv(blocks: torch.Tensor, valid: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE,
                             backend: str = "auto", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Partial correlation of the original attention pipeline.

    ``S`` = cosine similarity of attention rows, shrunk toward the identity
    ``(1 − λ)·S + λ·I``; ``P`` = its Moore–Penrose pseudo-inverse;
    ``pcorr_ij = −P_ij / sqrt(P_ii·P_jj)`` (diagonal set to 1).

    The shrunk matrix is symmetric positive definite for ``λ > 0`` (``S`` is a Gram matrix,
    positive semi-definite, and ``λ·I`` lifts every eigenvalue to at least λ), and the
    Moore–Penrose pseudo-inverse of an invertible matrix is its inverse. So it is computed
    by Cholesky, which is exact for SPD matrices and several times cheaper than the SVD
    behind ``pinv``; any matrix whose factorisation fails numerically (λ = 0 with a
    rank-deficient ``S``, non-finite input) falls back to an eigen-based pseudo-inverse.

    Parameters
    ----------
    blocks
        Shape (n_cells, n_slots, n_slots): attention from gene (row) to gene (column).
    valid
        Shape (n_cells, n_slots), bool: which slots hold a gene. Invalid rows/columns are
        left out (equivalently zeroed, which makes the shrunk matrix block-diagonal), so they
        do not touch valid pairs.
    backend
        ``"lapack"``: per cell on one triangle with LAPACK (``syrk``/``potrf``/``potri``),
        the fastest on a CPU; ``"torch"``: batched Cholesky on torch, for GPUs; ``"auto"``
        picks by the device of ``blocks``.
    dtype
        Precision of the computation and the result (default that of ``blocks``; float64
        keeps λ = 1e-3 inversions accurate).

    Returns
    -------
    torch.Tensor
        Shape (n_cells, n_slots, n_slots), of ``dtype``; invalid slots hold 0.
    """
    if _pick_backend(backend, blocks.device) == "torch":
        return _torch_cosine_shrunk_pinv(blocks.to(dtype or blocks.dtype), valid, shrinkage)
    n_cells, n_slots = valid.shape
    rows, columns = triangle_pairs(n_slots, blocks.device)
    values = pcorr_triangle_cosine_shrunk_pinv(blocks, valid, shrinkage, backend="lapack", dtype=dtype)
    pcorr = torch.zeros((n_cells, n_slots * n_slots), dtype=values.dtype, device=values.device)
    pcorr[:, rows * n_slots + columns] = values
    pcorr[:, columns * n_slots + rows] = values
    pcorr = pcorr.reshape(n_cells, n_slots, n_slots)
    pcorr.diagonal(dim1=-2, dim2=-1).copy_(valid.to(pcorr.dtype))
    return pcorr


def standardized_within_cell(full: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each cell's off-diagonal valid partial correlations minus their mean, divided by their sd.

    The sd of a per-cell partial correlation shrinks as the cell carries more genes (measured on
    the demo: median 0.034 in ~75-token droplet cells, 0.015 in 256-token plate cells), so the
    mean/sd of raw values across cells rewards pairs seen in long cells and punishes pairs that
    co-occur in short ones. Standardised within its cell, every cell's values have sd 1 whatever
    its length (tested), and a pair's score says where it stands among its own cell's pairs.

    Parameters
    ----------
    full
        Shape (n_cells, n_slots, n_slots): partial correlations (diagonal ignored).
    valid
        Shape (n_cells, n_slots), bool.

    Returns
    -------
    torch.Tensor
        Same shape; invalid slots 0, diagonal 1 on valid slots; a cell with fewer than two valid
        pairs, or all values equal, gets 0 off the diagonal.
    """
    n_slots = valid.shape[1]
    off_diagonal = ~torch.eye(n_slots, dtype=torch.bool, device=full.device)
    pair_valid = valid[:, :, None] & valid[:, None, :] & off_diagonal
    count = pair_valid.sum(dim=(1, 2)).to(full.dtype)
    values = torch.where(pair_valid, full, torch.zeros((), dtype=full.dtype, device=full.device))
    mean = values.sum(dim=(1, 2)) / count.clamp_min(1)
    centred = torch.where(pair_valid, full - mean[:, None, None], torch.zeros((), dtype=full.dtype, device=full.device))
    variance = (centred ** 2).sum(dim=(1, 2)) / (count - 1).clamp_min(1)
    sd = variance.sqrt()
    usable = (count >= 2) & (sd > 0)
    scaled = centred / torch.where(usable, sd, torch.ones_like(sd))[:, None, None]
    scaled = torch.where(usable[:, None, None], scaled, torch.zeros_like(scaled))
    scaled.diagonal(dim1=-2, dim2=-1).copy_(valid.to(full.dtype))
    return scaled


def pcorr_cosine_shrunk_pinv_cell_z(blocks: torch.Tensor, valid: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE,
                                    backend: str = "auto", dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`pcorr_cosine_shrunk_pinv`, then :func:`standardized_within_cell`: a per-cell statistic whose
    spread does not depend on how many genes the cell has."""
    full = pcorr_cosine_shrunk_pinv(blocks, valid, shrinkage=shrinkage, backend=backend, dtype=dtype)
    return standardized_within_cell(full, valid)


PcorrMethod = Callable[..., torch.Tensor]
PCORR_METHODS: dict[str, PcorrMethod] = {"cosine_shrunk_pinv": pcorr_cosine_shrunk_pinv,
                                         "cosine_shrunk_pinv_cell_z": pcorr_cosine_shrunk_pinv_cell_z}
"""Named partial-correlation methods: ``method(blocks, valid, **options) -> pcorr``; add alternatives here.

Every method takes a ``dtype`` option (precision of the computation and result, default that of ``blocks``)."""
PCORR_TRIANGLE_METHODS: dict[str, PcorrMethod] = {"cosine_shrunk_pinv": pcorr_triangle_cosine_shrunk_pinv}
"""Optional triangle-form fast paths of methods in :data:`PCORR_METHODS` (same options, plus ``order``)."""


def _method_function(method: str) -> PcorrMethod:
    try:
        return PCORR_METHODS[method]
    except KeyError:
        raise ScgrnInputError(f"unknown partial correlation method {method!r}",
                              fix=f"use one of {sorted(PCORR_METHODS)}") from None


def partial_correlation(blocks: torch.Tensor, valid: torch.Tensor | None = None,
                        method: str = "cosine_shrunk_pinv", **options) -> torch.Tensor:
    """Partial correlation of each gene × gene attention block by the method called ``method``.

    Parameters
    ----------
    blocks
        Shape (n_cells, n_slots, n_slots).
    valid
        Shape (n_cells, n_slots), bool; default all slots valid.
    options
        Passed to the method (e.g. ``shrinkage=1e-3``).
    """
    method_function = _method_function(method)
    if valid is None:
        valid = torch.ones(blocks.shape[:2], dtype=torch.bool, device=blocks.device)
    return method_function(blocks, valid, **options)


def partial_correlation_triangle(blocks: torch.Tensor, valid: torch.Tensor | None = None,
                                 method: str = "cosine_shrunk_pinv", order: torch.Tensor | None = None,
                                 **options) -> torch.Tensor:
    """:func:`partial_correlation` in triangle form: shape (n_cells, n_slots·(n_slots − 1)/2).

    Pair ``t`` is slots ``(rows[t], columns[t])`` of :func:`triangle_pairs`, or with
    ``order`` (shape (n_cells, n_slots), a permutation per cell) slots
    ``(order[rows[t]], order[columns[t]])``: the triangle of the matrix with rows and columns
    permuted, without permuting the blocks. Pairs with an invalid slot hold 0. Uses the
    method's triangle fast path when it has one.
    """
    method_function = _method_function(method)
    if valid is None:
        valid = torch.ones(blocks.shape[:2], dtype=torch.bool, device=blocks.device)
    if method in PCORR_TRIANGLE_METHODS:
        return PCORR_TRIANGLE_METHODS[method](blocks, valid, order=order, **options)
    return _full_to_triangle(method_function(blocks, valid, **options), order)


# ---------------------------------------------------------------------------------------
# Edge moments
# ---------------------------------------------------------------------------------------


@dataclass
class EdgeMoments:
    """Per gene pair streaming moments of partial correlation over cells.

    Attributes
    ----------
    gene_names
        Shape (n_genes,), str: the gene universe (dictionary keys: Ensembl ID or symbol).
    gene_i, gene_j
        Shape (n_edges,), int32: indices into ``gene_names``, ``gene_i < gene_j``, sorted.
    n
        Shape (n_edges,), int64: cells in which both genes were present.
    mean
        Shape (n_edges,), float64: mean partial correlation over those cells.
    m2
        Shape (n_edges,), float64: sum of squared deviations from the mean.
    """

    gene_names: np.ndarray
    gene_i: np.ndarray
    gene_j: np.ndarray
    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @property
    def n_edges(self) -> int:
        return len(self.n)

    @classmethod
    def empty(cls, gene_names: Sequence[str] = ()) -> "EdgeMoments":
        return cls(np.asarray(gene_names, dtype=str), np.zeros(0, np.int32), np.zeros(0, np.int32),
                   np.zeros(0, np.int64), np.zeros(0), np.zeros(0))

    def merge(self, other: "EdgeMoments") -> "EdgeMoments":
        """Moments of the union of both cell sets (exact; gene universes may differ)."""
        return merge_edge_moments([self, other])

    def save_npz(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (.npz) through a temporary name, then rename into place."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, gene_names=self.gene_names.astype(str), gene_i=self.gene_i, gene_j=self.gene_j,
                     n=self.n, mean=self.mean, m2=self.m2)
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "EdgeMoments":
        """Read what :meth:`save_npz` wrote."""
        with np.load(path, allow_pickle=False) as stored:
            return cls(**{name: stored[name] for name in ("gene_names", "gene_i", "gene_j", "n", "mean", "m2")})


def merge_edge_moments(parts: Iterable[EdgeMoments | None], threads: int = 1) -> EdgeMoments:
    """Merge moments from batches, studies or machines into one (Chan et al., exact).

    Genes are matched by name, so parts may index different gene universes; the result's
    universe is the sorted union of names, pairs sorted by (``gene_i``, ``gene_j``). The parts
    are merged one after the other into an :class:`EdgeMomentAccumulator` over that universe
    (dense arrays for small universes, the pair hash map for large ones), so memory is the
    merged pairs plus the parts, never the parts concatenated and sorted.
    """
    parts = [part for part in parts if part is not None]
    if not parts:
        return EdgeMoments.empty()
    gene_names = np.unique(np.concatenate([part.gene_names.astype(str) for part in parts]))
    largest = max(part.n_edges for part in parts)
    accumulator = EdgeMomentAccumulator(gene_names, "cpu", backend="numba", threads=threads,
                                        initial_capacity=max(2 * largest // max(threads, 1), 2))
    for part in parts:
        accumulator.add_moments(part)
    return accumulator.result()


@numba.njit(cache=True, nogil=True)
def _chan_update_one(count: np.ndarray, mean: np.ndarray, m2: np.ndarray, key: int, value: float) -> None:
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
def _chan_update_pairs(count, mean, m2, keys, values) -> None:
    for index in range(keys.shape[0]):
        _chan_update_one(count, mean, m2, keys[index], values[index])


@numba.njit(cache=True, nogil=True)
def _chan_merge_pairs(count, mean, m2, keys, n_b, mean_b, m2_b) -> None:
    """Chan et al.'s merge of part ``t`` (``n_b[t]``, ``mean_b[t]``, ``M2_b[t]``) into pair ``keys[t]``.

    ``n = n_a + n_b``, ``δ = mean_b − mean_a``, ``mean = mean_a + δ·n_b/n``,
    ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``; parts with ``n_b = 0`` change nothing.
    """
    for index in range(keys.shape[0]):
        if n_b[index] == 0:
            continue
        key = keys[index]
        if n_b[index] == 1:  # a single value: Welford's form, like _chan_update_one and the hash map
            _chan_update_one(count, mean, m2, key, mean_b[index])
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
def _chan_update_triangles(count, mean, m2, high_offset, sorted_genes, n_valid, values) -> None:
    """Every valid pair of every cell, in triangle order (:func:`triangle_pairs`), one pass."""
    for cell in range(sorted_genes.shape[0]):
        pair = 0
        for j in range(1, n_valid[cell]):
            base = high_offset[sorted_genes[cell, j]]
            for i in range(j):
                _chan_update_one(count, mean, m2, base + sorted_genes[cell, i], values[cell, pair])
                pair += 1


@numba.njit(cache=True, nogil=True)
def _touched_pairs(count, mean, m2, high_offset, low_out, high_out, count_out, mean_out, m2_out) -> None:
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


def _host_array(values, dtype) -> np.ndarray:
    """A numpy array in host memory of a tensor (any device) or array-like."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


class EdgeMomentAccumulator:
    """Streams partial-correlation values per gene pair into (n, mean, M2).

    Every update is Chan et al.'s parallel merge, so the state merges exactly with other
    accumulators (:meth:`add_moments`, :func:`merge_edge_moments`). Storage modes, picked by
    the size of the gene universe:

    - dense (``n_genes² ≤ max_dense_pairs``, up to 4,096 genes by default): one slot per gene
      pair in flat arrays, pair ``(low, high)`` at ``high·(high − 1)/2 + low``.
      On the CPU (backend ``"numba"``) each observation is merged as it comes (Chan with
      ``n_b = 1``, i.e. Welford), one pass over the values, three float64 arrays;
      elsewhere (backend ``"torch"``, e.g. a GPU) values wait until they outnumber the pairs,
      are reduced per pair (exact two-pass) with scatter-adds and merged elementwise
      (2**24 pairs take 8 arrays × 64 MiB on the device);
    - hash (larger universes, e.g. 20-30k genes, where the dense arrays would take 5-11 GB):
      only the pairs seen, in an open-addressing hash map on the host keyed by the same pair
      index (:class:`~scgrn_assets.lib.network.pair_moments.PairMomentHashMap`), updated by a
      numba kernel with the dense kernel's Welford update (results agree bit for bit) and
      rebuilt twice as large when its load passes ``max_load``. On a GPU the values are
      copied to the host for it.

    Parameters
    ----------
    gene_names
        Shape (n_genes,): the gene universe the indices refer to.
    device
        Where the torch state and the batch reductions live.
    max_dense_pairs
        Universes with ``n_genes² ≤ max_dense_pairs`` are dense; larger ones use the hash map.
    backend
        Dense mode only: ``"numba"`` (CPU), ``"torch"`` (any device) or ``"auto"``
        (numba on the CPU, torch elsewhere).
    threads
        Hash mode only: shards of the hash map, each updated by its own numba thread.
    initial_capacity, max_load
        Hash mode only: slots per shard to start with, and the load that triggers growth.
    """

    def __init__(self, gene_names: Sequence[str], device: str | torch.device = "cpu",
                 max_dense_pairs: int = DEFAULT_MAX_DENSE_PAIRS, backend: str = "auto", threads: int = 1,
                 initial_capacity: int = DEFAULT_INITIAL_CAPACITY, max_load: float = DEFAULT_MAX_LOAD):
        self.gene_names = np.asarray(gene_names, dtype=str)
        self.n_genes = len(self.gene_names)
        self.device = torch.device(device)
        self.dense = self.n_genes * self.n_genes <= max_dense_pairs
        if backend == "auto":
            backend = "numba" if self.device.type == "cpu" else "torch"
        if backend not in ("numba", "torch"):
            raise ScgrnInputError(f"unknown accumulator backend {backend!r}", fix="use 'auto', 'numba' or 'torch'")
        if backend == "numba" and self.device.type != "cpu":
            raise ScgrnInputError("the numba accumulator runs on the CPU", fix="use backend='torch' on a GPU")
        self.backend = backend
        self._numba = self.dense and backend == "numba"
        self._hash: PairMomentHashMap | None = None
        high = np.arange(self.n_genes + 1, dtype=np.int64)
        self._high_offset_np = high * (high - 1) // 2
        if not self.dense:
            self._hash = PairMomentHashMap(self.n_genes, n_shards=threads, initial_capacity=initial_capacity,
                                           max_load=max_load)
        elif self._numba:
            n_pairs = self.n_genes * (self.n_genes - 1) // 2
            # Counts are float64 (exact below 2**53), so the update needs no casts.
            self._count, self._mean_np, self._m2_np = (np.zeros(n_pairs) for _ in range(3))
        else:
            n_pairs = self.n_genes * (self.n_genes - 1) // 2
            # State and per-batch scratch, reused in place: re-allocating big tensors each batch page-faults.
            # Counts are float64 (exact below 2**53) so the merge needs no casts.
            (self._n, self._mean, self._m2, self._batch_n, self._batch_mean, self._batch_m2, self._previous_n,
             self._scratch) = (torch.zeros(n_pairs, dtype=torch.float64, device=self.device) for _ in range(8))
            # Position of (low, high) is high_offset[high] + low; one extra row for the sentinel gene.
            self._high_offset = torch.as_tensor(self._high_offset_np, device=self.device)
            # Values wait until they outnumber the triangle, so the elementwise merge costs < 1 pass per value.
            self._flush_every = max(n_pairs, 2**20)
            self._waiting_keys: list[torch.Tensor] = []
            self._waiting_values: list[torch.Tensor] = []
            self._n_waiting = 0

    @property
    def mode(self) -> str:
        """``"hash"``, ``"dense-numba"`` or ``"dense-torch"``."""
        return "hash" if self._hash is not None else "dense-numba" if self._numba else "dense-torch"

    @property
    def state_nbytes(self) -> int:
        """Bytes of the moment state (dense arrays and scratch, or the hash table at its largest)."""
        if self._hash is not None:
            return self._hash.peak_nbytes
        if self._numba:
            return self._count.nbytes + self._mean_np.nbytes + self._m2_np.nbytes
        return 8 * self._n.numel() * self._n.element_size()

    def add(self, gene_i: torch.Tensor, gene_j: torch.Tensor, values: torch.Tensor) -> None:
        """Add one value per (gene_i, gene_j) observation; pairs may repeat; order is ignored.

        Parameters
        ----------
        gene_i, gene_j
            Shape (n_values,), int64 gene indices (any order within a pair, never equal).
        values
            Shape (n_values,), the partial correlations (cast to float64).
        """
        if self._numba or self._hash is not None:
            gene_i, gene_j = _host_array(gene_i, np.int64), _host_array(gene_j, np.int64)
            low, high = np.minimum(gene_i, gene_j), np.maximum(gene_i, gene_j)
            values = _host_array(values, np.float64)
            if self._hash is not None:
                self._hash.add_values(low, high, values)
            else:
                _chan_update_pairs(self._count, self._mean_np, self._m2_np, self._high_offset_np[high] + low, values)
            return
        gene_i, gene_j = gene_i.to(self.device), gene_j.to(self.device)
        low, high = torch.minimum(gene_i, gene_j), torch.maximum(gene_i, gene_j)
        self._add_dense(self._high_offset[high] + low, values.to(device=self.device, dtype=torch.float64))

    def add_moments(self, moments: EdgeMoments) -> None:
        """Merge moments computed elsewhere (another accumulator, batch, study or machine; Chan et al., exact).

        Genes are matched by name: every gene in a pair of ``moments`` must be in this
        accumulator's universe; the numbering may differ.
        """
        keep = moments.n > 0
        if not keep.any():
            return
        index = pd.Index(self.gene_names).get_indexer(moments.gene_names.astype(str)).astype(np.int64)
        first, second = index[moments.gene_i[keep]], index[moments.gene_j[keep]]
        if (first < 0).any() or (second < 0).any():
            raise ScgrnInputError("moments name genes outside this accumulator's universe",
                                  fix="accumulate over the union of gene names (merge_edge_moments does)")
        low, high = np.minimum(first, second), np.maximum(first, second)
        n = np.ascontiguousarray(moments.n[keep], dtype=np.int64)
        mean = np.ascontiguousarray(moments.mean[keep], dtype=np.float64)
        m2 = np.ascontiguousarray(moments.m2[keep], dtype=np.float64)
        if self._hash is not None:
            self._hash.add_moments(low, high, n, mean, m2)
        elif self._numba:
            _chan_merge_pairs(self._count, self._mean_np, self._m2_np, self._high_offset_np[high] + low, n, mean, m2)
        else:
            # One EdgeMoments holds each pair once, so the merge is elementwise over its keys.
            self._flush_dense()
            keys = torch.as_tensor(self._high_offset_np[high] + low, device=self.device)
            n_b, mean_b, m2_b = (torch.as_tensor(array, dtype=torch.float64, device=self.device)
                                 for array in (n, mean, m2))
            n_a, mean_a = self._n[keys], self._mean[keys]
            total = n_a + n_b
            delta, share = mean_b - mean_a, n_b / total
            self._n[keys] = total
            self._mean[keys] = mean_a + delta * share
            self._m2[keys] += m2_b + delta * delta * n_a * share

    def add_pcorr_blocks(self, pcorr: torch.Tensor, gene_index: torch.Tensor, valid: torch.Tensor) -> None:
        """Add every valid upper-triangle pair of each cell's partial-correlation block.

        Parameters
        ----------
        pcorr
            Shape (n_cells, n_slots, n_slots), symmetric.
        gene_index
            Shape (n_cells, n_slots), int64: gene (index into ``gene_names``) in each slot;
            the genes of one cell's valid slots are distinct.
        valid
            Shape (n_cells, n_slots), bool.
        """
        n_cells, n_slots = valid.shape
        rows, columns = triangle_pairs(n_slots, pcorr.device)
        # Slots ordered by gene (invalid ones last, as gene n_genes), then the triangle in that order.
        sorted_genes, order = torch.sort(torch.where(valid, gene_index, self.n_genes), dim=1)
        flat_pairs = (order * n_slots).index_select(1, rows) + order.index_select(1, columns)
        values = pcorr.reshape(n_cells, n_slots * n_slots).gather(1, flat_pairs)
        self.add_triangles(values, sorted_genes, valid.sum(dim=1))

    def add_triangles(self, values: torch.Tensor, sorted_genes: torch.Tensor, n_valid: torch.Tensor) -> None:
        """Add partial correlations in triangle form (:func:`triangle_pairs`) of gene-sorted slots.

        Parameters
        ----------
        values
            Shape (n_cells, n_slots·(n_slots − 1)/2): pair ``t`` of a cell is its slots
            ``(rows[t], columns[t])``.
        sorted_genes
            Shape (n_cells, n_slots), int64: the gene in each slot; a cell's first ``n_valid``
            slots hold distinct genes in ascending order, the rest are ignored.
        n_valid
            Shape (n_cells,): valid slots per cell (a prefix).
        """
        n_cells, n_slots = sorted_genes.shape
        rows, columns = triangle_pairs(n_slots, sorted_genes.device)
        slot = torch.arange(n_slots, device=sorted_genes.device)
        in_prefix = slot[None, :] < n_valid[:, None]
        genes = torch.where(in_prefix, sorted_genes, self.n_genes)
        if not bool((genes[:, 1:] > genes[:, :-1])[in_prefix[:, 1:]].all()):
            raise ValueError("add_triangles needs distinct genes in ascending order in each cell's valid slots")
        if self._numba or self._hash is not None:
            genes_np, n_valid_np = genes.cpu().numpy(), n_valid.to(torch.int64).cpu().numpy()
            values_np = values.detach().to(torch.float64).cpu().numpy()
            if self._hash is not None:
                self._hash.add_triangles(genes_np, n_valid_np, values_np)
            else:
                _chan_update_triangles(self._count, self._mean_np, self._m2_np, self._high_offset_np, genes_np,
                                       n_valid_np, values_np)
            return
        # Slots ascend by gene, so rows < columns means low = rows, high = columns, and the keys of
        # one cell ascend in this order: the scatters sweep memory forwards.
        keys = self._high_offset[genes].index_select(1, columns) + genes.index_select(1, rows)
        values = values.to(torch.float64)
        if bool((n_valid == n_slots).all()):
            keys, values = keys.reshape(-1), values.reshape(-1)
        else:
            pair_valid = columns[None, :] < n_valid[:, None]
            keys, values = keys[pair_valid], values[pair_valid]
        self._add_dense(keys.to(self.device), values.to(self.device))

    def _add_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Queue values (triangle keys); merge once enough have arrived."""
        self._waiting_keys.append(keys)
        self._waiting_values.append(values)
        self._n_waiting += len(values)
        if self._n_waiting >= self._flush_every:
            self._flush_dense()

    def _flush_dense(self) -> None:
        """Two-pass moments of the queued values per pair, then Chan's merge, elementwise over the triangle.

        Pairs absent from the queue have ``n_b = 0`` and come out unchanged.
        """
        if not self._n_waiting:
            return
        keys, values = torch.cat(self._waiting_keys), torch.cat(self._waiting_values)
        self._waiting_keys, self._waiting_values, self._n_waiting = [], [], 0
        batch_n, batch_mean, batch_m2, scratch = self._batch_n, self._batch_mean, self._batch_m2, self._scratch
        batch_n.zero_().index_add_(0, keys, torch.ones_like(values))
        batch_mean.zero_().index_add_(0, keys, values)
        torch.clamp_min(batch_n, 1.0, out=scratch)
        batch_mean.div_(scratch)
        deviations = values - batch_mean.index_select(0, keys)
        batch_m2.zero_().index_add_(0, keys, deviations.square_())
        # Chan et al.: n = n_a + n_b, δ = mean_b − mean_a, mean += δ·n_b/n, M2 += M2_b + δ²·n_a·n_b/n.
        n_a = self._previous_n.copy_(self._n)
        self._n.add_(batch_n)
        torch.clamp_min(self._n, 1.0, out=scratch)
        batch_n.div_(scratch)  # now n_b / n
        batch_mean.sub_(self._mean)  # now δ
        self._mean.addcmul_(batch_mean, batch_n)
        batch_mean.square_().mul_(batch_n).mul_(n_a)  # now δ²·n_a·n_b/n
        self._m2.add_(batch_m2).add_(batch_mean)

    def result(self) -> EdgeMoments:
        """The moments so far, one row per pair seen at least once, sorted by (``gene_i``, ``gene_j``)."""
        if self._hash is not None:
            return EdgeMoments(self.gene_names, *self._hash.sorted_entries())
        if self._numba:
            n_touched = int(np.count_nonzero(self._count))
            # Outputs allocated by numpy (huge pages for big arrays), not inside numba (a page fault per 4 KiB).
            moments = EdgeMoments(self.gene_names, np.empty(n_touched, np.int32), np.empty(n_touched, np.int32),
                                  np.empty(n_touched, np.int64), np.empty(n_touched), np.empty(n_touched))
            _touched_pairs(self._count, self._mean_np, self._m2_np, self._high_offset_np, moments.gene_i,
                           moments.gene_j, moments.n, moments.mean, moments.m2)
            return moments
        self._flush_dense()
        touched = torch.nonzero(self._n).squeeze(1)
        # Invert key = high·(high − 1)/2 + low: high = ⌊(1 + √(1 + 8·key)) / 2⌋, corrected for rounding.
        high = ((1.0 + torch.sqrt(1.0 + 8.0 * touched.to(torch.float64))) / 2.0).floor().to(torch.int64)
        high -= (self._high_offset[high] > touched).to(torch.int64)
        high += (self._high_offset[high + 1] <= touched).to(torch.int64)
        low = touched - self._high_offset[high]
        order = torch.argsort(low * self.n_genes + high)
        touched, low, high = touched[order], low[order], high[order]
        return EdgeMoments(self.gene_names, low.cpu().numpy().astype(np.int32), high.cpu().numpy().astype(np.int32),
                           self._n[touched].cpu().numpy().astype(np.int64),
                           self._mean[touched].cpu().numpy(), self._m2[touched].cpu().numpy())


# ---------------------------------------------------------------------------------------
# Attention extraction
# ---------------------------------------------------------------------------------------


def first_gene_slots(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_token_ids: torch.Tensor,
                     max_genes: int = DEFAULT_MAX_GENES) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the first ``max_genes`` distinct gene tokens of each cell.

    A position qualifies when it is not padding, not a special token and its token has not
    appeared earlier in the cell. Cells are in rank order, so these are the top-ranked genes.

    Returns
    -------
    positions
        Shape (n_cells, max_genes), int64; 0 in unused slots.
    valid
        Shape (n_cells, max_genes), bool.
    """
    n_cells, length = input_ids.shape
    sorted_ids, order = torch.sort(input_ids, dim=1, stable=True)
    repeat_sorted = torch.zeros_like(input_ids, dtype=torch.bool)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    is_repeat = torch.zeros_like(repeat_sorted).scatter_(1, order, repeat_sorted)
    keep = attention_mask.bool() & ~torch.isin(input_ids, special_token_ids) & ~is_repeat
    slot = torch.cumsum(keep.to(torch.int64), dim=1) - 1
    keep &= slot < max_genes
    cell_index, position = torch.nonzero(keep, as_tuple=True)
    positions = torch.zeros((n_cells, max_genes), dtype=torch.int64, device=input_ids.device)
    valid = torch.zeros((n_cells, max_genes), dtype=torch.bool, device=input_ids.device)
    positions[cell_index, slot[cell_index, position]] = position
    valid[cell_index, slot[cell_index, position]] = True
    return positions, valid


def last_layer_attention_block(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               positions: torch.Tensor, layers: Sequence[int] | None = None,
                               heads: Sequence[int] | None = None) -> torch.Tensor:
    """Last-layer attention, summed over heads, between the tokens at ``positions``.

    The softmax runs over all (unpadded) keys as in the model; only the rows and columns
    at ``positions`` are kept, so memory is ``n_slots × length`` per head, not
    ``length²``. Computed from the last layer's input hidden state and its query/key
    projections, it equals the model's own eager attention weights (tested) and works
    whatever attention kernel the model runs with.

    Parameters
    ----------
    model
        A BERT (``BertModel`` or ``BertForMaskedLM``) in eval mode.
    input_ids, attention_mask
        Shape (n_cells, length), int64.
    positions
        Shape (n_cells, n_slots), int64.

    layers, heads
        Which layers (indices into the encoder's layers, negative from the end; default the last)
        and heads (default all) to read: heads are summed, layers averaged (the geneRNIB recipe
        averages every layer and head: pass ``range(n_layers)``; cosine similarity downstream
        makes sum and mean over heads equivalent).

    Returns
    -------
    torch.Tensor
        Shape (n_cells, n_slots, n_slots), float32: attention from slot row to slot column.
    """
    encoder_model = getattr(model, "bert", model)
    hidden_states = encoder_model(input_ids=input_ids, attention_mask=attention_mask,
                                  output_hidden_states=True).hidden_states
    n_layers = len(encoder_model.encoder.layer)
    chosen = [-1] if layers is None else list(layers)
    if not chosen or any(not -n_layers <= layer < n_layers for layer in chosen):
        raise ScgrnInputError(f"attention layers {chosen} are not among the model's {n_layers} layers",
                              fix=f"pass layer indices in [-{n_layers}, {n_layers - 1}]")
    blocks = [_layer_attention_block(encoder_model, hidden_states, layer % n_layers, attention_mask, positions, heads)
              for layer in chosen]
    return blocks[0] if len(blocks) == 1 else torch.stack(blocks).mean(dim=0)


def _layer_attention_block(encoder_model, hidden_states, layer: int, attention_mask: torch.Tensor,
                           positions: torch.Tensor, heads: Sequence[int] | None) -> torch.Tensor:
    last_input = hidden_states[layer]  # hidden_states[0] is the embeddings: the input of layer 0
    attention = encoder_model.encoder.layer[layer].attention.self
    n_cells, length, hidden_size = last_input.shape
    n_slots = positions.shape[1]
    n_heads, head_size = attention.num_attention_heads, attention.attention_head_size
    slot_states = last_input.gather(1, positions[:, :, None].expand(-1, -1, hidden_size))
    queries = attention.query(slot_states).view(n_cells, n_slots, n_heads, head_size).transpose(1, 2)
    keys = attention.key(last_input).view(n_cells, length, n_heads, head_size).transpose(1, 2)
    scores = (queries @ keys.transpose(-1, -2)) * attention.scaling
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    probabilities = torch.softmax(scores.float(), dim=-1)
    columns = positions[:, None, None, :].expand(-1, n_heads, n_slots, -1)
    per_head = probabilities.gather(-1, columns)
    if heads is not None:
        if not heads or any(not 0 <= head < n_heads for head in heads):
            raise ScgrnInputError(f"attention heads {list(heads)} are not among the layer's {n_heads} heads",
                                  fix=f"pass head indices in [0, {n_heads - 1}]")
        per_head = per_head[:, list(heads)]
    return per_head.sum(dim=1)


def sort_slots_by_gene(gene_index: torch.Tensor, valid: torch.Tensor,
                       n_genes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order each cell's slots by gene, invalid slots last (as gene ``n_genes``).

    Returns
    -------
    sorted_genes, order, valid
        Shape (n_cells, n_slots) each: genes in ascending order, the slot each came from,
        and which sorted slots are valid (a prefix).
    """
    sorted_genes, order = torch.sort(torch.where(valid, gene_index, n_genes), dim=1)
    return sorted_genes, order, sorted_genes < n_genes


def add_attention_blocks(accumulator: EdgeMomentAccumulator, blocks: torch.Tensor, gene_index: torch.Tensor,
                         valid: torch.Tensor, method: str = "cosine_shrunk_pinv",
                         dtype: torch.dtype = torch.float64, **options) -> None:
    """One batch of the step: partial correlation of each cell's block, added to ``accumulator``.

    Slots are put in gene order (the partial correlation is read out in that order, the block
    is not permuted; nothing to do when the caller already extracted the block in that order,
    as :func:`attention_edge_moments` does), so the triangle form comes out in the
    accumulator's key order.

    Parameters
    ----------
    blocks
        Shape (n_cells, n_slots, n_slots): attention from gene (row) to gene (column).
    gene_index
        Shape (n_cells, n_slots), int64: the gene in each slot (distinct within a cell's valid slots).
    valid
        Shape (n_cells, n_slots), bool.
    method, options
        As in :func:`partial_correlation`.
    dtype
        Precision of the partial correlation (float64 keeps λ = 1e-3 inversions accurate);
        ``blocks`` may be float32, the method casts it.
    """
    n_slots = valid.shape[1]
    sorted_genes, order, sorted_valid = sort_slots_by_gene(gene_index, valid, accumulator.n_genes)
    if bool((order == torch.arange(n_slots, device=order.device)).all()):
        order = None
    values = partial_correlation_triangle(blocks, valid, method, order=order, dtype=dtype, **options)
    accumulator.add_triangles(values, sorted_genes, sorted_valid.sum(dim=1))


def attention_edge_moments(
    model: torch.nn.Module,
    cells: TokenizedCells,
    dictionaries: GeneformerDictionaries,
    *,
    max_genes: int = DEFAULT_MAX_GENES,
    method: str = "cosine_shrunk_pinv",
    method_options: Mapping[str, object] | None = None,
    batch_size: int = 32,
    max_input_length: int | None = None,
    device: str | torch.device | None = None,
    pcorr_dtype: torch.dtype = torch.float64,
    attn_implementation: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_dense_pairs: int = DEFAULT_MAX_DENSE_PAIRS,
    threads: int | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EdgeMoments:
    """Attention → partial correlation → per-edge moments for a set of cells (e.g. one study).

    Parameters
    ----------
    model
        A Geneformer BERT (:func:`scgrn_assets.lib.network.model.load_geneformer`); moved to ``device``.
    cells
        Tokenized cells, encoded with ``dictionaries``.
    dictionaries
        Gives the special tokens (never genes) and the gene name of each token.
    max_genes
        Genes per cell entering the block (first occurrence, highest rank first).
    method, method_options
        A name in :data:`PCORR_METHODS` and its keyword options (default shrinkage 1e-3).
    batch_size
        Cells per forward pass; cells are batched by similar length to limit padding.
    max_input_length
        Tokens per cell fed to the model (the top-ranked ones); default the model's
        ``max_position_embeddings``. Pass the training length for a model trained here
        (``SmallGeneformerConfig.max_train_length``): later positions were never trained.
    pcorr_dtype
        Precision of the partial correlation (float64 keeps λ = 1e-3 inversions accurate).
    attn_implementation
        If given (e.g. ``"sdpa"``), the model is switched to that attention kernel first:
        the block is recomputed from the last layer's input, so eager weights are not needed
        and the fused kernel is much faster on a GPU.
    autocast_dtype
        If given (e.g. ``torch.bfloat16`` on a GPU), the model forward runs under autocast;
        the softmax and the partial correlation stay in float32/``pcorr_dtype``.
    max_dense_pairs
        Gene universes with ``n_genes² ≤ max_dense_pairs`` use the dense accumulator, larger
        ones the pair hash map.
    threads
        CPU threads (default ``torch.get_num_threads()``): the BLAS/LAPACK libraries are held
        to this many for the duration (threadpoolctl; ``torch.set_num_threads`` does not reach
        the OpenBLAS that numpy and scipy bring, which otherwise starts one busy-waiting thread
        per core for every per-cell ``syrk``/``potrf``/``potri``), and the hash map gets this
        many shards, each updated by its own numba thread.
    layers, heads
        Which layers and heads are read (:func:`last_layer_attention_block`); default the last
        layer, every head summed.
    progress
        Called as ``progress(n_cells_done, n_cells_total)`` after each batch.

    Returns
    -------
    EdgeMoments
        Over the genes present in ``cells``, named by dictionary key.
    """
    device = pick_device(device)
    model = model.to(device).eval()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    method_options = dict(method_options or {})
    special_ids = torch.as_tensor(dictionaries.special_token_ids, device=device)
    is_gene_token = np.ones(dictionaries.vocab_size, dtype=bool)
    is_gene_token[dictionaries.special_token_ids] = False
    present_tokens = np.unique(cells.token_ids)
    present_tokens = present_tokens[is_gene_token[present_tokens]]
    # Compact gene index over the tokens present: keeps the dense accumulator small.
    token_to_gene = torch.full((dictionaries.vocab_size,), -1, dtype=torch.int64, device=device)
    token_to_gene[torch.as_tensor(present_tokens, dtype=torch.int64, device=device)] = torch.arange(
        len(present_tokens), device=device)
    gene_names = dictionaries.token_names()[present_tokens].astype(str)
    threads = max(1, int(threads or torch.get_num_threads()))
    accumulator = EdgeMomentAccumulator(gene_names, device, max_dense_pairs=max_dense_pairs, threads=threads)
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_input_length is not None:
        max_length = min(max_length, max_input_length) if max_length else max_input_length
    by_length = np.argsort(-cells.lengths, kind="stable")
    with torch.inference_mode(), threadpool_limits(limits=threads, user_api="blas"):
        for start in range(0, cells.n_cells, batch_size):
            batch = by_length[start: start + batch_size]
            input_ids, attention_mask = (torch.as_tensor(array, device=device)
                                         for array in cells.padded(batch, max_length=max_length))
            positions, valid = first_gene_slots(input_ids, attention_mask, special_ids, max_genes)
            # Cells are batched by length, so most batches need far fewer than max_genes slots.
            n_slots = max(int(valid.sum(dim=1).max()), 1)
            positions, valid = positions[:, :n_slots], valid[:, :n_slots]
            # Slots in gene order: the block comes out in the accumulator's key order, no permuting later.
            gene_index, order, valid = sort_slots_by_gene(
                token_to_gene[input_ids.gather(1, positions)], valid, accumulator.n_genes)
            positions = positions.gather(1, order)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                blocks = last_layer_attention_block(model, input_ids, attention_mask, positions, layers=layers,
                                                    heads=heads)
            add_attention_blocks(accumulator, blocks, gene_index, valid, method, dtype=pcorr_dtype, **method_options)
            if progress is not None:
                progress(min(start + batch_size, cells.n_cells), cells.n_cells)
    return accumulator.result()


# ---------------------------------------------------------------------------------------
# Edge table
# ---------------------------------------------------------------------------------------

EDGE_COLUMNS = ["gene_i", "gene_j", "n_cells", "pcorr_mean", "pcorr_std", "stability", "abs_stability"]


def edge_table(moments: EdgeMoments, gene_symbols: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per gene pair: the stability of its partial correlation across cells.

    Parameters
    ----------
    moments
        Merged moments (all studies).
    gene_symbols
        Gene key (Ensembl ID) → symbol; keys without an entry are shown as they are.

    Returns
    -------
    pd.DataFrame
        Columns ``gene_i``, ``gene_j`` (symbols, ``gene_i < gene_j``), ``n_cells``,
        ``pcorr_mean``, ``pcorr_std`` (sample sd, ddof=1), ``stability`` = mean/std and
        ``abs_stability``; both NaN when ``n_cells < 2`` (±inf when std is 0). Sorted by
        descending ``abs_stability``, NaN last.
    """
    gene_symbols = gene_symbols or {}
    symbols = np.array([gene_symbols.get(name, name) for name in moments.gene_names.astype(str)], dtype=object)
    first, second = symbols[moments.gene_i], symbols[moments.gene_j]
    swap = second < first
    gene_i = np.where(swap, second, first)
    gene_j = np.where(swap, first, second)
    n_cells = moments.n.astype(np.int64)
    enough = n_cells >= 2
    variance = np.divide(moments.m2, n_cells - 1, out=np.full(len(n_cells), np.nan), where=enough)
    pcorr_std = np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        stability = np.where(enough, moments.mean / pcorr_std, np.nan)
    table = pd.DataFrame({
        "gene_i": gene_i.astype(str), "gene_j": gene_j.astype(str), "n_cells": n_cells,
        "pcorr_mean": moments.mean.astype(np.float64), "pcorr_std": pcorr_std,
        "stability": stability, "abs_stability": np.abs(stability),
    }, columns=EDGE_COLUMNS)
    return table.sort_values("abs_stability", ascending=False, na_position="last", kind="stable",
                             ignore_index=True)
