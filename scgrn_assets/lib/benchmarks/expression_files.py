"""Expression matrices given as files, for running the GRN path on data we did not simulate.

One reader per format:

- **delimited text** (``.csv``, ``.tsv``, ``.txt``; comma, tab or whitespace, plain or ``.gz``):
  the first column holds the row labels, the header row the column labels. BEELINE's
  ``ExpressionData.csv`` and SERGIO's ``simulated_noNoise_*.csv`` are genes x cells (SERGIO's
  header repeats cell-type labels). scanpy's text datasets (``datasets/krumsiek11.txt``) start
  with ``#`` comment lines; when the first row is all numbers, row label included, the last comment
  line names the columns (scanpy's convention); otherwise the first row is the header. krumsiek11 is cells x genes with the time step as row label.
- **AnnData**: ``.h5ad``, or a ``.zarr`` store such as the combined corpus; always cells x genes.
  ``obs["n_counts"]`` is the library size when present (the corpus's, over all of a cell's genes).

**Orientation** (text only) is ``genes-x-cells``, ``cells-x-genes`` or ``auto``. The ``auto`` rule:
the gene axis is the one on which the larger fraction of labels are genes of the truth network;
an axis whose labels repeat cannot be it (gene names are unique); an exact tie, no truth gene on
either axis included, is an error that asks for the orientation.

**Values** are stated, never guessed, so that non-count data is not library-size normalised by accident:

- ``counts``: non-negative integer counts (UMI or reads). Each cell is scaled to 10,000 by its
  library size, as everywhere else in the project (``n_counts`` = the cell's total).
- ``normalized``: non-negative values already comparable across cells (simulated expression such as
  BEELINE/BoolODE, SERGIO or krumsiek11; TPM, CPM). No library-size scaling: ``n_counts`` is set to
  10,000 for every cell, which makes the shared ``value / n_counts x 10,000`` the identity. The log1p
  step downstream is kept (it is monotone: Spearman, MI bins, tree splits and Geneformer ranks do not
  change; Pearson sees log1p values).

Negative values cannot be ranked (Geneformer) nor binned with a zero bin (MI): they are an error,
or set to 0 with ``clip_negative`` (e.g. krumsiek11's ODE noise around zero, down to -0.016).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.benchmarks.expression import TARGET_SUM
from scgrn_assets.lib.text_files import open_text

ORIENTATIONS = ("auto", "genes-x-cells", "cells-x-genes")
VALUE_KINDS = ("counts", "normalized")
ANNDATA_SUFFIXES = (".h5ad", ".zarr")


@dataclass
class ExpressionData:
    """A cells x genes expression matrix and how it was read.

    Attributes
    ----------
    values
        Shape (n_cells, n_genes), float64 CSR, as read (negatives clipped when asked).
    var
        One row per gene: index = gene symbol (unique); optional ``ensembl_id`` (AnnData input).
    n_counts
        Shape (n_cells,): the per-cell scale the shared code divides by before multiplying by
        10,000: the library size for ``counts``, 10,000 (no scaling) for ``normalized``.
    value_kind
        ``counts`` or ``normalized``.
    orientation
        How the file was laid out (``genes-x-cells`` or ``cells-x-genes``) and, for ``auto``, why.
    path
        The file read.
    """

    values: sp.csr_matrix
    var: pd.DataFrame
    n_counts: np.ndarray
    value_kind: str
    orientation: str
    path: str
    study: np.ndarray | None = None
    """Shape (n_cells,), str: each cell's study (AnnData ``obs["study"]``), or None (one study)."""

    @property
    def gene_names(self) -> list[str]:
        return self.var.index.astype(str).tolist()

    @property
    def n_cells(self) -> int:
        return self.values.shape[0]

    @property
    def n_genes(self) -> int:
        return self.values.shape[1]


def read_expression(
    path: str | Path,
    *,
    values: str,
    orientation: str = "auto",
    truth_genes: Sequence[str] | None = None,
    clip_negative: bool = False,
) -> ExpressionData:
    """Read an expression matrix file into cells x genes (see the module docstring for formats and rules).

    Parameters
    ----------
    path
        A delimited text file (optionally ``.gz``), an ``.h5ad`` file or a ``.zarr`` AnnData store.
    values
        ``counts`` or ``normalized`` (required: it decides whether cells are library-size scaled).
    orientation
        ``auto``, ``genes-x-cells`` or ``cells-x-genes`` (text files only; AnnData is cells x genes).
    truth_genes
        Genes of the truth network; needed by ``orientation="auto"`` and checked against the genes read.
    clip_negative
        Set negative values to 0 instead of failing.

    Returns
    -------
    ExpressionData
    """
    path = Path(path)
    if values not in VALUE_KINDS:
        raise ScgrnInputError(f"unknown value kind {values!r}", file=str(path),
                              fix=f"pass --values {' or --values '.join(VALUE_KINDS)}")
    if orientation not in ORIENTATIONS:
        raise ScgrnInputError(f"unknown orientation {orientation!r}", file=str(path),
                              fix=f"pass --orientation as one of {', '.join(ORIENTATIONS)}")
    if not path.exists():
        raise ScgrnInputError("expression file not found", file=str(path), fix="check the --expression path")
    if path.suffix in ANNDATA_SUFFIXES:
        if orientation == "genes-x-cells":
            raise ScgrnInputError("AnnData is cells x genes by definition", file=str(path),
                                  fix="drop --orientation genes-x-cells (or pass auto / cells-x-genes)")
        matrix, var, library_sizes, study = _read_anndata(path)
        how = "cells-x-genes (AnnData)"
    else:
        row_labels, column_labels, table = _read_delimited(path)
        how = _decide_orientation(orientation, row_labels, column_labels, truth_genes, path)
        if how.startswith("genes-x-cells"):
            genes, table = row_labels, table.T
        else:
            genes = column_labels
        _require_unique_genes(genes, path, how)
        matrix = sp.csr_matrix(table)
        var = pd.DataFrame(index=pd.Index(genes, dtype=object, name="gene_symbol"))
        library_sizes = study = None
    matrix = _checked_values(matrix, values, clip_negative, path)
    if values == "counts":
        n_counts = np.asarray(matrix.sum(axis=1)).ravel() if library_sizes is None else library_sizes
        empty = np.flatnonzero(n_counts <= 0)
        if len(empty):
            raise ScgrnInputError(f"{len(empty)} cells have no counts (e.g. cell {int(empty[0]) + 1})",
                                  file=str(path), fix="remove empty cells before benchmarking")
    else:
        n_counts = np.full(matrix.shape[0], TARGET_SUM)
    return ExpressionData(values=matrix, var=var, n_counts=np.asarray(n_counts, dtype=np.float64),
                          value_kind=values, orientation=how, path=str(path), study=study)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_delimited(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, column labels, values as rows x columns float64) of a labelled text table."""
    with open_text(path) as handle:
        text = handle.read()
    lines = text.splitlines()
    comments = [line for line in lines if line.startswith("#")]
    numbered = [(number, line) for number, line in enumerate(lines, start=1)
                if line.strip() and not line.startswith("#")]
    body = [line for _, line in numbered]
    if len(body) < 2:
        raise ScgrnInputError("has fewer than two table lines", file=str(path),
                              fix="pass a matrix with a header row and one row per gene or cell")
    separator = "," if "," in body[0] else ("\t" if "\t" in body[0] else None)

    def fields(line: str) -> list[str]:
        parts = line.split(separator) if separator else line.split()
        return [part.strip().strip('"') for part in parts]

    first = fields(body[0])
    if comments and all(_is_number(field) for field in first):
        # scanpy's text datasets: no header row (even the row label is a number, e.g. a time step);
        # the last comment line names the columns.
        header = fields(comments[-1].lstrip("#"))
        data_lines = numbered
    else:
        header, data_lines = first, numbered[1:]
    rows = [fields(line) for _, line in data_lines]
    if len(header) == len(rows[0]) - 1:  # R style: no label above the row labels
        header = [""] + header
    n_fields = len(header)
    for (line_number, _), row in zip(data_lines, rows):
        if len(row) != n_fields:
            raise ScgrnInputError(f"line {line_number} has {len(row)} fields, expected {n_fields} (a label, then "
                                  f"one value per column of the header)", file=str(path),
                                  fix="repair the file: every line needs the header's number of fields")
    row_labels = [row[0] for row in rows]
    try:
        table = np.array([[float(value) for value in row[1:]] for row in rows], dtype=np.float64)
    except ValueError as error:
        raise ScgrnInputError(f"has a value that is not a number ({error})", file=str(path),
                              fix="the first column holds labels, every other field must be a number") from None
    if not np.isfinite(table).all():
        raise ScgrnInputError("has NaN or infinite values", file=str(path), fix="filter or impute them first")
    return row_labels, header[1:], table


def _decide_orientation(orientation: str, row_labels: list[str], column_labels: list[str],
                        truth_genes: Sequence[str] | None, path: Path) -> str:
    truth = set(map(str, truth_genes or ()))
    in_rows = sum(label in truth for label in set(row_labels))
    in_columns = sum(label in truth for label in set(column_labels))
    counts = (f"{in_rows} of {len(set(row_labels))} distinct row labels and {in_columns} of "
              f"{len(set(column_labels))} distinct column labels are truth genes")
    if orientation != "auto":
        return f"{orientation} (given; {counts})" if truth else f"{orientation} (given)"
    if not truth:
        raise ScgrnInputError("orientation 'auto' needs the truth network's genes", file=str(path),
                              fix="pass --orientation genes-x-cells or cells-x-genes")

    def share(labels: list[str], matched: int) -> float:
        # Gene names are unique: an axis with repeated labels (cell types, time steps) is the cell axis.
        return -1.0 if len(set(labels)) < len(labels) else matched / max(len(set(labels)), 1)

    row_share, column_share = share(row_labels, in_rows), share(column_labels, in_columns)
    if row_share == column_share:
        raise ScgrnInputError(f"cannot tell genes from cells: {counts}", file=str(path),
                              fix="pass --orientation genes-x-cells or cells-x-genes (and check that the truth "
                                  "uses the expression's gene identifiers)")
    chosen = "genes-x-cells" if row_share > column_share else "cells-x-genes"
    return f"{chosen} (auto: {counts})"


def _require_unique_genes(genes: list[str], path: Path, how: str) -> None:
    seen, duplicated = set(), []
    for gene in genes:
        if gene in seen:
            duplicated.append(gene)
        seen.add(gene)
    if duplicated:
        raise ScgrnInputError(f"gene labels repeat (e.g. {duplicated[0]!r}) in a {how} reading", file=str(path),
                              fix="check --orientation, or make the gene labels unique")
    if any(gene == "" for gene in genes):
        raise ScgrnInputError(f"a gene label is empty in a {how} reading", file=str(path),
                              fix="give every gene a name")


def _read_anndata(path: Path) -> tuple[sp.csr_matrix, pd.DataFrame, np.ndarray | None, np.ndarray | None]:
    import anndata as ad

    adata = ad.read_zarr(str(path)) if path.suffix == ".zarr" else ad.read_h5ad(str(path))
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str), dtype=object, name="gene_symbol"))
    if "ensembl_id" in adata.var.columns:
        var["ensembl_id"] = adata.var["ensembl_id"].to_numpy()
    library_sizes = adata.obs["n_counts"].to_numpy(dtype=np.float64) if "n_counts" in adata.obs else None
    _require_unique_genes(var.index.tolist(), path, "cells-x-genes (AnnData)")
    study = adata.obs["study"].astype(str).to_numpy() if "study" in adata.obs else None
    matrix = sp.csr_matrix(adata.X, dtype=np.float64)
    # A corpus written with int64 indptr and int32 indices reads back mixed, and scipy's compiled
    # routines (eliminate_zeros) refuse mixed index types: one type for both.
    index_dtype = np.promote_types(matrix.indptr.dtype, matrix.indices.dtype)
    matrix = sp.csr_matrix((matrix.data, matrix.indices.astype(index_dtype), matrix.indptr.astype(index_dtype)),
                           shape=matrix.shape)
    return matrix, var, library_sizes, study


def _checked_values(matrix: sp.csr_matrix, values: str, clip_negative: bool, path: Path) -> sp.csr_matrix:
    matrix = sp.csr_matrix(matrix, dtype=np.float64)
    if not np.isfinite(matrix.data).all():
        raise ScgrnInputError("has NaN or infinite values", file=str(path), fix="filter or impute them first")
    negative = matrix.data < 0
    if negative.any():
        if not clip_negative:
            raise ScgrnInputError(
                f"has {int(negative.sum())} negative values (smallest {matrix.data.min():.4g})", file=str(path),
                fix="pass --clip-negative to set them to 0 (e.g. simulation noise around zero), or fix the input")
        matrix.data[negative] = 0.0
    if values == "counts" and not np.array_equal(matrix.data, np.round(matrix.data)):
        example = matrix.data[matrix.data != np.round(matrix.data)][0]
        raise ScgrnInputError(f"--values counts, but it has non-integer values (e.g. {example:.6g})", file=str(path),
                              fix="pass --values normalized for simulated, normalised or otherwise continuous values")
    matrix.eliminate_zeros()
    return matrix


def genes_missing_from(data: ExpressionData, truth_genes: Sequence[str]) -> list[str]:
    """Truth genes that are not genes of the expression matrix, in the truth's order."""
    present = set(data.gene_names)
    return [gene for gene in dict.fromkeys(map(str, truth_genes)) if gene not in present]
