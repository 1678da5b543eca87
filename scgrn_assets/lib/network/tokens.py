"""Geneformer's rank-value encoding of a cells × genes count matrix, and its dictionaries.

A cell becomes the list of its expressed genes' tokens, ordered by descending
``counts / n_counts × 10,000 / gene_median`` and truncated to the model's input size.
Two conventions exist (Theodoris et al. 2023; Chen et al. 2024):

- V1 (gc30M dictionaries): no special tokens in a cell, at most 2,048 genes;
- V2 (gc95M/gc104M dictionaries): ``<cls>`` first and ``<eos>`` last, at most 4,096 tokens.

The published dictionaries are pickles; :func:`load_pickle_restricted` reads them without
executing arbitrary code (only numpy numeric scalars and dtypes may be rebuilt).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path
from scgrn_assets.lib.progress import Progress, report

PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
CLS_TOKEN = "<cls>"
EOS_TOKEN = "<eos>"
TARGET_SUM = 10_000.0
"""Counts are scaled to this many per cell before dividing by the gene median (Geneformer's value)."""


@dataclass(frozen=True)
class TokenizerConvention:
    """How cells are turned into model inputs.

    Attributes
    ----------
    name
        ``"V1"`` or ``"V2"``.
    model_input_size
        Maximum tokens per cell, special tokens included.
    special_tokens
        Special token names in id order, ``<pad>`` = 0 first (mirrors the published dictionaries).
    add_cls_eos
        Whether each cell starts with ``<cls>`` and ends with ``<eos>``.
    """

    name: str
    model_input_size: int
    special_tokens: tuple[str, ...]
    add_cls_eos: bool

    @property
    def max_genes_per_cell(self) -> int:
        """Gene tokens that fit once the special tokens are placed."""
        return self.model_input_size - (2 if self.add_cls_eos else 0)


V1 = TokenizerConvention("V1", 2048, (PAD_TOKEN, MASK_TOKEN), add_cls_eos=False)
V2 = TokenizerConvention("V2", 4096, (PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN), add_cls_eos=True)
CONVENTIONS: dict[str, TokenizerConvention] = {"V1": V1, "V2": V2}


def convention_named(name: str) -> TokenizerConvention:
    """Return the :class:`TokenizerConvention` called ``name`` (``"V1"`` or ``"V2"``)."""
    try:
        return CONVENTIONS[name.upper()]
    except KeyError:
        raise ScgrnInputError(
            f"unknown Geneformer convention {name!r}", fix=f"use one of {sorted(CONVENTIONS)}"
        ) from None


# ---------------------------------------------------------------------------------------
# Dictionaries
# ---------------------------------------------------------------------------------------


def _numeric_dtype(*args):
    """``numpy.dtype`` restricted to numeric/bool kinds, so a pickle cannot rebuild object arrays."""
    dtype = np.dtype(*args)
    if dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"dtype {dtype} is not numeric")
    return dtype


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds plain containers and numpy numeric scalars; refuses every other global."""

    _allowed = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        if module == "numpy" and name == "dtype":
            return _numeric_dtype
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dictionary pickle")


def load_pickle_restricted(path: str | os.PathLike) -> object:
    """Load a pickle that may hold only plain containers and numpy numeric scalars.

    Parameters
    ----------
    path
        A Geneformer dictionary pickle (e.g. ``token_dictionary_gc30M.pkl``).

    Raises
    ------
    ScgrnInputError
        When the pickle asks for any other class or function (it could run code).
    """
    try:
        with open(path, "rb") as handle:
            return _RestrictedUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ScgrnInputError(
            f"not a plain dictionary pickle ({error})",
            file=str(path),
            fix="use the dictionaries published with Geneformer; never load pickles from untrusted sources",
        ) from error


def save_pickle_atomic(value: object, path: str | os.PathLike) -> Path:
    """Pickle ``value`` to ``path`` through a temporary name, so a crash never leaves half a file."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        pickle.dump(value, handle, protocol=4)
    return path


@dataclass
class GeneformerDictionaries:
    """The token and median dictionaries a model was trained with.

    Attributes
    ----------
    token_dictionary
        Gene key (Ensembl ID, or symbol for corpus-built demos) and special token → token id.
    gene_median
        Gene key → non-zero median of ``counts / n_counts × 10,000`` across the training corpus.
    gene_name_id
        Gene symbol → Ensembl ID (empty when not published alongside).
    convention
        The tokenizer convention these dictionaries belong to.
    """

    token_dictionary: dict[str, int]
    gene_median: dict[str, float]
    convention: TokenizerConvention
    gene_name_id: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (largest id + 1)."""
        return max(self.token_dictionary.values()) + 1

    @property
    def special_token_ids(self) -> np.ndarray:
        """Ids of the special tokens present in the token dictionary, shape (n_special,), int64."""
        return np.array(
            sorted(self.token_dictionary[name] for name in (PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN)
                   if name in self.token_dictionary),
            dtype=np.int64,
        )

    def token_names(self) -> np.ndarray:
        """Gene key (or special token name) of every token id, shape (vocab_size,), object."""
        names = np.empty(self.vocab_size, dtype=object)
        for name, token_id in self.token_dictionary.items():
            names[token_id] = name
        return names

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the dictionaries as plain pickles with Geneformer's file names into ``directory``."""
        directory = Path(directory)
        written = [
            save_pickle_atomic(self.token_dictionary, directory / "token_dictionary.pkl"),
            save_pickle_atomic(self.gene_median, directory / "gene_median_dictionary.pkl"),
        ]
        if self.gene_name_id:
            written.append(save_pickle_atomic(self.gene_name_id, directory / "gene_name_id_dict.pkl"))
        return written


def _find_one(directory: Path, prefix: str, *, required: bool) -> Path | None:
    candidates = sorted(directory.glob(f"{prefix}*.pkl"))
    if len(candidates) > 1:
        raise ScgrnInputError(
            f"{len(candidates)} files match {prefix}*.pkl ({', '.join(c.name for c in candidates)})",
            file=str(directory),
            fix="keep one dictionary set per directory",
        )
    if not candidates and required:
        raise ScgrnInputError(
            f"no {prefix}*.pkl found",
            file=str(directory),
            fix="point at a folder holding Geneformer's token and gene median dictionaries",
        )
    return candidates[0] if candidates else None


def load_geneformer_dictionaries(directory: str | os.PathLike) -> GeneformerDictionaries:
    """Load Geneformer's dictionaries from a folder (e.g. ``.../geneformer/gc30M``).

    Files are found by prefix: ``token_dictionary*.pkl`` and ``gene_median_dictionary*.pkl``
    (required) and ``gene_name_id_dict*.pkl`` (optional). The convention is V2 when the
    token dictionary holds ``<cls>`` and ``<eos>``, V1 otherwise.

    Returns
    -------
    GeneformerDictionaries
        Keys as strings, token ids as Python ``int``, medians as Python ``float``.
    """
    directory = Path(directory)
    token_path = _find_one(directory, "token_dictionary", required=True)
    median_path = _find_one(directory, "gene_median_dictionary", required=True)
    name_id_path = _find_one(directory, "gene_name_id_dict", required=False)
    raw_tokens = load_pickle_restricted(token_path)
    raw_medians = load_pickle_restricted(median_path)
    for path, raw in ((token_path, raw_tokens), (median_path, raw_medians)):
        if not isinstance(raw, dict):
            raise ScgrnInputError(f"holds a {type(raw).__name__}, expected a dict", file=str(path),
                                  fix="use the dictionaries published with Geneformer")
    token_dictionary = {str(key): int(value) for key, value in raw_tokens.items()}
    for name in (PAD_TOKEN, MASK_TOKEN):
        if name not in token_dictionary:
            raise ScgrnInputError(f"token dictionary has no {name}", file=str(token_path),
                                  fix="use a Geneformer token dictionary (it starts with <pad>=0, <mask>=1)")
    convention = V2 if CLS_TOKEN in token_dictionary and EOS_TOKEN in token_dictionary else V1
    gene_name_id = {}
    if name_id_path is not None:
        gene_name_id = {str(key): str(value) for key, value in load_pickle_restricted(name_id_path).items()}
    return GeneformerDictionaries(
        token_dictionary=token_dictionary,
        gene_median={str(key): float(value) for key, value in raw_medians.items()},
        convention=convention,
        gene_name_id=gene_name_id,
    )


def corpus_gene_keys(var: pd.DataFrame, gene_name_id: Mapping[str, str] | None = None) -> np.ndarray:
    """Dictionary key of each corpus gene: its Ensembl ID where known, else its symbol.

    Parameters
    ----------
    var
        The corpus ``var`` table: index = gene symbol, optional column ``ensembl_id``.
    gene_name_id
        Symbol → Ensembl ID, used for genes whose ``ensembl_id`` is missing.

    Returns
    -------
    np.ndarray
        Shape (n_genes,), object (str).
    """
    symbols = var.index.astype(str).to_numpy()
    if "ensembl_id" in var.columns:
        ensembl = var["ensembl_id"].astype("object").to_numpy()
    else:
        ensembl = np.full(len(symbols), None, dtype=object)
    gene_name_id = gene_name_id or {}
    keys = np.empty(len(symbols), dtype=object)
    for position, (symbol, ensembl_id) in enumerate(zip(symbols, ensembl)):
        known = isinstance(ensembl_id, str) and ensembl_id != ""
        keys[position] = ensembl_id if known else gene_name_id.get(symbol, symbol)
    return keys


def normalized_counts(counts: sp.spmatrix, n_counts: np.ndarray) -> sp.csr_matrix:
    """``counts / n_counts × 10,000`` per cell, float64 CSR, shape (n_cells, n_genes)."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    n_counts = np.asarray(n_counts, dtype=np.float64)
    if n_counts.shape != (counts.shape[0],) or np.any(n_counts <= 0):
        raise ScgrnInputError(
            "n_counts must be one positive library size per cell",
            fix="recompute obs['n_counts'] as the total counts of each cell",
        )
    return sp.csr_matrix(sp.diags(TARGET_SUM / n_counts) @ counts)


def gene_nonzero_medians(counts: sp.spmatrix, n_counts: np.ndarray) -> np.ndarray:
    """Median of each gene's non-zero normalised values across cells.

    Returns
    -------
    np.ndarray
        Shape (n_genes,), float64; NaN for a gene never expressed.
    """
    normalized = normalized_counts(counts, n_counts).tocsc()
    normalized.eliminate_zeros()
    medians = np.full(normalized.shape[1], np.nan)
    for gene in range(normalized.shape[1]):
        values = normalized.data[normalized.indptr[gene]: normalized.indptr[gene + 1]]
        if values.size:
            medians[gene] = np.median(values)
    return medians


def build_corpus_dictionaries(
    counts: sp.spmatrix,
    n_counts: np.ndarray,
    gene_keys: Sequence[str],
    convention: TokenizerConvention = V1,
) -> GeneformerDictionaries:
    """Token and median dictionaries built from the corpus itself (the demo, no pretrained model).

    Special tokens take ids 0.. in the published order (``<pad>``, ``<mask>``[, ``<cls>``,
    ``<eos>``]); genes follow in corpus column order. Genes never expressed get no token.

    Parameters
    ----------
    counts
        Shape (n_cells, n_genes), raw counts.
    n_counts
        Shape (n_cells,), library size of each cell over all genes.
    gene_keys
        Shape (n_genes,), from :func:`corpus_gene_keys`; must be unique.
    """
    gene_keys = [str(key) for key in gene_keys]
    if len(set(gene_keys)) != len(gene_keys):
        raise ScgrnInputError("corpus gene keys are not unique",
                              fix="harmonise gene IDs so each Ensembl ID/symbol appears once")
    medians = gene_nonzero_medians(counts, n_counts)
    token_dictionary = {name: token_id for token_id, name in enumerate(convention.special_tokens)}
    gene_median = {}
    for key, median in zip(gene_keys, medians):
        if np.isfinite(median):
            token_dictionary[key] = len(token_dictionary)
            gene_median[key] = float(median)
    return GeneformerDictionaries(token_dictionary, gene_median, convention)


# ---------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------


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
        Shape (n_genes,), dictionary key of each column (:func:`corpus_gene_keys`).
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
