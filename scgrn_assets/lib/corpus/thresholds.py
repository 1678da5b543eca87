"""The corpus QC thresholds: their fields are the keys a catalog's ``qc:`` section may set."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class QCThresholds:
    """Cell and gene filters applied when combining. Defaults suit UMI and plate data alike."""

    min_counts_per_cell: int = 500     # library size over all of the study's genes
    min_genes_per_cell: int = 100      # genes detected (count > 0)
    min_cells_per_gene: int = 3        # a gene detected in fewer cells carries no signal


#: The QC field names, in order: the catalog's ``qc:`` keys and the corpus asset's config fields.
QC_FIELDS: tuple[str, ...] = tuple(field.name for field in fields(QCThresholds))

__all__ = ["QCThresholds", "QC_FIELDS"]
