"""Corpus: every study's cells over the union of genes, QC-filtered, as one AnnData Zarr; the integrity
scans behind the checks.

Modules:

- ``build``: The combined corpus: every study's cells over the union of genes, QC-filtered, as AnnData
  Zarr.
- ``qc_checks``: Integrity scans behind the asset checks: counts are finite non-negative integers, no
  sentinels.
- ``study_files``: A study's ``.h5ad`` as the corpus reads it: obs and var alone, or X in blocks of
  rows.
- ``thresholds``: The corpus QC thresholds: their fields are the keys a catalog's ``qc:`` section may
  set.

Public names are importable from the package (``from scgrn_assets.lib.corpus import X``); each
module loads on first use, so importing the package stays cheap.
"""

from scgrn_assets.lib._lazy import lazy_exports

# Each module and the public names it holds.
_PUBLIC = {
    "build": ("CorpusSummary", "measured_column", "combine_studies", "align_csr", "read_corpus"),
    "study_files": ("read_study_obs", "study_gene_names", "iter_row_chunks", "read_study_frames",
        "CsrBlock", "BlockBuffers", "iter_csr_blocks"),
    "thresholds": ("QCThresholds", "QC_FIELDS"),
    "qc_checks": ("CountScan", "scan_counts", "row_fingerprints", "cells_repeated_across_studies"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _PUBLIC)
