"""Ingest: catalogs, safe downloads and checksum pins, archives, one reader per study layout, gene
harmonisation, one study as AnnData.

Modules:

- ``archive``: Safe, streaming reading of tar archives (GEO ``*_RAW.tar`` and the like).
- ``catalog``: Study catalogs: which public studies make up a corpus, where their files are, how to read
  them.
- ``catalog_schema``: The shape of a catalog file, as pydantic models: what
  :func:`catalog.parse_catalog` validates first.
- ``checksum_lock``: Trust on first use: sha256 pins for catalog files whose catalog entry carries no
  sha256.
- ``dense_text``: Streaming parser for genes x cells count matrices written as delimited text.
- ``download``: Safe downloads: retries, resume, size guard, sha256 verification and an atomic rename.
- ``formats``: The study layouts a catalog's ``format:`` may name: the one list of them.
- ``gene_annotation``: The gene annotation table: symbol, Ensembl ID and gene length (bp) per gene.
- ``genes``: Gene identifier harmonisation: one mouse (or human) symbol namespace across studies.
- ``metadata_tables``: Metadata tables of a study: an SraRunTable, a GEO series matrix, or any CSV/TSV,
  as strings.
- ``mtx_text``: Streaming parser for Matrix Market coordinate files (10x ``matrix.mtx.gz``).
- ``read_ahead``: Run an iterator one or more items ahead in a background thread.
- ``readers``: One reader per study layout. Each yields the samples of a study as cells x genes counts.
- ``strict_yaml``: YAML for files a user may get from someone else (catalogs, their lock files): plain
  data, read as written.
- ``study_anndata``: One study as an AnnData: read its samples, harmonise genes, join metadata, derive
  condition.
- ``transfer``: One attempt at a download: an HTTP(S) body, resumed with Range, or a local file copied,
  hashed as written.

Public names are importable from the package (``from scgrn_assets.lib.ingest import X``); each
module loads on first use, so importing the package stays cheap.
"""

from scgrn_assets.lib._lazy import lazy_exports

# Each module and the public names it holds.
_PUBLIC = {
    "archive": ("ExtractionLimits", "read_guard", "open_maybe_gzip", "iter_tar_members"),
    "catalog": ("StudyFile", "ConditionRule", "MetadataJoin", "Study", "ReferenceEntry", "Catalog",
        "builtin_catalog_path", "resolve_catalog_path", "load_catalog", "parse_catalog", "expand_variables",
        "allowed_file_roots", "refuse_file_url_outside_roots"),
    "catalog_schema": ("CatalogDoc", "StudyDoc", "FileDoc", "MetadataDoc", "ReferenceDoc",
        "validate_catalog_document"),
    "checksum_lock": ("ChecksumLock", "Pin", "fetch_pinned"),
    "dense_text": ("DenseTextMatrix", "read_dense_text_matrix", "format_dense_text_rows"),
    "download": ("DownloadPolicy", "FetchResult", "sha256_of", "fetch_file", "parse_url_mirrors",
        "apply_url_mirrors"),
    "formats": ("STUDY_FORMATS", "RAW_TAR_DENSE_TSV", "PROCESSED_CSV_WELL_PLATE", "RAW_TAR_DROPSEQ_DGE",
        "RAW_TAR_10X_MTX", "NCBI_RNASEQ_COUNTS"),
    "gene_annotation": ("read_gene_annotation", "empty_gene_annotation"),
    "genes": ("normalise_name", "normalise_names", "strip_r_prefix", "strip_ensembl_version",
        "harmonise_gene_ids", "refuse_identifiers_of_another_type", "drop_spike_ins",
        "sum_duplicate_genes"),
    "metadata_tables": ("read_metadata_table", "read_series_matrix"),
    "mtx_text": ("read_mtx_coo", "refuse_repeated_coordinates"),
    "read_ahead": ("read_ahead",),
    "readers": ("SampleCounts", "SkippedSample", "READERS", "read_study_samples", "read_dense_count_block",
        "normalise_plate_id"),
    "strict_yaml": ("StrictYamlError", "load_strict_yaml"),
    "study_anndata": ("StudyReadReport", "GeneUnion", "iter_study_blocks", "build_study_anndata",
        "write_study_h5ad", "cell_identities"),
    "transfer": ("url_for_messages", "TransientFailure", "RangeNotSatisfiable", "Download",
        "source_record_path", "recorded_source_is", "record_source", "parse_allowed_hosts",
        "allowed_hosts_from_environment", "host_and_port", "allow_entry", "RefusedAddress",
        "copy_local_file", "download_http"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _PUBLIC)
