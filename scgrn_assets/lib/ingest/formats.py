"""The study layouts a catalog's ``format:`` may name: the one list of them.

Each has a reader in :data:`scgrn_assets.lib.ingest.readers.READERS` (checked when that module
loads), the demo writes four of them (:mod:`scgrn_assets.lib.demo.geo_layouts`), and the catalog
refuses any other name.
"""

from __future__ import annotations

#: GSE98969-style: RAW tar of per-sample GSM…_<name>.txt.gz, genes x cells, tab-separated.
RAW_TAR_DENSE_TSV = "raw_tar_dense_tsv"
#: GSE123025-style: one processed CSV.gz, genes x cells, cells named <well>.<plate>.
PROCESSED_CSV_WELL_PLATE = "processed_csv_well_plate"
#: GSE121654-style: Drop-seq DGE text files with R's X prefix on digit-initial symbols.
RAW_TAR_DROPSEQ_DGE = "raw_tar_dropseq_dge"
#: 10x Genomics MTX triplets per sample, flattened into a RAW tar as GEO does.
RAW_TAR_10X_MTX = "raw_tar_10x_mtx"
#: GEO's own re-processing of bulk RNA-seq series: one GeneID x GSM raw counts table.
NCBI_RNASEQ_COUNTS = "ncbi_rnaseq_counts"

#: Every study format, with the one-line description a user sees.
STUDY_FORMATS: dict[str, str] = {
    RAW_TAR_DENSE_TSV: "RAW tar of per-sample genes x cells tab-separated text (.txt.gz)",
    PROCESSED_CSV_WELL_PLATE: "one processed genes x cells CSV.gz, cells named <well>.<plate>",
    RAW_TAR_DROPSEQ_DGE: "RAW tar of per-sample Drop-seq DGE files (.dge.txt.gz)",
    RAW_TAR_10X_MTX: "RAW tar of per-sample 10x matrix.mtx.gz / features.tsv.gz / barcodes.tsv.gz",
    NCBI_RNASEQ_COUNTS: "NCBI-generated GeneID x GSM raw counts (.tsv.gz), one bulk sample per column",
}

__all__ = ["STUDY_FORMATS", "RAW_TAR_DENSE_TSV", "PROCESSED_CSV_WELL_PLATE", "RAW_TAR_DROPSEQ_DGE", "RAW_TAR_10X_MTX",
           "NCBI_RNASEQ_COUNTS"]
