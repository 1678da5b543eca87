"""One reader per study layout. Each yields the samples of a study as cells x genes counts.

The readers only parse: gene identifiers come back exactly as written in the file
(harmonisation is :mod:`scgrn_assets.lib.genes`), and metadata joins happen in
:mod:`scgrn_assets.lib.study_anndata`. Archives are streamed member by member, never
extracted whole and never held in memory whole.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.archive import ExtractionLimits, iter_tar_members, open_maybe_gzip, read_guard
from scgrn_assets.lib.catalog import Study
from scgrn_assets.lib.dense_text import read_dense_text_matrix
from scgrn_assets.lib.errors import ScgrnInputError

_GSM_MEMBER = re.compile(r"^(?P<sample>GSM\d+)_(?P<name>.+?)(?P<suffix>\.dge\.txt\.gz|\.txt\.gz)$")
# Header and comment lines of a Matrix Market file are short; reading one is bounded (bombs).
_MAX_MTX_LINE_BYTES = 1 << 20
_TENX_MEMBER = re.compile(
    r"^(?P<sample>GSM\d+)_(?P<name>.+?)_?(?P<kind>matrix\.mtx|features\.tsv|genes\.tsv|barcodes\.tsv)\.gz$")


@dataclass
class SampleCounts:
    """One sample as read from its file(s): counts (n_cells x n_genes, int32 CSR)."""

    sample: str                       # e.g. the GSM accession
    sample_name: str                  # the descriptive part of the file name
    source_file: str                  # for error messages
    cell_names: list[str]
    gene_ids: list[str]               # identifiers as written in the file
    counts: sp.csr_matrix
    gene_symbols: list[str] | None = None   # when the file carries symbols next to IDs (10x features)
    cell_plates: list[str] | None = None    # well/plate layouts: plate of each cell (cell_names hold wells)


def read_study_samples(study: Study, raw_dir: Path, progress: Callable[[str], None] | None = None, *,
                       limits: ExtractionLimits = ExtractionLimits()) -> Iterator[SampleCounts]:
    """Dispatch to the reader of ``study.format``; files are in ``raw_dir`` by catalog name.

    ``limits`` bound archive members and every decompressed file (``max_member_bytes``).
    """
    reader = READERS[study.format]
    for count_file in study.files_with_role("counts"):
        path = raw_dir / count_file.name
        if not path.exists():
            raise ScgrnInputError(f"count file {path} is missing", study=study.accession, file=count_file.name,
                                  fix="materialise geo_raw_archive for this study first")
        yield from reader(study, path, progress, limits=limits)


def _member_name(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def read_raw_tar_dense_tsv(study: Study, path: Path, progress=None, *,
                           limits: ExtractionLimits = ExtractionLimits()) -> Iterator[SampleCounts]:
    """GSE98969-style RAW tar: per-sample ``GSM…_<name>.txt.gz``, genes x cells, tab-separated."""
    yield from _read_dense_members(study, path, suffix=".txt.gz", progress=progress, limits=limits)


def read_raw_tar_dropseq_dge(study: Study, path: Path, progress=None, *,
                             limits: ExtractionLimits = ExtractionLimits()) -> Iterator[SampleCounts]:
    """GSE121654-style RAW tar: per-sample Drop-seq ``GSM…_<name>.dge.txt.gz`` (header ``GENE``)."""
    yield from _read_dense_members(study, path, suffix=".dge.txt.gz", progress=progress, limits=limits)


def _read_dense_members(study: Study, path: Path, *, suffix: str, progress,
                        limits: ExtractionLimits) -> Iterator[SampleCounts]:
    found = 0
    for member, stream in iter_tar_members(path, study=study.accession, limits=limits):
        name = _member_name(member)
        match = _GSM_MEMBER.match(name)
        if not match or match.group("suffix") != suffix:
            continue  # GEO RAW tars also hold unrelated supplementary files
        found += 1
        if progress:
            progress(name)
        with read_guard(study=study.accession, file=f"{path.name}:{name}"):
            text = open_maybe_gzip(stream, name=name, max_bytes=limits.max_member_bytes, study=study.accession)
            matrix = read_dense_text_matrix(text, sep="\t",
                                            study=study.accession, file=f"{path.name}:{name}")
        yield SampleCounts(sample=match.group("sample"), sample_name=match.group("name"), source_file=name,
                           cell_names=matrix.cell_names, gene_ids=matrix.gene_names, counts=matrix.counts)
    if not found:
        raise ScgrnInputError(f"holds no GSM…{suffix} sample files", study=study.accession, file=path.name,
                              fix=f"check the catalog's format ({study.format}) against the archive's contents")


def read_processed_csv_well_plate(study: Study, path: Path, progress=None, *,
                                  limits: ExtractionLimits = ExtractionLimits()) -> Iterator[SampleCounts]:
    """GSE123025-style processed CSV: genes x cells, cells named ``<well>.<plate>``.

    One "sample" per plate, so per-sample checks (duplicate barcodes) stay meaningful.
    """
    if progress:
        progress(path.name)
    with path.open("rb") as raw, read_guard(study=study.accession, file=path.name):
        text = open_maybe_gzip(raw, name=path.name, max_bytes=limits.max_member_bytes, study=study.accession)
        matrix = read_dense_text_matrix(text, sep=",",
                                        study=study.accession, file=path.name)
    if not matrix.cell_names:
        raise ScgrnInputError("has no cell columns", study=study.accession, file=path.name,
                              fix="re-download the file; check the catalog's format for this study")
    wells, plates = [], []
    for cell in matrix.cell_names:
        well, dot, plate = cell.rpartition(".")
        if not dot or not well or not plate:
            raise ScgrnInputError(f"cell column {cell!r} is not named <well>.<plate>", study=study.accession,
                                  file=path.name, fix="check the catalog's format for this study")
        wells.append(well.upper())
        plates.append(normalise_plate_id(plate))
    plates_array = np.asarray(plates)
    for plate in sorted(set(plates), key=_natural_key):
        rows = np.flatnonzero(plates_array == plate)
        yield SampleCounts(sample=f"plate{plate}", sample_name=f"plate{plate}", source_file=path.name,
                           cell_names=[wells[i] for i in rows], gene_ids=matrix.gene_names,
                           counts=matrix.counts[rows], cell_plates=[plate] * len(rows))


def normalise_plate_id(value: object) -> str:
    """``12``, ``"12"``, ``12.0`` and ``"12.0"`` are one plate: pandas reads plate ids as floats."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_raw_tar_10x_mtx(study: Study, path: Path, progress=None, *,
                         limits: ExtractionLimits = ExtractionLimits()) -> Iterator[SampleCounts]:
    """RAW tar of per-sample 10x triplets ``GSM…_<name>_{matrix.mtx,features.tsv,barcodes.tsv}.gz``.

    Members of one sample may come in any order; each sample is yielded once all three
    have been read (features and barcodes are small; only the matrix is large).
    """
    pending: dict[tuple[str, str], dict[str, object]] = {}
    found = 0
    for member, stream in iter_tar_members(path, study=study.accession, limits=limits):
        name = _member_name(member)
        match = _TENX_MEMBER.match(name)
        if not match:
            continue
        key = (match.group("sample"), match.group("name").rstrip("_"))
        kind = match.group("kind").split(".")[0].replace("genes", "features")
        where = f"{path.name}:{name}"
        with read_guard(study=study.accession, file=where):
            text = open_maybe_gzip(stream, name=name, max_bytes=limits.max_member_bytes, study=study.accession)
            if kind == "matrix":
                if progress:
                    progress(name)
                parts = pending.setdefault(key, {})
                parts["matrix"] = _read_mtx(text, study=study.accession, file=where)
            else:
                pending.setdefault(key, {})[kind] = _read_10x_names(text, study=study.accession, file=where)
            parts = pending[key]
        if {"matrix", "features", "barcodes"} <= set(parts):
            found += 1
            yield _assemble_10x(study, key, pending.pop(key), where)
    if pending:
        (sample, name), parts = next(iter(pending.items()))
        missing = sorted({"matrix", "features", "barcodes"} - set(parts))
        raise ScgrnInputError(f"sample {sample}_{name} lacks its {', '.join(missing)} file(s)", study=study.accession,
                              file=path.name, fix="re-download the archive or exclude the sample")
    if not found:
        raise ScgrnInputError("holds no 10x matrix/features/barcodes triplets", study=study.accession, file=path.name,
                              fix=f"check the catalog's format ({study.format}) against the archive's contents")


def _assemble_10x(study: Study, key: tuple[str, str], parts: dict, where: str) -> SampleCounts:
    sample, name = key
    features: pd.DataFrame = parts["features"]
    barcodes: pd.DataFrame = parts["barcodes"]
    matrix: sp.coo_matrix = parts["matrix"]  # features x barcodes
    if matrix.shape != (len(features), len(barcodes)):
        raise ScgrnInputError(
            f"sample {sample}: matrix is {matrix.shape[0]} x {matrix.shape[1]} but there are {len(features)} "
            f"features and {len(barcodes)} barcodes", study=study.accession, file=where,
            fix="re-download the archive or exclude the sample")
    keep = np.ones(len(features), dtype=bool)
    if features.shape[1] >= 3:
        # 10x v3 features also list antibody/CRISPR captures: keep gene expression only.
        keep = (features[2] == "Gene Expression").to_numpy()
    counts = matrix.tocsr()[keep].T.tocsr()
    if counts.nnz and counts.data.max() > np.iinfo(np.int32).max:
        raise ScgrnInputError(f"sample {sample}: repeated entries add up to a count above {np.iinfo(np.int32).max}",
                              study=study.accession, file=where, fix="check that the file holds counts")
    symbols = features[1].tolist() if features.shape[1] >= 2 else None
    return SampleCounts(sample=sample, sample_name=name, source_file=where,
                        cell_names=barcodes[0].tolist(),
                        gene_ids=[g for g, k in zip(features[0].tolist(), keep) if k],
                        gene_symbols=[s for s, k in zip(symbols, keep) if k] if symbols else None,
                        counts=counts.astype(np.int32))


def _read_10x_names(stream: IO[bytes], *, study: str, file: str) -> pd.DataFrame:
    """A 10x features/genes/barcodes TSV (no header) as strings; at least one row."""
    try:
        table = pd.read_csv(stream, sep="\t", header=None, dtype=str, quoting=3, keep_default_na=False,
                            encoding="utf-8", encoding_errors="replace")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ScgrnInputError(f"cannot be read as a 10x names table ({str(exc).splitlines()[0]})", study=study,
                              file=file, fix="re-download the archive or exclude the sample") from None
    return table.fillna("")  # a short row's missing fields: empty names, refused later by name


def _read_mtx(stream: IO[bytes], *, study: str, file: str) -> sp.coo_matrix:
    """Matrix Market coordinate file (1-based), streamed in chunks; counts must be integers >= 0."""
    header = stream.readline(_MAX_MTX_LINE_BYTES).decode("ascii", errors="replace").lower()
    if not header.startswith("%%matrixmarket matrix coordinate"):
        raise ScgrnInputError(f"is not a MatrixMarket coordinate file (header {header.strip()[:60]!r})",
                              study=study, file=file, fix="re-download the archive or exclude the sample")
    line = stream.readline(_MAX_MTX_LINE_BYTES)
    while line.startswith(b"%"):
        line = stream.readline(_MAX_MTX_LINE_BYTES)
    try:
        n_rows, n_cols, n_entries = (int(v) for v in line.split())
    except ValueError:
        n_rows = n_cols = n_entries = -1
    if min(n_rows, n_cols, n_entries) < 0:
        raise ScgrnInputError(f"has a malformed size line {line[:60]!r}", study=study, file=file,
                              fix="re-download the archive or exclude the sample")
    rows, cols, vals = [], [], []
    try:
        reader = pd.read_csv(stream, sep=" ", header=None, names=["row", "col", "value"], comment="%",
                             dtype={"row": np.int64, "col": np.int64, "value": np.float64}, chunksize=2_000_000,
                             engine="c")
        for chunk in reader:
            rows.append(chunk["row"].to_numpy())
            cols.append(chunk["col"].to_numpy())
            vals.append(chunk["value"].to_numpy())
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ScgrnInputError(f"has a malformed entry line ({str(exc).splitlines()[0]})", study=study, file=file,
                              fix="re-download the archive or exclude the sample") from None
    row = np.concatenate(rows) if rows else np.empty(0, np.int64)
    col = np.concatenate(cols) if cols else np.empty(0, np.int64)
    value = np.concatenate(vals) if vals else np.empty(0, np.float64)
    if len(value) != n_entries:
        raise ScgrnInputError(f"declares {n_entries} entries but holds {len(value)}", study=study, file=file,
                              fix="the file is truncated: re-download it or exclude the sample")
    if np.isnan(value).any() or (value < 0).any():
        raise ScgrnInputError("has negative or missing counts", study=study, file=file,
                              fix="this is not a count matrix: exclude the sample")
    if (value > np.iinfo(np.int32).max).any():  # also inf: the int32 cast below would wrap it silently
        raise ScgrnInputError(f"has a count above {np.iinfo(np.int32).max}", study=study, file=file,
                              fix="check that the file holds counts, not a sentinel or an overflowed value")
    if (value != np.round(value)).any():
        raise ScgrnInputError("has non-integer counts", study=study, file=file,
                              fix="use raw UMI counts, not normalised values")
    if row.size and (row.min() < 1 or row.max() > n_rows or col.min() < 1 or col.max() > n_cols):
        raise ScgrnInputError(f"has an index outside its declared {n_rows} x {n_cols} shape", study=study, file=file,
                              fix="re-download the archive or exclude the sample")
    # coo -> csr later sums duplicate coordinates, as Matrix Market allows (in int64: no wrap-around).
    return sp.coo_matrix((value.astype(np.int64), (row - 1, col - 1)), shape=(n_rows, n_cols))


READERS: dict[str, Callable[..., Iterator[SampleCounts]]] = {
    "raw_tar_dense_tsv": read_raw_tar_dense_tsv,
    "processed_csv_well_plate": read_processed_csv_well_plate,
    "raw_tar_dropseq_dge": read_raw_tar_dropseq_dge,
    "raw_tar_10x_mtx": read_raw_tar_10x_mtx,
}


def read_metadata_table(path: Path, *, study: str, limits: ExtractionLimits = ExtractionLimits()) -> pd.DataFrame:
    """An SraRunTable (CSV, one row per run) or any CSV/TSV metadata table, as strings (at most
    ``limits.max_member_bytes`` decompressed)."""
    sep = "\t" if path.name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")) else ","
    try:
        with read_guard(study=study, file=path.name):
            raw = path.open("rb")
            with open_maybe_gzip(raw, name=path.name, max_bytes=limits.max_member_bytes, study=study) as stream:
                table = pd.read_csv(io.TextIOWrapper(stream, encoding="utf-8", errors="replace"), sep=sep, dtype=str,
                                    keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ScgrnInputError(f"cannot be read as a metadata table ({str(exc).splitlines()[0]})", study=study,
                              file=path.name, fix="re-download the metadata table (e.g. the SraRunTable)") from None
    if not isinstance(table.index, pd.RangeIndex):
        # pandas turns the extra leading fields of rows wider than the header into an index.
        raise ScgrnInputError("has rows with more fields than its header", study=study, file=path.name,
                              fix="re-download the metadata table (e.g. the SraRunTable)")
    table.columns = [str(c).strip() for c in table.columns]
    return table


def read_dense_count_block(array, rows: slice, *, study: str, file: str) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows of a dense integer count array (e.g. a merged zarr store), as (counts, measured gene mask).

    Whole columns of INT64_MIN (NaN cast to int64 by the pipeline that wrote them) mean
    "gene not measured in this study": they come back as unmeasured, never as counts. A
    sentinel anywhere else, or a negative count, is an error.
    """
    block = np.asarray(array[rows])
    sentinel = block == np.iinfo(np.int64).min
    unmeasured = sentinel.all(axis=0)
    partial = sentinel.any(axis=0) & ~unmeasured
    if partial.any():
        raise ScgrnInputError(f"{int(partial.sum())} gene columns hold INT64_MIN for some cells only",
                              study=study, file=file, fix="re-export the matrix with missing genes as whole columns")
    measured = ~unmeasured
    values = block[:, measured]
    if (values < 0).any():
        raise ScgrnInputError("holds negative counts", study=study, file=file, fix="this is not a count matrix")
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise ScgrnInputError("holds counts above 2^31", study=study, file=file, fix="this is not a count matrix")
    counts = sp.csr_matrix(values.astype(np.int32))
    return counts, measured


__all__ = ["SampleCounts", "READERS", "read_study_samples", "read_metadata_table", "read_dense_count_block",
           "normalise_plate_id"]
