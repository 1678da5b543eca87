"""Gene networks from Geneformer attention: attention → partial correlation → streaming edge moments.

Per cell, the last layer's attention (summed over heads) is restricted to the genes present
(first occurrence, at most ``max_genes``, highest-ranked first); a partial correlation
matrix is computed from that gene × gene block by a named method; every gene pair's
value updates per-edge moments (n, mean, M2). Moments merge exactly with Chan et al.'s
parallel formula, so batches, studies and machines combine into one edge table.

Everything runs batched on torch, on the GPU when one is present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path
from scgrn_assets.lib.geneformer import pick_device
from scgrn_assets.lib.tokenize import GeneformerDictionaries, TokenizedCells

DEFAULT_MAX_GENES = 256
DEFAULT_SHRINKAGE = 1e-3

# ---------------------------------------------------------------------------------------
# Partial correlation methods
# ---------------------------------------------------------------------------------------


def pcorr_cosine_shrunk_pinv(blocks: torch.Tensor, valid: torch.Tensor,
                             shrinkage: float = DEFAULT_SHRINKAGE) -> torch.Tensor:
    """Partial correlation of the original attention pipeline.

    ``S`` = cosine similarity of attention rows, shrunk toward the identity
    ``(1 − λ)·S + λ·I``; ``P`` = its Moore–Penrose pseudo-inverse;
    ``pcorr_ij = −P_ij / sqrt(P_ii·P_jj)`` (diagonal set to 1).

    The shrunk matrix is symmetric positive definite for ``λ > 0`` (``S`` is a Gram matrix),
    so its pseudo-inverse is its inverse: it is computed by Cholesky, with an eigen-based
    pseudo-inverse for any matrix whose factorisation fails numerically.

    Parameters
    ----------
    blocks
        Shape (n_cells, n_slots, n_slots): attention from gene (row) to gene (column).
    valid
        Shape (n_cells, n_slots), bool: which slots hold a gene. Invalid rows/columns are
        zeroed, which makes the shrunk matrix block-diagonal, so they do not touch valid pairs.

    Returns
    -------
    torch.Tensor
        Shape (n_cells, n_slots, n_slots), same dtype as ``blocks``; invalid slots hold 0.
    """
    all_valid = bool(valid.all())
    pair_valid = valid[:, :, None] & valid[:, None, :]
    if not all_valid:
        blocks = torch.where(pair_valid, blocks, torch.zeros((), dtype=blocks.dtype, device=blocks.device))
    row_norms = torch.linalg.vector_norm(blocks, dim=-1, keepdim=True)
    unit_rows = blocks / row_norms.clamp_min(torch.finfo(blocks.dtype).tiny)
    shrunk = unit_rows @ unit_rows.transpose(-1, -2)
    shrunk.mul_(1.0 - shrinkage).diagonal(dim1=-2, dim2=-1).add_(shrinkage)
    cholesky_factor, info = torch.linalg.cholesky_ex(shrunk)
    precision = torch.cholesky_inverse(cholesky_factor)
    failed = info != 0
    if bool(failed.any()):
        precision[failed] = torch.linalg.pinv(shrunk[failed], hermitian=True)
    inverse_sqrt_diagonal = torch.diagonal(precision, dim1=-2, dim2=-1).rsqrt()
    pcorr = precision.mul_(inverse_sqrt_diagonal[:, :, None]).mul_(-inverse_sqrt_diagonal[:, None, :])
    if not all_valid:
        pcorr = torch.where(pair_valid, pcorr, torch.zeros((), dtype=pcorr.dtype, device=pcorr.device))
    pcorr.diagonal(dim1=-2, dim2=-1).copy_(valid.to(pcorr.dtype))
    return pcorr


PcorrMethod = Callable[..., torch.Tensor]
PCORR_METHODS: dict[str, PcorrMethod] = {"cosine_shrunk_pinv": pcorr_cosine_shrunk_pinv}
"""Named partial-correlation methods: ``method(blocks, valid, **options) -> pcorr``; add alternatives here."""


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
    try:
        method_function = PCORR_METHODS[method]
    except KeyError:
        raise ScgrnInputError(f"unknown partial correlation method {method!r}",
                              fix=f"use one of {sorted(PCORR_METHODS)}") from None
    if valid is None:
        valid = torch.ones(blocks.shape[:2], dtype=torch.bool, device=blocks.device)
    return method_function(blocks, valid, **options)


# ---------------------------------------------------------------------------------------
# Edge moments
# ---------------------------------------------------------------------------------------


def _grouped_moments(group: torch.Tensor, n_groups: int, n: torch.Tensor, mean: torch.Tensor,
                     m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel merge applied to many parts at once: parts sharing ``group`` combine.

    ``n = Σ n_k``, ``mean = Σ n_k·mean_k / n``, ``m2 = Σ m2_k + Σ n_k·(mean_k − mean)²``, which is
    Chan's pairwise update (``m2 = m2_a + m2_b + δ²·n_a·n_b/n``) folded over a group. With single
    values (``n = 1``, ``m2 = 0``) it is the exact two-pass mean and M2.
    """
    dtype = mean.dtype
    total_n = torch.zeros(n_groups, dtype=torch.int64, device=n.device).index_add_(0, group, n)
    weights = n.to(dtype)
    total_mean = torch.zeros(n_groups, dtype=dtype, device=n.device).index_add_(0, group, weights * mean)
    total_mean /= total_n.clamp_min(1).to(dtype)
    deviation = mean - total_mean.index_select(0, group)
    total_m2 = torch.zeros(n_groups, dtype=dtype, device=n.device).index_add_(
        0, group, m2 + weights * deviation * deviation)
    return total_n, total_mean, total_m2


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


def merge_edge_moments(parts: Sequence[EdgeMoments]) -> EdgeMoments:
    """Merge moments from batches, studies or machines into one (Chan et al., exact).

    Genes are matched by name, so parts may index different gene universes; the result's
    universe is the sorted union of names.
    """
    parts = [part for part in parts if part is not None]
    if not parts:
        return EdgeMoments.empty()
    gene_names = np.unique(np.concatenate([part.gene_names.astype(str) for part in parts]))
    n_genes = len(gene_names)
    keys, counts, means, m2s = [], [], [], []
    for part in parts:
        remap = np.searchsorted(gene_names, part.gene_names.astype(str)).astype(np.int64)
        first, second = remap[part.gene_i], remap[part.gene_j]
        keys.append(np.minimum(first, second) * n_genes + np.maximum(first, second))
        counts.append(part.n)
        means.append(part.mean)
        m2s.append(part.m2)
    unique_keys, group = np.unique(np.concatenate(keys), return_inverse=True)
    n, mean, m2 = _grouped_moments(
        torch.from_numpy(group.astype(np.int64)), len(unique_keys),
        torch.from_numpy(np.concatenate(counts).astype(np.int64)),
        torch.from_numpy(np.concatenate(means).astype(np.float64)),
        torch.from_numpy(np.concatenate(m2s).astype(np.float64)))
    return EdgeMoments(gene_names, (unique_keys // n_genes).astype(np.int32),
                       (unique_keys % n_genes).astype(np.int32), n.numpy(), mean.numpy(), m2.numpy())


class EdgeMomentAccumulator:
    """Streams partial-correlation values per gene pair into (n, mean, M2) on a torch device.

    Each batch is first reduced to its own per-pair moments (exact two-pass), then merged
    into the running state with Chan et al.'s parallel update. Two storage modes:

    - dense (``n_genes² ≤ max_dense_pairs``): the strict upper triangle of the
      gene × gene matrix as flat arrays on the device; fastest, fine up to a few thousand genes
      (2**24 pairs take 8 arrays × 64 MiB);
    - sparse (larger universes, e.g. 20-30k genes): each batch's touched pairs are reduced
      with ``torch.unique`` and kept on the host, compacted by :func:`merge_edge_moments`
      whenever more than ``compact_every`` rows are pending; memory grows with the pairs
      actually seen, not with ``n_genes²``.

    Parameters
    ----------
    gene_names
        Shape (n_genes,): the gene universe the indices refer to.
    device
        Where the dense state and the batch reductions live.
    """

    def __init__(self, gene_names: Sequence[str], device: str | torch.device = "cpu",
                 max_dense_pairs: int = 2**24, compact_every: int = 2**24):
        self.gene_names = np.asarray(gene_names, dtype=str)
        self.n_genes = len(self.gene_names)
        self.device = torch.device(device)
        self.dense = self.n_genes * self.n_genes <= max_dense_pairs
        self.compact_every = compact_every
        if self.dense:
            n_pairs = self.n_genes * (self.n_genes - 1) // 2
            # State and per-batch scratch, reused in place: re-allocating big tensors each batch page-faults.
            # Counts are float64 (exact below 2**53) so the merge needs no casts.
            (self._n, self._mean, self._m2, self._batch_n, self._batch_mean, self._batch_m2, self._previous_n,
             self._scratch) = (torch.zeros(n_pairs, dtype=torch.float64, device=self.device) for _ in range(8))
            # Triangle position of (low, high) is row_offset[low] + high; one extra row for the sentinel gene.
            low = torch.arange(self.n_genes + 1, dtype=torch.int64, device=self.device)
            self._row_offset = low * (2 * self.n_genes - low - 1) // 2 - low - 1
            # Values wait until they outnumber the triangle, so the elementwise merge costs < 1 pass per value.
            self._flush_every = max(n_pairs, 2**20)
            self._waiting_keys: list[torch.Tensor] = []
            self._waiting_values: list[torch.Tensor] = []
            self._n_waiting = 0
        else:
            self._pending: list[EdgeMoments] = []
            self._pending_rows = 0

    def add(self, gene_i: torch.Tensor, gene_j: torch.Tensor, values: torch.Tensor) -> None:
        """Add one value per (gene_i, gene_j) observation; pairs may repeat; order is ignored.

        Parameters
        ----------
        gene_i, gene_j
            Shape (n_values,), int64 gene indices (any order within a pair, never equal).
        values
            Shape (n_values,), the partial correlations (cast to float64).
        """
        gene_i, gene_j = gene_i.to(self.device), gene_j.to(self.device)
        low, high = torch.minimum(gene_i, gene_j), torch.maximum(gene_i, gene_j)
        values = values.to(device=self.device, dtype=torch.float64)
        if self.dense:
            self._add_dense(self._row_offset[low] + high, values)
        else:
            self._add_sparse(low * self.n_genes + high, values)

    def add_pcorr_blocks(self, pcorr: torch.Tensor, gene_index: torch.Tensor, valid: torch.Tensor) -> None:
        """Add every valid upper-triangle pair of each cell's partial-correlation block.

        Parameters
        ----------
        pcorr
            Shape (n_cells, n_slots, n_slots).
        gene_index
            Shape (n_cells, n_slots), int64: gene (index into ``gene_names``) in each slot;
            the genes of one cell's valid slots are distinct.
        valid
            Shape (n_cells, n_slots), bool.
        """
        n_cells, n_slots = valid.shape
        rows, columns = torch.triu_indices(n_slots, n_slots, offset=1, device=pcorr.device)
        # Slots ordered by gene (invalid ones last, as gene n_genes) make each cell's pairs come
        # out as (low, high) with ascending keys: no min/max, and scatters hit memory in order.
        sorted_genes, order = torch.sort(torch.where(valid, gene_index, self.n_genes), dim=1)
        flat_pairs = (order * n_slots).index_select(1, rows) + order.index_select(1, columns)
        values = pcorr.reshape(n_cells, n_slots * n_slots).gather(1, flat_pairs).to(torch.float64)
        high = sorted_genes.index_select(1, columns)
        if self.dense:
            keys = self._row_offset[sorted_genes].index_select(1, rows) + high
        else:
            keys = sorted_genes.index_select(1, rows) * self.n_genes + high
        if bool(valid.all()):
            keys, values = keys.reshape(-1), values.reshape(-1)
        else:
            pair_valid = columns[None, :] < valid.sum(dim=1, keepdim=True)
            keys, values = keys[pair_valid], values[pair_valid]
        keys, values = keys.to(self.device), values.to(self.device)
        if self.dense:
            self._add_dense(keys, values)
        else:
            self._add_sparse(keys, values)

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

    def _add_sparse(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Reduce the batch to its touched pairs (key = low·n_genes + high) and keep it on the host."""
        unique_keys, group = torch.unique(keys, return_inverse=True)
        batch_n, batch_mean, batch_m2 = _grouped_moments(
            group, len(unique_keys), torch.ones_like(keys), values, torch.zeros_like(values))
        unique_keys = unique_keys.cpu().numpy()
        self._pending.append(EdgeMoments(
            self.gene_names, (unique_keys // self.n_genes).astype(np.int32),
            (unique_keys % self.n_genes).astype(np.int32),
            batch_n.cpu().numpy(), batch_mean.cpu().numpy(), batch_m2.cpu().numpy()))
        self._pending_rows += len(unique_keys)
        if self._pending_rows > self.compact_every:
            self._pending = [merge_edge_moments(self._pending)]
            self._pending_rows = self._pending[0].n_edges

    def result(self) -> EdgeMoments:
        """The moments so far, one row per pair seen at least once."""
        if not self.dense:
            merged = merge_edge_moments(self._pending)
            if merged.n_edges == 0:
                return EdgeMoments.empty(self.gene_names)
            # merge_edge_moments sorts the names; index back into this accumulator's universe.
            index_of_name = {name: index for index, name in enumerate(self.gene_names)}
            back = np.array([index_of_name[name] for name in merged.gene_names], dtype=np.int64)
            first, second = back[merged.gene_i], back[merged.gene_j]
            return _sorted_edges(self.gene_names, first, second, merged.n, merged.mean, merged.m2)
        self._flush_dense()
        low, high = torch.triu_indices(self.n_genes, self.n_genes, offset=1, device=self.device)
        touched = torch.nonzero(self._n).squeeze(1)
        return EdgeMoments(self.gene_names, low[touched].cpu().numpy().astype(np.int32),
                           high[touched].cpu().numpy().astype(np.int32),
                           self._n[touched].cpu().numpy().astype(np.int64),
                           self._mean[touched].cpu().numpy(), self._m2[touched].cpu().numpy())


def _sorted_edges(gene_names, first, second, n, mean, m2) -> EdgeMoments:
    gene_i, gene_j = np.minimum(first, second), np.maximum(first, second)
    order = np.lexsort((gene_j, gene_i))
    return EdgeMoments(gene_names, gene_i[order].astype(np.int32), gene_j[order].astype(np.int32),
                       n[order], mean[order], m2[order])


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
                               positions: torch.Tensor) -> torch.Tensor:
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

    Returns
    -------
    torch.Tensor
        Shape (n_cells, n_slots, n_slots), float32: attention from slot row to slot column.
    """
    encoder_model = getattr(model, "bert", model)
    hidden_states = encoder_model(input_ids=input_ids, attention_mask=attention_mask,
                                  output_hidden_states=True).hidden_states
    last_input = hidden_states[-2]
    attention = encoder_model.encoder.layer[-1].attention.self
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
    return probabilities.gather(-1, columns).sum(dim=1)


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
    max_dense_pairs: int = 2**24,
    progress: Callable[[int, int], None] | None = None,
) -> EdgeMoments:
    """Attention → partial correlation → per-edge moments for a set of cells (e.g. one study).

    Parameters
    ----------
    model
        A Geneformer BERT (:func:`scgrn_assets.lib.geneformer.load_geneformer`); moved to ``device``.
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
        Gene universes with ``n_genes² ≤ max_dense_pairs`` use the dense accumulator.
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
    accumulator = EdgeMomentAccumulator(gene_names, device, max_dense_pairs=max_dense_pairs)
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_input_length is not None:
        max_length = min(max_length, max_input_length) if max_length else max_input_length
    by_length = np.argsort(-cells.lengths, kind="stable")
    with torch.inference_mode():
        for start in range(0, cells.n_cells, batch_size):
            batch = by_length[start: start + batch_size]
            input_ids, attention_mask = (torch.as_tensor(array, device=device)
                                         for array in cells.padded(batch, max_length=max_length))
            positions, valid = first_gene_slots(input_ids, attention_mask, special_ids, max_genes)
            # Cells are batched by length, so most batches need far fewer than max_genes slots.
            n_slots = max(int(valid.sum(dim=1).max()), 1)
            positions, valid = positions[:, :n_slots], valid[:, :n_slots]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                blocks = last_layer_attention_block(model, input_ids, attention_mask, positions)
            pcorr = partial_correlation(blocks.to(pcorr_dtype), valid, method, **method_options)
            gene_index = token_to_gene[input_ids.gather(1, positions)]
            accumulator.add_pcorr_blocks(pcorr, gene_index, valid)
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
