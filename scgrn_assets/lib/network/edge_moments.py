"""Per-edge streaming moments (n, mean, M2) of partial correlation over cells, merged exactly.

Every update is Chan et al.'s parallel merge, so batches, studies and machines combine into
one :class:`EdgeMoments`. :class:`EdgeMomentAccumulator` picks a store by the size of the gene
universe: dense per-pair arrays (:mod:`scgrn_assets.lib.network.dense_moments`) for small ones
and, for real corpora (20-30k genes), a numba open-addressing hash map holding only the pairs
seen (:mod:`scgrn_assets.lib.network.pair_moments`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.dense_moments import DenseMomentArrays, DenseMomentTensors
from scgrn_assets.lib.network.pair_moments import DEFAULT_INITIAL_CAPACITY, DEFAULT_MAX_LOAD, PairMomentHashMap
from scgrn_assets.lib.network.partial_correlation import triangle_pairs
from scgrn_assets.lib.storage import atomic_path

DEFAULT_MAX_DENSE_PAIRS = 2**24  # dense per-pair moment arrays up to 4,096 genes, the pair hash map above


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
      pair (:mod:`scgrn_assets.lib.network.dense_moments`). On the CPU (backend ``"numba"``,
      :class:`~scgrn_assets.lib.network.dense_moments.DenseMomentArrays`) each observation is
      merged as it comes (Chan with ``n_b = 1``, i.e. Welford), one pass over the values;
      elsewhere (backend ``"torch"``, e.g. a GPU,
      :class:`~scgrn_assets.lib.network.dense_moments.DenseMomentTensors`) values wait until
      they outnumber the pairs and are merged per pair in bulk;
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
        self._hash: PairMomentHashMap | None = None
        self._store: PairMomentHashMap | DenseMomentArrays | DenseMomentTensors
        if not self.dense:
            self._store = self._hash = PairMomentHashMap(self.n_genes, n_shards=threads,
                                                         initial_capacity=initial_capacity, max_load=max_load)
        elif backend == "numba":
            self._store = DenseMomentArrays(self.n_genes)
        else:
            self._store = DenseMomentTensors(self.n_genes, self.device)
        # The hash map and the numba arrays live on the host; the torch store takes tensors on its device.
        self._on_host = not isinstance(self._store, DenseMomentTensors)

    @property
    def mode(self) -> str:
        """``"hash"``, ``"dense-numba"`` or ``"dense-torch"``."""
        return "hash" if self._hash is not None else "dense-numba" if self._on_host else "dense-torch"

    @property
    def state_nbytes(self) -> int:
        """Bytes of the moment state (dense arrays and scratch, or the hash table at its largest)."""
        return self._store.peak_nbytes

    def add(self, gene_i: torch.Tensor, gene_j: torch.Tensor, values: torch.Tensor) -> None:
        """Add one value per (gene_i, gene_j) observation; pairs may repeat; order is ignored.

        Parameters
        ----------
        gene_i, gene_j
            Shape (n_values,), int64 gene indices (any order within a pair, never equal).
        values
            Shape (n_values,), the partial correlations (cast to float64).
        """
        if self._on_host:
            gene_i, gene_j = _host_array(gene_i, np.int64), _host_array(gene_j, np.int64)
            self._store.add_values(np.minimum(gene_i, gene_j), np.maximum(gene_i, gene_j),
                                   _host_array(values, np.float64))
            return
        gene_i, gene_j = gene_i.to(self.device), gene_j.to(self.device)
        self._store.add_values(torch.minimum(gene_i, gene_j), torch.maximum(gene_i, gene_j), values)

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
        self._store.add_moments(np.minimum(first, second), np.maximum(first, second),
                                np.ascontiguousarray(moments.n[keep], dtype=np.int64),
                                np.ascontiguousarray(moments.mean[keep], dtype=np.float64),
                                np.ascontiguousarray(moments.m2[keep], dtype=np.float64))

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
        """Add partial correlations in triangle form
        (:func:`~scgrn_assets.lib.network.partial_correlation.triangle_pairs`) of gene-sorted slots.

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
        n_slots = sorted_genes.shape[1]
        slot = torch.arange(n_slots, device=sorted_genes.device)
        in_prefix = slot[None, :] < n_valid[:, None]
        genes = torch.where(in_prefix, sorted_genes, self.n_genes)
        if not bool((genes[:, 1:] > genes[:, :-1])[in_prefix[:, 1:]].all()):
            raise ValueError("add_triangles needs distinct genes in ascending order in each cell's valid slots")
        if self._on_host:
            self._store.add_triangles(genes.cpu().numpy(), n_valid.to(torch.int64).cpu().numpy(),
                                      values.detach().to(torch.float64).cpu().numpy())
        else:
            self._store.add_triangles(genes, n_valid, values)

    def result(self) -> EdgeMoments:
        """The moments so far, one row per pair seen at least once, sorted by (``gene_i``, ``gene_j``)."""
        return EdgeMoments(self.gene_names, *self._store.sorted_entries())
