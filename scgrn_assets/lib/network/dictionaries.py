"""Geneformer's dictionaries and conventions: token and gene-median dictionaries, published or built
from the corpus, and the two conventions (Theodoris et al. 2023; Chen et al. 2024):

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
