"""Gene identifier harmonisation: one mouse (or human) symbol namespace across studies."""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError

# R's make.names() prefixes names that start with a digit with "X" (0610007P14Rik -> X0610007P14Rik).
_R_DIGIT_PREFIX = re.compile(r"^X(?=\d)")
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")
# ERCC spike-in controls (MARS-seq and Smart-seq2 tables list them as genes): synthetic RNA, no gene.
_SPIKE_IN = re.compile(r"^ERCC-\d{5}$")


# Control characters (NUL, CR, ...) have no place in a name; HDF5 cannot even store a NUL.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def normalise_name(name: str) -> str:
    """The one spelling of a gene or cell name, whichever reader found it.

    Format characters (Unicode category Cf: a byte-order mark, zero-width spaces and joiners,
    direction marks) are removed, no-break spaces become plain spaces, then surrounding spaces
    and one pair of surrounding double quotes (R and some 10x exports quote names) are removed:
    ``"Apoe"``, `` Apoe ``, ``Apo\u200be`` and ``Apoe`` are one gene.
    """
    if not name.isascii():  # the usual name is ASCII: no per-character look-up
        name = "".join(" " if c == "\u00a0" else c for c in name if unicodedata.category(c) != "Cf")
    text = name.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


def normalise_names(names: list[str], *, kind: str, study: str, file: str) -> list[str]:
    """:func:`normalise_name` of each; a name holding a control character or U+FFFD is an error naming the file."""
    normalised = [normalise_name(name) for name in names]
    for index, name in enumerate(normalised):
        if _CONTROL_CHARACTER.search(name):
            raise ScgrnInputError(f"{kind} name {name!r} (entry {index + 1}) holds a control character",
                                  study=study, file=file,
                                  fix="re-download the file (it is corrupt or was written with the wrong line "
                                      "endings), or exclude the sample")
        if "\ufffd" in name:
            # Names that differed in their undecodable bytes would merge on it (and their counts be summed).
            raise ScgrnInputError(f"{kind} name {name!r} (entry {index + 1}) holds U+FFFD, the replacement "
                                  "character: the file was decoded with the wrong encoding before it was saved",
                                  study=study, file=file,
                                  fix="re-download the original file (from GEO), or exclude the sample")
    return normalised


def strip_r_prefix(symbols: list[str]) -> list[str]:
    """Undo R's ``X`` prefix on digit-initial symbols; ``Xist`` and ``Xkr4`` stay as they are."""
    return [_R_DIGIT_PREFIX.sub("", s) for s in symbols]


def strip_ensembl_version(ids: list[str]) -> list[str]:
    """``ENSMUSG00000000001.4`` -> ``ENSMUSG00000000001``."""
    return [_ENSEMBL_VERSION.sub(r"\1", g) for g in ids]


def harmonise_gene_ids(gene_ids: list[str], *, gene_id_type: str, symbols: list[str] | None,
                       strip_r: bool, ensembl_to_symbol: dict[str, str] | None,
                       study: str, file: str) -> tuple[list[str], list[str | None]]:
    """Return (gene_symbol, ensembl_id) per input gene.

    Symbols come from the file when it carries them (10x features), else from the
    identifiers themselves (``gene_id_type: symbol``) or a catalog gene map (Ensembl IDs,
    or NCBI GeneIDs with ``gene_id_type: entrez``, whose ``ensembl_id`` stays unknown).
    """
    gene_ids = normalise_names(gene_ids, kind="gene", study=study, file=file)
    if symbols is not None:
        symbols = normalise_names(symbols, kind="gene", study=study, file=file)
    refuse_identifiers_of_another_type(gene_ids, gene_id_type, study=study, file=file)
    if gene_id_type == "symbol":
        out_symbols = strip_r_prefix(gene_ids) if strip_r else list(gene_ids)
        ensembl: list[str | None] = [None] * len(gene_ids)
    else:
        identifiers = strip_ensembl_version(gene_ids) if gene_id_type == "ensembl" else list(gene_ids)
        ensembl = identifiers if gene_id_type == "ensembl" else [None] * len(gene_ids)
        id_name = "Ensembl IDs" if gene_id_type == "ensembl" else "NCBI GeneIDs"
        if symbols is not None:
            out_symbols = list(symbols)
        elif ensembl_to_symbol is not None:
            missing = [g for g in identifiers if g not in ensembl_to_symbol]
            if len(missing) == len(identifiers):
                raise ScgrnInputError(f"none of {len(identifiers)} {id_name} (e.g. {identifiers[0]}) is in the gene "
                                      "map", study=study, file=file, fix="check the catalog's gene_map file and species")
            # Unmapped IDs keep their ID as the symbol, so no counts are dropped silently.
            out_symbols = [ensembl_to_symbol.get(g, g) for g in identifiers]
        else:
            raise ScgrnInputError(f"has {id_name} but no symbols and the study has no gene_map file", study=study,
                                  file=file, fix="add a file with role: gene_map (identifier, gene_symbol)")
        if strip_r:
            out_symbols = strip_r_prefix(out_symbols)
    empty = [i for i, s in enumerate(out_symbols) if not s or s.lower() in ("nan", "na")]
    if empty:
        raise ScgrnInputError(f"has {len(empty)} genes without a name (first at row {empty[0] + 1})", study=study,
                              file=file, fix="re-download the file or exclude the sample")
    return out_symbols, ensembl


_ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")


def refuse_identifiers_of_another_type(gene_ids: list[str], gene_id_type: str, *, study: str, file: str) -> None:
    """Raise when most identifiers are not of the catalog's ``gene_id_type``.

    A 10x study declared ``symbol`` would otherwise take the Ensembl IDs in the features file's
    first column as gene names: a union of two namespaces, and no warning. A minority is fine
    (symbol tables name a few unannotated genes by their Ensembl ID).
    """
    if not gene_ids:
        return
    n_ensembl = sum(1 for g in gene_ids if _ENSEMBL_ID.match(g))
    n_numeric = sum(1 for g in gene_ids if g.isdigit())
    majority = len(gene_ids) / 2
    found = ("Ensembl IDs" if n_ensembl > majority else "NCBI GeneIDs (numbers)" if n_numeric > majority
             else "symbols")
    expected = {"symbol": "symbols", "ensembl": "Ensembl IDs", "entrez": "NCBI GeneIDs (numbers)"}[gene_id_type]
    if found != expected:
        right = {"symbols": "symbol", "Ensembl IDs": "ensembl", "NCBI GeneIDs (numbers)": "entrez"}[found]
        raise ScgrnInputError(
            f"the catalog declares gene_id_type: {gene_id_type}, but its gene identifiers are {found} "
            f"(e.g. {gene_ids[:3]})", study=study, file=file,
            fix=f"set gene_id_type: {right} for this study in the catalog")


def drop_spike_ins(counts: sp.csr_matrix, symbols: list[str],
                   ensembl: list[str | None]) -> tuple[sp.csr_matrix, list[str], list[str | None], list[str]]:
    """Remove ERCC spike-in columns (``ERCC-00002``...): they are synthetic controls, not mouse genes.

    Returns (counts, symbols, ensembl, the spike-in names removed).
    """
    spike = np.fromiter((bool(_SPIKE_IN.match(s)) for s in symbols), dtype=bool, count=len(symbols))
    if not spike.any():
        return counts, list(symbols), list(ensembl), []
    keep = np.flatnonzero(~spike)
    return (counts[:, keep].tocsr(), [symbols[i] for i in keep], [ensembl[i] for i in keep],
            [symbols[i] for i in np.flatnonzero(spike)])


def sum_duplicate_genes(counts: sp.csr_matrix, symbols: list[str], ensembl: list[str | None], *,
                        study: str | None = None,
                        file: str | None = None) -> tuple[sp.csr_matrix, list[str], list[str | None]]:
    """Sum columns that share a symbol (e.g. two Ensembl IDs of one gene); first Ensembl ID kept.

    Sums are accumulated in int64 (float64 for float counts) and returned in the input's
    dtype; an integer sum that does not fit it is refused with ``ScgrnInputError`` rather than
    wrapped (int32 counts of two duplicates past 2^31 used to come out negative).
    """
    unique, first_index, inverse = np.unique(np.asarray(symbols, dtype=object), return_index=True,
                                             return_inverse=True)
    if len(unique) == len(symbols):
        return counts, list(symbols), list(ensembl)
    # Order by first occurrence so gene order stays that of the file.
    order = np.argsort(first_index)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    n_genes = len(symbols)
    out_dtype = counts.dtype
    wide = np.int64 if np.issubdtype(out_dtype, np.integer) else np.float64
    aggregate = sp.csr_matrix((np.ones(n_genes, dtype=wide), (np.arange(n_genes), rank[inverse])),
                              shape=(n_genes, len(unique)))
    summed = (sp.csr_matrix(counts).astype(wide) @ aggregate).tocsr()
    if np.issubdtype(out_dtype, np.integer) and summed.nnz:
        limits = np.iinfo(out_dtype)
        outside = (summed.data > limits.max) | (summed.data < limits.min)
        if outside.any():
            gene = symbols[first_index[order][summed.indices[np.argmax(outside)]]]
            raise ScgrnInputError(f"duplicate entries of gene {gene} add up to a count outside {out_dtype} "
                                  f"({limits.min}..{limits.max})", study=study, file=file,
                                  fix="check that the file holds raw counts (not scaled values) and that its gene "
                                      "identifiers are not repeated by mistake")
    return (summed.astype(out_dtype), [symbols[i] for i in first_index[order]],
            [ensembl[i] for i in first_index[order]])
