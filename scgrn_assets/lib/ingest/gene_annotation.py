"""The gene annotation table: symbol, Ensembl ID and gene length (bp) per gene."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError

ANNOTATION_COLUMNS = ["gene_symbol", "ensembl_id", "gene_length_bp"]


def read_gene_annotation(path: Path) -> pd.DataFrame:
    """A TSV with columns gene_symbol, ensembl_id, gene_length_bp; indexed by symbol."""
    table = pd.read_csv(path, sep="\t", dtype={"gene_symbol": str, "ensembl_id": str})
    missing = [c for c in ANNOTATION_COLUMNS if c not in table.columns]
    if missing:
        raise ScgrnInputError(f"gene annotation lacks columns {missing}", file=str(path),
                              fix=f"provide a TSV with columns {ANNOTATION_COLUMNS}")
    if (pd.to_numeric(table["gene_length_bp"], errors="coerce") <= 0).any():
        raise ScgrnInputError("gene annotation has non-positive gene lengths", file=str(path),
                              fix="gene_length_bp must be a positive number of base pairs")
    return table.drop_duplicates("gene_symbol").set_index("gene_symbol", drop=False)


def empty_gene_annotation() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c != "gene_length_bp" else float) for c in ANNOTATION_COLUMNS})
