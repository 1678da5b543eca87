"""One reader per study layout. Each yields the samples of a study as cells x genes counts.

The readers only parse: gene identifiers come back exactly as written in the file
(harmonisation is :mod:`scgrn_assets.lib.ingest.genes`), and metadata joins happen in
:mod:`scgrn_assets.lib.ingest.study_anndata`. Archives are streamed member by member, never
extracted whole and never held in memory whole.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest import formats
from scgrn_assets.lib.ingest.archive import ExtractionLimits, iter_tar_members, open_maybe_gzip, read_guard
from scgrn_assets.lib.ingest.catalog import Study
from scgrn_assets.lib.ingest.dense_text import read_dense_text_matrix
from scgrn_assets.lib.ingest.metadata_tables import read_metadata_table, read_series_matrix
from scgrn_assets.lib.ingest.mtx_text import read_mtx_coo
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.text_files import decode_text


_GSM_MEMBER = re.compile(r"^(?P<sample>GSM\d+)_(?P<name>.+?)(?P<suffix>\.dge\.txt\.gz|\.txt\.gz)$")
_TENX_MEMBER = re.compile(
    r"^(?P<sample>GSM\d+)_(?P<name>.+?)_?(?P<kind>matrix\.mtx|features\.tsv|genes\.tsv|barcodes\.tsv)\.gz$")
_GSM = re.compile(r"^GSM\d+$")
# Any member named after a sample: one the layout cannot read is listed, never dropped without a word.
_GSM_PREFIXED = re.compile(r"^(?P<sample>GSM\d+)_")

logger = logging.getLogger(__name__)


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
    # 10x: the members holding the gene and the cell names, when not source_file (the matrix), so that an
    # error about a gene names the features file and one about a barcode the barcodes file.
    gene_file: str | None = None
    cell_file: str | None = None


@dataclass(frozen=True)
class SkippedSample:
    """A sample file left out because it failed to parse (catalog ``skip_bad_samples: true``)."""

    sample: str
    file: str
    reason: str


def read_study_samples(study: Study, raw_dir: Path, progress: Progress | None = None, *,
                       limits: ExtractionLimits = ExtractionLimits(),
                       skipped: list[SkippedSample] | None = None,
                       unread: list[SkippedSample] | None = None) -> Iterator[SampleCounts]:
    """Dispatch to the reader of ``study.format``; files are in ``raw_dir`` by catalog name.

    ``limits`` bound archive members and every decompressed file (``max_member_bytes``).
    With ``study.skip_bad_samples``, a sample file that fails to parse is appended to
    ``skipped`` (and logged) instead of stopping the study; otherwise its error propagates.
    ``progress(done, total, file=name)`` is called as each sample file is begun: ``done`` samples
    of the count file were read before it, of ``total`` (0 where an archive is read in one pass
    and the number is not known in advance).

    Archive members named after a sample (``GSM…_``) that the layout cannot read: when the sample
    has no member the layout reads, it would vanish, so the member is handled like a sample file that
    fails to parse (an error naming ``exclude_samples`` and ``skip_bad_samples``; listed in ``skipped``
    under either); when the sample was read from another member, it is appended to ``unread`` and
    logged (a GEO supplement such as ``GSM…_notes.csv``).
    """
    reader = READERS[study.format]
    skipped = skipped if skipped is not None else []
    unread = unread if unread is not None else []
    for count_file in study.files_with_role("counts"):
        path = raw_dir / count_file.name
        if not path.exists():
            raise ScgrnInputError(f"count file {path} is missing", study=study.accession, file=count_file.name,
                                  fix="materialise geo_raw_archive for this study first")
        for sample in reader(study, path, progress, limits=limits, skipped=skipped, unread=unread):
            if _excluded(study, skipped, sample.sample, sample.source_file):
                continue  # one-file layouts (plates, bulk columns) are read whole; the sample is dropped here
            yield sample
    never_seen = sorted(set(study.exclude_samples) - {s.sample for s in skipped})
    if never_seen:
        raise ScgrnInputError(f"exclude_samples lists {never_seen}, which the study's count files do not hold",
                              study=study.accession, fix="check the sample accessions under exclude_samples")


def _excluded(study: Study, skipped: list[SkippedSample], sample: str, member: str) -> bool:
    """Whether the catalog excludes ``sample``; if so it is listed in ``skipped``, with the reason."""
    if sample not in study.exclude_samples:
        return False
    skipped.append(SkippedSample(sample=sample, file=member, reason="excluded by the catalog (exclude_samples)"))
    return True


def _skip_or_raise(study: Study, skipped: list[SkippedSample], sample: str, member: str,
                   error: ScgrnInputError) -> None:
    """Record a sample that failed to parse when the catalog allows it; re-raise otherwise."""
    if not study.skip_bad_samples:
        # "Exclude the sample" alone leaves the user looking for how: name the catalog switch.
        raise ScgrnInputError(error.problem, study=error.study, file=error.file, fix=(
            f"{error.fix or 're-download the file'}; to go on without it, add exclude_samples: [{sample}] to "
            f"{study.accession}'s catalog entry, or skip_bad_samples: true to skip every sample that fails to parse "
            "(either way the samples left out are listed in the asset metadata)")) from None
    skipped.append(SkippedSample(sample=sample, file=member, reason=error.problem))
    logger.warning("%s: skipping sample %s (%s): %s", study.accession, sample, member, error.problem)


def _no_sample_left(study: Study, path: Path, skipped: list[SkippedSample]) -> ScgrnInputError:
    listed = "; ".join(f"{s.file}: {s.reason}" for s in skipped[:3])
    return ScgrnInputError(f"every sample file failed to parse ({listed})", study=study.accession, file=path.name,
                           fix="re-download the archive; check the catalog's format for this study")


def _member_name(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _settle_unread_members(study: Study, path: Path, unreadable: dict[str, str], read_samples: set[str],
                           skipped: list[SkippedSample], unread: list[SkippedSample], *, expected: str) -> None:
    """Members named after a sample that the layout cannot read (``unreadable``: member -> sample).

    A sample read from another member keeps it listed in ``unread`` (and logged); a sample with no
    member the layout reads is a sample that failed to parse (:func:`_skip_or_raise`), or excluded.
    """
    settled: set[str] = set()  # samples without a readable member, already raised or listed
    for member, sample in unreadable.items():
        if sample in settled:
            continue
        if sample in read_samples:
            unread.append(SkippedSample(sample=sample, file=member, reason=f"not a {expected} file"))
            logger.warning("%s: %s: not a %s file, not read (sample %s is read from another file)",
                           study.accession, member, expected, sample)
            continue
        settled.add(sample)  # one entry per sample, by its first unreadable member
        if _excluded(study, skipped, sample, member):
            continue
        problem = (f"sample {sample}'s only file is not a {expected} file, which the study's format "
                   f"{study.format} reads: the sample would be left out")
        _skip_or_raise(study, skipped, sample, member, ScgrnInputError(
            problem, study=study.accession, file=f"{path.name}:{member}",
            fix=f"check the catalog's format ({study.format}) against the archive's contents"))


def read_raw_tar_dense_tsv(study: Study, path: Path, progress: Progress | None = None, *,
                           limits: ExtractionLimits = ExtractionLimits(),
                           skipped: list[SkippedSample] | None = None,
                           unread: list[SkippedSample] | None = None) -> Iterator[SampleCounts]:
    """GSE98969-style RAW tar: per-sample ``GSM…_<name>.txt.gz``, genes x cells, tab-separated.

    MARS-seq tables are R ``write.table`` output: the header lists the cells (wells) only,
    one field shorter than the data lines, which start with the gene.
    """
    yield from _read_dense_members(study, path, suffix=".txt.gz", progress=progress, limits=limits,
                                   skipped=skipped if skipped is not None else [],
                                   unread=unread if unread is not None else [])


def read_raw_tar_dropseq_dge(study: Study, path: Path, progress: Progress | None = None, *,
                             limits: ExtractionLimits = ExtractionLimits(),
                             skipped: list[SkippedSample] | None = None,
                             unread: list[SkippedSample] | None = None) -> Iterator[SampleCounts]:
    """GSE121654-style RAW tar: per-sample Drop-seq ``GSM…_<name>.dge.txt.gz`` (header ``GENE``)."""
    yield from _read_dense_members(study, path, suffix=".dge.txt.gz", progress=progress, limits=limits,
                                   skipped=skipped if skipped is not None else [],
                                   unread=unread if unread is not None else [])


def _read_dense_members(study: Study, path: Path, *, suffix: str, progress: Progress | None,
                        limits: ExtractionLimits, skipped: list[SkippedSample],
                        unread: list[SkippedSample]) -> Iterator[SampleCounts]:
    found = 0
    n_skipped_before = len(skipped)
    unreadable: dict[str, str] = {}  # members named after a sample that this layout cannot read
    read_samples: set[str] = set()
    for member, stream in iter_tar_members(path, study=study.accession, limits=limits):
        name = _member_name(member)
        match = _GSM_MEMBER.match(name)
        if not match or match.group("suffix") != suffix:
            named = _GSM_PREFIXED.match(name)
            if named:  # listed at the end, once we know whether its sample was read from another member
                unreadable.setdefault(name, named.group("sample"))
            continue  # GEO RAW tars also hold unrelated supplementary files (filelist.txt)
        read_samples.add(match.group("sample"))
        if _excluded(study, skipped, match.group("sample"), name):
            continue  # never parsed: an excluded sample may be one that cannot be
        report(progress, found, 0, file=name)
        try:
            with read_guard(study=study.accession, file=f"{path.name}:{name}"):
                text = open_maybe_gzip(stream, name=name, max_bytes=limits.max_member_bytes, study=study.accession)
                matrix = read_dense_text_matrix(text, sep="\t", study=study.accession, file=f"{path.name}:{name}",
                                                encoding=study.encoding)
        except ScgrnInputError as error:
            _skip_or_raise(study, skipped, match.group("sample"), name, error)
            continue
        found += 1
        yield SampleCounts(sample=match.group("sample"), sample_name=match.group("name"), source_file=name,
                           cell_names=matrix.cell_names, gene_ids=matrix.gene_names, counts=matrix.counts)
    if not read_samples:
        raise ScgrnInputError(f"holds no GSM…{suffix} sample files{_holding(unreadable)}", study=study.accession,
                              file=path.name,
                              fix=f"check the catalog's format ({study.format}) against the archive's contents")
    _settle_unread_members(study, path, unreadable, read_samples, skipped, unread, expected=f"GSM…{suffix}")
    if not found and len(skipped) > n_skipped_before:
        raise _no_sample_left(study, path, skipped[n_skipped_before:])


def _holding(unreadable: dict[str, str]) -> str:
    """`` (it holds GSM1_a.csv, ...)``: what the archive has instead, for the error that found nothing."""
    if not unreadable:
        return ""
    names = list(unreadable)
    return f" (it holds {', '.join(names[:3])}{', …' if len(names) > 3 else ''})"


def read_processed_csv_well_plate(study: Study, path: Path, progress: Progress | None = None, *,
                                  limits: ExtractionLimits = ExtractionLimits(),
                                  skipped: list[SkippedSample] | None = None,
                                  unread: list[SkippedSample] | None = None) -> Iterator[SampleCounts]:
    """GSE123025-style processed CSV: genes x cells, cells named ``<well>.<plate>``.

    One "sample" per plate, so per-sample checks (duplicate barcodes) stay meaningful.
    """
    report(progress, 0, 1, file=path.name)
    with path.open("rb") as raw, read_guard(study=study.accession, file=path.name):
        text = open_maybe_gzip(raw, name=path.name, max_bytes=limits.max_member_bytes, study=study.accession)
        # Values stored plate by plate: each plate's counts below are built from its own values only.
        matrix = read_dense_text_matrix(text, sep=",", study=study.accession, file=path.name,
                                        cell_groups=lambda cells: [split_well_plate(c)[1] for c in cells],
                                        encoding=study.encoding)
    if not matrix.cell_names:
        raise ScgrnInputError("has no cell columns", study=study.accession, file=path.name,
                              fix="re-download the file; check the catalog's format for this study")
    wells, plates = [], []
    for cell in matrix.cell_names:
        well, plate = split_well_plate(cell)
        if not well or not plate:
            raise ScgrnInputError(f"cell column {cell!r} is not named <well>.<plate>", study=study.accession,
                                  file=path.name, fix="check the catalog's format for this study")
        wells.append(well)
        plates.append(plate)
    plates_array = np.asarray(plates)
    for plate in sorted(set(plates), key=_natural_key):
        rows = np.flatnonzero(plates_array == plate)
        yield SampleCounts(sample=f"plate{plate}", sample_name=f"plate{plate}", source_file=path.name,
                           cell_names=[wells[i] for i in rows], gene_ids=matrix.gene_names,
                           counts=matrix.cell_rows(rows), cell_plates=[plate] * len(rows))


def normalise_plate_id(value: object) -> str:
    """``12``, ``"12"``, ``12.0``, ``"12.0"`` and ``"012"`` are one plate: pandas reads plate ids as floats.

    Digits are read as Python integers, never through a float, so ids above 2**53 stay distinct.
    """
    text = str(value).strip()
    integral = re.fullmatch(r"([-+]?\d+)(?:\.0*)?", text)
    if integral:
        return str(int(integral.group(1)))
    try:
        number = float(text)
    except ValueError:
        return text
    # Exponent forms (1.0012e9) only where a float holds the integer exactly.
    return str(int(number)) if number.is_integer() and abs(number) < 2 ** 53 else text


def normalise_well_id(value: object) -> str:
    """``a1``, ``A1`` and ``A01`` are one well (row letters, column number); other names are upper-cased."""
    text = str(value).strip().upper()
    well = re.fullmatch(r"([A-Z]+)0*(\d+)", text)
    return f"{well.group(1)}{int(well.group(2))}" if well else text


def split_well_plate(cell: str) -> tuple[str, str]:
    """``<well>.<plate>`` -> (normalised well, normalised plate); ``("", "")`` when it is not so named.

    A well never holds a dot, so the plate is everything after the first one: ``A1.7.0`` is well
    A1 of plate 7 (a plate id written as a float), not well ``A1.7`` of plate 0.
    """
    well, dot, plate = cell.partition(".")
    if not dot or not well.strip() or not plate.strip():
        return "", ""
    return normalise_well_id(well), normalise_plate_id(plate)


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_raw_tar_10x_mtx(study: Study, path: Path, progress: Progress | None = None, *,
                         limits: ExtractionLimits = ExtractionLimits(),
                         skipped: list[SkippedSample] | None = None,
                         unread: list[SkippedSample] | None = None) -> Iterator[SampleCounts]:
    """RAW tar of per-sample 10x triplets ``GSM…_<name>_{matrix.mtx,features.tsv,barcodes.tsv}.gz``.

    Members of one sample may come in any order; each sample is yielded once all three
    have been read (features and barcodes are small; only the matrix is large).
    """
    skipped = skipped if skipped is not None else []
    unread = unread if unread is not None else []
    pending: dict[tuple[str, str], dict[str, object]] = {}
    bad: set[tuple[str, str]] = set()
    found = 0
    unreadable: dict[str, str] = {}  # members named after a sample that this layout cannot read
    read_samples: set[str] = set()
    for member, stream in iter_tar_members(path, study=study.accession, limits=limits):
        name = _member_name(member)
        match = _TENX_MEMBER.match(name)
        if not match:
            named = _GSM_PREFIXED.match(name)
            if named:
                unreadable.setdefault(name, named.group("sample"))
            continue
        key = (match.group("sample"), match.group("name").rstrip("_"))
        read_samples.add(key[0])
        if key in bad:
            continue  # a sibling member already failed: the sample is out
        if key[0] in study.exclude_samples:
            if match.group("kind").startswith("matrix"):
                _excluded(study, skipped, key[0], name)  # listed once, by its matrix
            continue
        kind = match.group("kind").split(".")[0].replace("genes", "features")
        where = f"{path.name}:{name}"
        try:
            with read_guard(study=study.accession, file=where):
                text = open_maybe_gzip(stream, name=name, max_bytes=limits.max_member_bytes, study=study.accession)
                if kind == "matrix":
                    report(progress, found, 0, file=name)
                    parts = pending.setdefault(key, {})
                    parts["matrix"] = _read_mtx(text, study=study.accession, file=where)
                else:
                    pending.setdefault(key, {})[kind] = _read_10x_names(text, study=study.accession, file=where,
                                                                        encoding=study.encoding)
                pending[key][f"{kind}_member"] = where
                parts = pending[key]
            assembled = _assemble_10x(study, key, pending.pop(key), where) \
                if {"matrix", "features", "barcodes"} <= set(parts) else None
        except ScgrnInputError as error:
            _skip_or_raise(study, skipped, key[0], name, error)
            pending.pop(key, None)
            bad.add(key)
            continue
        if assembled is not None:
            found += 1
            yield assembled
    if pending:
        (sample, name), parts = next(iter(pending.items()))
        missing = sorted({"matrix", "features", "barcodes"} - set(parts))
        raise ScgrnInputError(f"sample {sample}_{name} lacks its {', '.join(missing)} file(s)", study=study.accession,
                              file=path.name, fix="re-download the archive or exclude the sample")
    if not read_samples:
        raise ScgrnInputError(f"holds no 10x matrix/features/barcodes triplets{_holding(unreadable)}",
                              study=study.accession, file=path.name,
                              fix=f"check the catalog's format ({study.format}) against the archive's contents")
    _settle_unread_members(study, path, unreadable, read_samples, skipped, unread,
                           expected="10x GSM…_{matrix.mtx,features.tsv,genes.tsv,barcodes.tsv}.gz")
    if not found and (bad or skipped):
        raise _no_sample_left(study, path, skipped)


def read_ncbi_rnaseq_counts(study: Study, path: Path, progress: Progress | None = None, *,
                            limits: ExtractionLimits = ExtractionLimits(),
                            skipped: list[SkippedSample] | None = None,
                            unread: list[SkippedSample] | None = None) -> Iterator[SampleCounts]:
    """GEO's NCBI-generated raw counts of a bulk RNA-seq series: ``GeneID<TAB>GSM…<TAB>GSM…``.

    Each column is one bulk library; it becomes one sample holding one profile (named by its
    GSM), so the per-sample metadata join and the corpus treat it like any other profile.
    """
    report(progress, 0, 1, file=path.name)
    with path.open("rb") as raw, read_guard(study=study.accession, file=path.name):
        text = open_maybe_gzip(raw, name=path.name, max_bytes=limits.max_member_bytes, study=study.accession)
        matrix = read_dense_text_matrix(text, sep="\t", study=study.accession, file=path.name,
                                        header_has_gene_column=True, encoding=study.encoding)
    if not matrix.cell_names:
        raise ScgrnInputError("has no sample columns", study=study.accession, file=path.name,
                              fix="re-download the file; check the catalog's format for this study")
    not_gsm = [c for c in matrix.cell_names if not _GSM.match(c)]
    if not_gsm:
        raise ScgrnInputError(f"has columns that are not GSM accessions (e.g. {not_gsm[:3]})", study=study.accession,
                              file=path.name, fix=f"check the catalog's format ({study.format}) for this file")
    for column, gsm in enumerate(matrix.cell_names):
        yield SampleCounts(sample=gsm, sample_name=gsm, source_file=path.name, cell_names=[gsm],
                           gene_ids=matrix.gene_names, counts=matrix.counts[column:column + 1])


def _assemble_10x(study: Study, key: tuple[str, str], parts: dict, where: str) -> SampleCounts:
    sample, name = key
    features: pd.DataFrame = parts["features"]
    barcodes: pd.DataFrame = parts["barcodes"]
    matrix: sp.coo_matrix = parts["matrix"]  # features x barcodes
    matrix_file, features_file, barcodes_file = (parts.get(f"{kind}_member", where)
                                                 for kind in ("matrix", "features", "barcodes"))
    if matrix.shape != (len(features), len(barcodes)):
        raise ScgrnInputError(
            f"sample {sample}: matrix is {matrix.shape[0]} x {matrix.shape[1]} but there are {len(features)} "
            f"features in {features_file} and {len(barcodes)} barcodes in {barcodes_file}", study=study.accession,
            file=matrix_file, fix="re-download the archive or exclude the sample")
    keep = np.ones(len(features), dtype=bool)
    if features.shape[1] >= 3:
        # 10x v3 features also list antibody/CRISPR captures: keep gene expression only.
        keep = (features[2] == "Gene Expression").to_numpy()
    # Cells x features in one conversion (coo -> csr sums duplicate coordinates, in int64).
    counts = matrix.T.tocsr()
    if not keep.all():
        counts = counts[:, np.flatnonzero(keep)].tocsr()
    if counts.nnz and counts.data.max() > np.iinfo(np.int32).max:
        raise ScgrnInputError(f"sample {sample}: repeated entries add up to a count above {np.iinfo(np.int32).max}",
                              study=study.accession, file=matrix_file, fix="check that the file holds counts")
    symbols = features[1].tolist() if features.shape[1] >= 2 else None
    return SampleCounts(sample=sample, sample_name=name, source_file=matrix_file, gene_file=features_file,
                        cell_file=barcodes_file,
                        cell_names=barcodes[0].tolist(),
                        gene_ids=[g for g, k in zip(features[0].tolist(), keep) if k],
                        gene_symbols=[s for s, k in zip(symbols, keep) if k] if symbols else None,
                        counts=counts.astype(np.int32))


def _read_10x_names(stream: IO[bytes], *, study: str, file: str, encoding: str = "utf-8") -> pd.DataFrame:
    """A 10x features/genes/barcodes TSV (no header) as strings; at least one row.

    Decoded strictly in ``encoding``: a byte not valid in it is an error naming the line (these
    files are small next to the matrix: read whole, within the member size limit like every member).
    """
    text = decode_text(stream.read(), encoding=encoding, study=study, file=file)
    try:
        table = pd.read_csv(io.StringIO(text), sep="\t", header=None, dtype=str, quoting=3, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ScgrnInputError(f"cannot be read as a 10x names table ({str(exc).splitlines()[0]})", study=study,
                              file=file, fix="re-download the archive or exclude the sample") from None
    return table.fillna("")  # a short row's missing fields: empty names, refused later by name


def _read_mtx(stream: IO[bytes], *, study: str, file: str) -> sp.coo_matrix:
    """Matrix Market coordinate file (1-based), streamed in blocks; counts must be integers >= 0.

    Plain integer entry lines go through a compiled kernel; see :func:`read_mtx_coo`.
    """
    return read_mtx_coo(stream, study=study, file=file)


READERS: dict[str, Callable[..., Iterator[SampleCounts]]] = {
    formats.RAW_TAR_DENSE_TSV: read_raw_tar_dense_tsv,
    formats.PROCESSED_CSV_WELL_PLATE: read_processed_csv_well_plate,
    formats.RAW_TAR_DROPSEQ_DGE: read_raw_tar_dropseq_dge,
    formats.RAW_TAR_10X_MTX: read_raw_tar_10x_mtx,
    formats.NCBI_RNASEQ_COUNTS: read_ncbi_rnaseq_counts,
}
assert set(READERS) == set(formats.STUDY_FORMATS), "every study format needs exactly one reader"


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


__all__ = ["SampleCounts", "SkippedSample", "READERS", "read_study_samples", "read_metadata_table",
           "read_series_matrix", "read_dense_count_block", "normalise_plate_id"]
