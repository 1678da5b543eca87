"""Geneformer's rank-value encoding of a cells × genes count matrix.

A cell becomes the list of its expressed genes' tokens, ordered by descending
``counts / n_counts × 10,000 / gene_median`` and truncated to the model's input size; the
dictionaries and conventions (V1, V2) are in :mod:`scgrn_assets.lib.network.dictionaries`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.dictionaries import (CLS_TOKEN, EOS_TOKEN, GeneformerDictionaries,
                                                   TokenizerConvention, convention_named, normalized_counts)
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.storage import atomic_path


@dataclass
class TokenizedCells:
    """Ragged token lists, one per cell, stored CSR-style.

    Attributes
    ----------
    token_ids
        Shape (n_tokens_total,), int32: every cell's tokens, concatenated in cell order.
    offsets
        Shape (n_cells + 1,), int64: cell ``c`` owns ``token_ids[offsets[c]:offsets[c + 1]]``.
    convention
        The convention (special tokens, input size) the cells were encoded with.
    """

    token_ids: np.ndarray
    offsets: np.ndarray
    convention: TokenizerConvention

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per cell, shape (n_cells,), int64."""
        return np.diff(self.offsets)

    def cell(self, index: int) -> np.ndarray:
        """Tokens of one cell, shape (length,), int32."""
        return self.token_ids[self.offsets[index]: self.offsets[index + 1]]

    def subset(self, cell_indices: np.ndarray) -> "TokenizedCells":
        """The cells at ``cell_indices`` (e.g. one study), in that order."""
        cell_indices = np.asarray(cell_indices, dtype=np.int64)
        lengths = self.lengths[cell_indices]
        offsets = np.zeros(len(cell_indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pieces = [self.cell(index) for index in cell_indices]
        token_ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return TokenizedCells(token_ids.astype(np.int32), offsets, self.convention)

    def padded(self, cell_indices: np.ndarray, max_length: int | None = None,
               pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A padded batch of the cells at ``cell_indices``.

        Returns
        -------
        input_ids, attention_mask
            Both shape (n_batch, length), int64; length = longest cell (capped at
            ``max_length``); a cell longer than ``max_length`` keeps its first tokens.
        """
        cell_indices = np.asarray(cell_indices, dtype=np.int64)
        lengths = self.lengths[cell_indices]
        length = int(lengths.max()) if len(lengths) else 0
        if max_length is not None:
            length = min(length, max_length)
            lengths = np.minimum(lengths, max_length)
        input_ids = np.full((len(cell_indices), length), pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(cell_indices), length), dtype=np.int64)
        for row, (cell_index, cell_length) in enumerate(zip(cell_indices, lengths)):
            start = self.offsets[cell_index]
            input_ids[row, :cell_length] = self.token_ids[start: start + cell_length]
            attention_mask[row, :cell_length] = 1
        return input_ids, attention_mask

    def save_npz(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (.npz) through a temporary name, then rename into place."""
        path = Path(path)
        # A file handle, not a name: np.savez would append ".npz" to the temporary name.
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, token_ids=self.token_ids, offsets=self.offsets,
                     convention=np.array(self.convention.name))
        return path

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "TokenizedCells":
        """Read what :meth:`save_npz` wrote."""
        with np.load(path, allow_pickle=False) as stored:
            return cls(stored["token_ids"], stored["offsets"], convention_named(str(stored["convention"])))


def tokenize_cells(
    counts: sp.spmatrix,
    n_counts: np.ndarray,
    gene_keys: Sequence[str],
    dictionaries: GeneformerDictionaries,
    *,
    chunk_size: int = 10_000,
    progress: Progress | None = None,
) -> TokenizedCells:
    """Rank-value encode each cell (Geneformer's tokenizer).

    A gene is kept when its key is in both the token and the median dictionary. Genes whose
    keys coincide are summed first (Geneformer V2 collapses duplicate Ensembl IDs the same
    way). Each cell's expressed genes are ranked by descending
    ``counts / n_counts × 10,000 / median``; ties keep corpus column order (of the first
    column with that key). The first ``convention.max_genes_per_cell`` are kept, wrapped in
    ``<cls>``/``<eos>`` for V2.

    Parameters
    ----------
    counts
        Shape (n_cells, n_genes), raw counts (any scipy sparse format or dense array).
    n_counts
        Shape (n_cells,), library size of each cell over all genes (not only the kept ones).
    gene_keys
        Shape (n_genes,), dictionary key of each column
        (:func:`~scgrn_assets.lib.network.dictionaries.corpus_gene_keys`).
    dictionaries
        Token and median dictionaries; their ``convention`` decides special tokens and size.
    chunk_size
        Cells encoded per vectorised chunk (bounds memory).
    progress
        Called as ``progress(n_cells_done, n_cells_total)`` after each chunk.
    """
    counts = sp.csr_matrix(counts)
    n_cells, n_genes = counts.shape
    n_counts = np.asarray(n_counts, dtype=np.float64)
    if len(gene_keys) != n_genes:
        raise ScgrnInputError(f"{len(gene_keys)} gene keys for {n_genes} count columns",
                              fix="pass one key per corpus gene (corpus_gene_keys(adata.var))")
    convention = dictionaries.convention
    # One column per kept key; the weight 1/median turns normalised counts into Geneformer's values.
    kept_keys: dict[str, int] = {}
    rows, cols, weights = [], [], []
    for column, key in enumerate(gene_keys):
        key = str(key)
        if key not in dictionaries.token_dictionary or key not in dictionaries.gene_median:
            continue
        if key not in kept_keys:
            kept_keys[key] = len(kept_keys)
        rows.append(column)
        cols.append(kept_keys[key])
        weights.append(1.0 / dictionaries.gene_median[key])
    collapse = sp.csr_matrix((weights, (rows, cols)), shape=(n_genes, len(kept_keys)))
    kept_tokens = np.array([dictionaries.token_dictionary[key] for key in kept_keys], dtype=np.int32)

    max_genes = convention.max_genes_per_cell
    cls_id = dictionaries.token_dictionary.get(CLS_TOKEN)
    eos_id = dictionaries.token_dictionary.get(EOS_TOKEN)
    token_chunks, length_chunks = [], []
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        values = normalized_counts(counts[start:stop], n_counts[start:stop]) @ collapse
        values = sp.csr_matrix(values)
        values.eliminate_zeros()
        values.sort_indices()
        row_of_entry = np.repeat(np.arange(stop - start), np.diff(values.indptr))
        # Sort by cell, then descending value; lexsort is stable so ties keep column order.
        order = np.lexsort((-values.data, row_of_entry))
        rank_in_cell = np.arange(len(order)) - values.indptr[row_of_entry[order]]
        keep = rank_in_cell < max_genes
        tokens = kept_tokens[values.indices[order][keep]]
        gene_lengths = np.minimum(np.diff(values.indptr), max_genes)
        if convention.add_cls_eos:
            tokens, gene_lengths = _wrap_cls_eos(tokens, gene_lengths, cls_id, eos_id)
        token_chunks.append(tokens)
        length_chunks.append(gene_lengths)
        report(progress, stop, n_cells)
    lengths = np.concatenate(length_chunks) if length_chunks else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    token_ids = np.concatenate(token_chunks).astype(np.int32) if token_chunks else np.zeros(0, np.int32)
    return TokenizedCells(token_ids, offsets, convention)


def _wrap_cls_eos(tokens: np.ndarray, gene_lengths: np.ndarray, cls_id: int | None,
                  eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``<cls>`` before and ``<eos>`` after each cell's gene tokens."""
    if cls_id is None or eos_id is None:
        raise ScgrnInputError("the V2 convention needs <cls> and <eos> in the token dictionary",
                              fix="use V2 (gc95M/gc104M) dictionaries or the V1 convention")
    lengths = gene_lengths + 2
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    wrapped = np.empty(offsets[-1], dtype=np.int32)
    wrapped[offsets[:-1]] = cls_id
    wrapped[offsets[1:] - 1] = eos_id
    is_gene = np.ones(offsets[-1], dtype=bool)
    is_gene[offsets[:-1]] = False
    is_gene[offsets[1:] - 1] = False
    wrapped[is_gene] = tokens
    return wrapped, lengths
