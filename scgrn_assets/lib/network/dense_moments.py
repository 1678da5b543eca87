"""Dense per-pair moment stores: one slot per gene pair, for gene universes up to a few thousand genes.

Pair ``(low, high)``, ``low < high``, sits at ``high·(high − 1)/2 + low``. Two stores with the
interface of :class:`~scgrn_assets.lib.network.pair_moments.PairMomentHashMap` (the store for
larger universes), so :class:`~scgrn_assets.lib.network.edge_moments.EdgeMomentAccumulator`
drives any of the three the same way:

- :class:`DenseMomentArrays` (CPU): each value is merged as it comes (Chan et al. with
  ``n_b = 1``, i.e. Welford) by numba, one pass over the values, three float64 arrays;
- :class:`DenseMomentTensors` (torch, e.g. a GPU): values wait until they outnumber the pairs,
  are reduced per pair (exact two-pass) with scatter-adds and merged elementwise
  (2**24 pairs take 8 arrays × 64 MiB on the device).
"""

from __future__ import annotations

import numpy as np
import torch

from scgrn_assets.lib.network._kernels import chan_merge_pairs, chan_update_pairs, chan_update_triangles, touched_pairs
from scgrn_assets.lib.network.partial_correlation import triangle_pairs


def high_offsets(n_genes: int) -> np.ndarray:
    """Shape (n_genes + 1,), int64: ``high·(high − 1)/2``, where the pairs of gene ``high`` start."""
    high = np.arange(n_genes + 1, dtype=np.int64)
    return high * (high - 1) // 2


class DenseMomentArrays:
    """(n, mean, M2) of every gene pair in three numpy float64 arrays, updated by numba kernels."""

    def __init__(self, n_genes: int):
        self.n_genes = int(n_genes)
        self._high_offset = high_offsets(self.n_genes)
        n_pairs = self.n_genes * (self.n_genes - 1) // 2
        # Counts are float64 (exact below 2**53), so the update needs no casts.
        self._count, self._mean, self._m2 = (np.zeros(n_pairs) for _ in range(3))

    @property
    def peak_nbytes(self) -> int:
        return self._count.nbytes + self._mean.nbytes + self._m2.nbytes

    def add_values(self, low: np.ndarray, high: np.ndarray, values: np.ndarray) -> None:
        chan_update_pairs(self._count, self._mean, self._m2, self._high_offset[high] + low, values)

    def add_triangles(self, sorted_genes: np.ndarray, n_valid: np.ndarray, values: np.ndarray) -> None:
        chan_update_triangles(self._count, self._mean, self._m2, self._high_offset, sorted_genes, n_valid, values)

    def add_moments(self, low: np.ndarray, high: np.ndarray, n: np.ndarray, mean: np.ndarray,
                    m2: np.ndarray) -> None:
        chan_merge_pairs(self._count, self._mean, self._m2, self._high_offset[high] + low, n, mean, m2)

    def sorted_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``gene_i``, ``gene_j``, ``n``, ``mean``, ``m2`` of the pairs seen, sorted by (low, high)."""
        n_touched = int(np.count_nonzero(self._count))
        # Outputs allocated by numpy (huge pages for big arrays), not inside numba (a page fault per 4 KiB).
        entries = (np.empty(n_touched, np.int32), np.empty(n_touched, np.int32), np.empty(n_touched, np.int64),
                   np.empty(n_touched), np.empty(n_touched))
        touched_pairs(self._count, self._mean, self._m2, self._high_offset, *entries)
        return entries


class DenseMomentTensors:
    """(n, mean, M2) of every gene pair in torch float64 tensors on ``device``; values queued, merged in bulk."""

    def __init__(self, n_genes: int, device: torch.device):
        self.n_genes = int(n_genes)
        self.device = device
        n_pairs = self.n_genes * (self.n_genes - 1) // 2
        # State and per-batch scratch, reused in place: re-allocating big tensors each batch page-faults.
        # Counts are float64 (exact below 2**53) so the merge needs no casts.
        (self._n, self._mean, self._m2, self._batch_n, self._batch_mean, self._batch_m2, self._previous_n,
         self._scratch) = (torch.zeros(n_pairs, dtype=torch.float64, device=self.device) for _ in range(8))
        # Position of (low, high) is high_offset[high] + low; one extra row for the sentinel gene.
        self._high_offset_np = high_offsets(self.n_genes)
        self._high_offset = torch.as_tensor(self._high_offset_np, device=self.device)
        # Values wait until they outnumber the triangle, so the elementwise merge costs < 1 pass per value.
        self._flush_every = max(n_pairs, 2**20)
        self._waiting_keys: list[torch.Tensor] = []
        self._waiting_values: list[torch.Tensor] = []
        self._n_waiting = 0

    @property
    def peak_nbytes(self) -> int:
        return 8 * self._n.numel() * self._n.element_size()

    def add_values(self, low: torch.Tensor, high: torch.Tensor, values: torch.Tensor) -> None:
        self._queue(self._high_offset[high] + low, values.to(device=self.device, dtype=torch.float64))

    def add_triangles(self, sorted_genes: torch.Tensor, n_valid: torch.Tensor, values: torch.Tensor) -> None:
        """Triangle form of gene-sorted slots; slots past a cell's ``n_valid`` hold gene ``n_genes``."""
        n_slots = sorted_genes.shape[1]
        rows, columns = triangle_pairs(n_slots, sorted_genes.device)
        # Slots ascend by gene, so rows < columns means low = rows, high = columns, and the keys of
        # one cell ascend in this order: the scatters sweep memory forwards.
        keys = self._high_offset[sorted_genes].index_select(1, columns) + sorted_genes.index_select(1, rows)
        values = values.to(torch.float64)
        if bool((n_valid == n_slots).all()):
            keys, values = keys.reshape(-1), values.reshape(-1)
        else:
            pair_valid = columns[None, :] < n_valid[:, None]
            keys, values = keys[pair_valid], values[pair_valid]
        self._queue(keys.to(self.device), values.to(self.device))

    def add_moments(self, low: np.ndarray, high: np.ndarray, n: np.ndarray, mean: np.ndarray,
                    m2: np.ndarray) -> None:
        # One EdgeMoments holds each pair once, so the merge is elementwise over its keys.
        self._flush()
        keys = torch.as_tensor(self._high_offset_np[high] + low, device=self.device)
        n_b, mean_b, m2_b = (torch.as_tensor(array, dtype=torch.float64, device=self.device)
                             for array in (n, mean, m2))
        n_a, mean_a = self._n[keys], self._mean[keys]
        total = n_a + n_b
        delta, share = mean_b - mean_a, n_b / total
        self._n[keys] = total
        self._mean[keys] = mean_a + delta * share
        self._m2[keys] += m2_b + delta * delta * n_a * share

    def _queue(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Queue values (triangle keys); merge once enough have arrived."""
        self._waiting_keys.append(keys)
        self._waiting_values.append(values)
        self._n_waiting += len(values)
        if self._n_waiting >= self._flush_every:
            self._flush()

    def _flush(self) -> None:
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

    def sorted_entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``gene_i``, ``gene_j``, ``n``, ``mean``, ``m2`` of the pairs seen, sorted by (low, high)."""
        self._flush()
        touched = torch.nonzero(self._n).squeeze(1)
        # Invert key = high·(high − 1)/2 + low: high = ⌊(1 + √(1 + 8·key)) / 2⌋, corrected for rounding.
        high = ((1.0 + torch.sqrt(1.0 + 8.0 * touched.to(torch.float64))) / 2.0).floor().to(torch.int64)
        high -= (self._high_offset[high] > touched).to(torch.int64)
        high += (self._high_offset[high + 1] <= touched).to(torch.int64)
        low = touched - self._high_offset[high]
        order = torch.argsort(low * self.n_genes + high)
        touched, low, high = touched[order], low[order], high[order]
        return (low.cpu().numpy().astype(np.int32), high.cpu().numpy().astype(np.int32),
                self._n[touched].cpu().numpy().astype(np.int64), self._mean[touched].cpu().numpy(),
                self._m2[touched].cpu().numpy())
