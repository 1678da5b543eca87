"""One study as an AnnData: read its samples, harmonise genes, join metadata, derive condition."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

from scgrn_assets.lib.ingest.archive import ExtractionLimits
from scgrn_assets.lib.ingest.catalog import Study
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.genes import drop_spike_ins, harmonise_gene_ids, normalise_names, sum_duplicate_genes
from scgrn_assets.lib.ingest.metadata_tables import read_metadata_table
from scgrn_assets.lib.ingest.readers import (SampleCounts, SkippedSample, normalise_plate_id, normalise_well_id,
                                             read_study_samples)
from scgrn_assets.lib.memory import release_free_memory
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.ingest.read_ahead import read_ahead
from scgrn_assets.lib.storage import atomic_path

logger = logging.getLogger(__name__)
# How many items a listing in uns["ingest"] names before it says how many more there are.
_LISTED = 20

@dataclass
class StudyReadReport:
    """What reading a study left out, for the asset's metadata and the ``.h5ad``'s ``uns["ingest"]``."""

    skipped_samples: list[SkippedSample] = field(default_factory=list)
    n_cells_without_metadata: int = 0
    spike_ins_dropped: set[str] = field(default_factory=set)
    metadata_table: str = ""  # the catalog's metadata file; empty: the study has none
    # Archive members named after a sample that was read from another member (GEO supplements).
    unread_members: list[SkippedSample] = field(default_factory=list)
    # Samples the metadata table lists that no count file held (and that were not skipped).
    metadata_samples_without_counts: list[str] = field(default_factory=list)
    # Condition-column values the catalog's rule does not map: value -> (cells, the rule's near match or "").
    unmatched_condition_values: dict[str, tuple[int, str]] = field(default_factory=dict)
    # One Ensembl ID under different symbols in different samples: ID -> the symbols, first one first.
    ensembl_ids_with_two_symbols: dict[str, list[str]] = field(default_factory=dict)
    # One line per kind of problem above, as logged.
    warnings: list[str] = field(default_factory=list)

    def uns(self) -> dict:
        skipped = self.skipped_samples
        return {"skipped_samples": "; ".join(f"{s.sample} ({s.file}): {s.reason}" for s in skipped),
                "n_skipped_samples": len(skipped),
                "n_cells_without_metadata": self.n_cells_without_metadata,
                "n_spike_ins_dropped": len(self.spike_ins_dropped),
                "metadata_table": self.metadata_table or "none (the catalog names no metadata table: every cell's "
                                                        "metadata is NA)",
                "unread_members": _listing([m.file for m in self.unread_members]),
                "metadata_samples_without_counts": _listing(self.metadata_samples_without_counts),
                "unmatched_condition_values": _condition_listing(self.unmatched_condition_values),
                "ensembl_ids_with_two_symbols": "; ".join(f"{gene}: {', '.join(symbols)}" for gene, symbols in
                                                          self.ensembl_ids_with_two_symbols.items()),
                "warnings": "\n".join(self.warnings),
                "n_warnings": len(self.warnings)}

    def warn(self, study: str, message: str) -> None:
        """Log ``message`` once and keep it for ``uns["ingest"]["warnings"]``."""
        self.warnings.append(message)
        logger.warning("%s: %s", study, message)


def _listing(items: list[str]) -> str:
    """``a, b, c`` (the first :data:`_LISTED`, then how many more)."""
    more = f", … ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _condition_listing(values: dict[str, tuple[int, str]]) -> str:
    return "; ".join(f"{value!r}: {n} cells" + (f" (did you mean {near!r}?)" if near else "")
                     for value, (n, near) in values.items())


def _near_match(value: str, known: list[str]) -> str:
    """The rule value ``value`` probably means: equal but for case and spaces, else a close spelling; or ""."""
    folded = {" ".join(k.split()).casefold(): k for k in known}
    near = folded.get(" ".join(value.split()).casefold())
    if near is not None:
        return near
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.8)
    return close[0] if close else ""


class GeneUnion:
    """The study's genes in order of first appearance, growing sample by sample.

    New genes are appended at the end, so column indices of rows already written stay
    valid: samples can be streamed to disk before the union is complete.
    """

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}
        self.ensembl: list[str | None] = []
        self._last: tuple | None = None  # (symbols, ensembl, column map) of the last sample
        self._symbol_of_ensembl: dict[str, str] = {}
        #: Ensembl IDs seen under more than one symbol (in different samples): ID -> symbols, first first.
        self.ensembl_ids_with_two_symbols: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def remap(self, counts: sp.csr_matrix, symbols: list[str], ensembl: list[str | None]) -> sp.csr_matrix:
        """``counts`` (columns = ``symbols``, unique) with columns moved to their union position."""
        if self._last is not None and symbols is self._last[0] and ensembl is self._last[1]:
            column_map = self._last[2]  # the very lists of the last sample: its genes are all placed
        else:
            for symbol, ensembl_id in zip(symbols, ensembl):
                if ensembl_id:
                    first = self._symbol_of_ensembl.setdefault(ensembl_id, symbol)
                    if first != symbol:  # two genes of the union for one Ensembl ID: said, not merged
                        named = self.ensembl_ids_with_two_symbols.setdefault(ensembl_id, [first])
                        if symbol not in named:
                            named.append(symbol)
                if symbol not in self.positions:
                    self.positions[symbol] = len(self.positions)
                    self.ensembl.append(ensembl_id)
                elif ensembl_id and self.ensembl[self.positions[symbol]] is None:
                    self.ensembl[self.positions[symbol]] = ensembl_id
            column_map = np.fromiter((self.positions[s] for s in symbols), dtype=np.int32, count=len(symbols))
            self._last = (symbols, ensembl, column_map)
        # Samples usually list the genes of the samples before them in the same order: then the
        # map is the identity (or at least increasing) and the indices need no gather and no sort.
        identity = np.array_equal(column_map, np.arange(len(column_map), dtype=np.int32))
        remapped = sp.csr_matrix((counts.data.astype(np.int32, copy=False),
                                  counts.indices if identity else column_map[counts.indices], counts.indptr),
                                 shape=(counts.shape[0], len(self.positions)))
        if not (bool(np.all(np.diff(column_map) > 0)) and counts.has_sorted_indices):
            remapped.sort_indices()
        return remapped

    def var(self) -> pd.DataFrame:
        symbols = list(self.positions)
        # Categoricals store "unknown" as a missing code that every anndata version reads back.
        return pd.DataFrame({"gene_symbol": symbols, "ensembl_id": pd.Categorical(self.ensembl)},
                            index=pd.Index(symbols))


def iter_study_blocks(study: Study, raw_dir: Path, genes: GeneUnion, *,
                      condition_levels: tuple[str, str] = ("control", "AD"),
                      progress: Progress | None = None,
                      limits: ExtractionLimits = ExtractionLimits(),
                      report: StudyReadReport | None = None) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
    """Yield each sample as (counts remapped into ``genes``, its obs rows), one sample in memory at a time.

    ``limits`` bound the archive and every decompressed file (decompression bombs).
    ``report`` collects what was left out: samples skipped by ``skip_bad_samples``, cells
    kept without metadata (``cells_without_metadata: na``), ERCC spike-ins dropped; and what
    is warned about (logged once, listed in ``report.warnings``): archive members named after a
    sample that the layout does not read, metadata samples with no counts, condition values the
    rule does not map (with their cells and the rule's near match), one Ensembl ID under two symbols.
    """
    report = report if report is not None else StudyReadReport()
    metadata = None
    if study.metadata is not None:
        metadata = read_metadata_table(raw_dir / study.metadata.file, study=study.accession, limits=limits,
                                       encoding=study.encoding)
        report.metadata_table = study.metadata.file
    ensembl_to_symbol = _read_gene_map(study, raw_dir)
    last_genes: tuple | None = None  # (gene_ids, gene_symbols, symbols, ensembl) of the last plain sample
    file_of_cell: dict[str, str] = {}  # obs name (without the study) -> the file it was first read from
    n_cells = 0
    samples_read: dict[str, bool] = {}  # sample -> whether it joins its metadata by sample (not well/plate)
    unmatched: Counter[str] = Counter()  # condition values the rule does not map -> cells
    for sample in read_study_samples(study, raw_dir, progress, limits=limits, skipped=report.skipped_samples,
                                     unread=report.unread_members):
        sample = dataclasses.replace(sample, cell_names=normalise_names(
            sample.cell_names, kind="cell", study=study.accession, file=sample.cell_file or sample.source_file))
        _check_barcodes(study, sample)
        _refuse_cells_read_before(study, sample, file_of_cell)
        if last_genes is not None and sample.gene_ids == last_genes[0] and sample.gene_symbols == last_genes[1]:
            # Same genes as the last sample, which needed no spike-in removal and no duplicate sums:
            # its harmonised lists hold for this one too (and the union's column map is reused).
            counts, symbols, ensembl = sample.counts, last_genes[2], last_genes[3]
        else:
            symbols, ensembl = harmonise_gene_ids(sample.gene_ids, gene_id_type=study.gene_id_type,
                                                  symbols=sample.gene_symbols, strip_r=study.strip_r_prefix,
                                                  ensembl_to_symbol=ensembl_to_symbol, study=study.accession,
                                                  file=sample.gene_file or sample.source_file)
            n_harmonised = len(symbols)
            counts, symbols, ensembl, spike_ins = drop_spike_ins(sample.counts, symbols, ensembl)
            report.spike_ins_dropped.update(spike_ins)
            counts, symbols, ensembl = sum_duplicate_genes(counts, symbols, ensembl, study=study.accession,
                                                           file=sample.gene_file or sample.source_file)
            plain = not spike_ins and len(symbols) == n_harmonised
            last_genes = (sample.gene_ids, sample.gene_symbols, symbols, ensembl) if plain else None
        obs, n_without_metadata = _join_cell_metadata(study, sample, metadata, condition_levels)
        report.n_cells_without_metadata += n_without_metadata
        samples_read[sample.sample] = sample.cell_plates is None
        if study.condition is not None:
            missed = obs["condition"].isna() & obs["condition_source"].notna()
            if missed.any():
                unmatched.update(obs.loc[missed, "condition_source"].astype(str).value_counts().to_dict())
        n_cells += len(obs)
        obs["n_counts"] = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
        obs["n_genes"] = np.diff(counts.indptr).astype(np.int64)
        yield genes.remap(counts, symbols, ensembl), obs
    _warn_about_the_study(study, report, metadata, samples_read, unmatched, genes)
    if study.metadata is not None and n_cells and report.n_cells_without_metadata == n_cells:
        # With cells_without_metadata: na, a join that matches nothing (a wrong column, wells spelled
        # differently) would pass as a study whose every cell is NA, with a warning at most.
        raise ScgrnInputError(
            f"none of the study's {n_cells} cells joined a row of the metadata table (cells_without_metadata: na "
            "lets some cells miss, not all)", study=study.accession, file=study.metadata.file,
            fix="check metadata.sample_column (or well_column and plate_column) against the table's columns and "
                "the sample or cell names; if the study truly has no metadata, leave out metadata: (and condition:)")


def _warn_about_the_study(study: Study, report: StudyReadReport, metadata: pd.DataFrame | None,
                          samples_read: dict[str, bool], unmatched: Counter, genes: GeneUnion) -> None:
    """Fill ``report``'s listings and warnings once the study's samples are read (see :func:`iter_study_blocks`).

    None of these stops the study (each is listed in ``uns["ingest"]``): a metadata table may list
    samples of a SuperSeries that another study holds, a rule may leave a third arm NA on purpose.
    """
    if report.unread_members:
        report.warn(study.accession, f"{len(report.unread_members)} archive member(s) named after a sample were not "
                                     f"read (not a file of the study's format {study.format}; their samples were "
                                     f"read from other files): {_listing([m.file for m in report.unread_members])}")
    column = study.metadata.sample_column if study.metadata is not None else None
    if metadata is not None and samples_read and all(samples_read.values()) and column in metadata.columns:
        accounted = set(samples_read) | {s.sample for s in report.skipped_samples}
        listed = metadata[column].fillna("").astype(str).str.strip()
        report.metadata_samples_without_counts = [s for s in dict.fromkeys(listed) if s and s not in accounted]
        if report.metadata_samples_without_counts:
            report.warn(study.accession, f"{len(report.metadata_samples_without_counts)} sample(s) of the metadata "
                                         f"table {study.metadata.file} have no count file (no cells): "
                                         f"{_listing(report.metadata_samples_without_counts)}")
    if unmatched:
        known = list(study.condition.values)
        report.unmatched_condition_values = {value: (n, _near_match(value, known))
                                             for value, n in unmatched.most_common()}
        report.warn(study.accession, f"{sum(unmatched.values())} cells have a {study.condition.column!r} value that "
                                     f"the catalog's condition rule does not map (their condition is NA): "
                                     f"{_condition_listing(report.unmatched_condition_values)}; the rule maps "
                                     f"{known}")
    if genes.ensembl_ids_with_two_symbols:
        report.ensembl_ids_with_two_symbols = {gene: list(symbols)
                                               for gene, symbols in genes.ensembl_ids_with_two_symbols.items()}
        listing = "; ".join(f"{gene}: {', '.join(symbols)}"
                            for gene, symbols in list(report.ensembl_ids_with_two_symbols.items())[:_LISTED])
        report.warn(study.accession, f"{len(report.ensembl_ids_with_two_symbols)} Ensembl ID(s) appear under "
                                     f"different symbols in different samples, so each symbol is its own gene: "
                                     f"{listing}")


def _finish_obs(study: Study, frames: list[pd.DataFrame], condition_levels: tuple[str, str]) -> pd.DataFrame:
    # Column by column: a DataFrame concat of samples whose metadata is all NA warns (a FutureWarning on
    # every custom catalog's run) about a dtype rule the categoricals below make moot.
    obs = pd.DataFrame({column: pd.concat([frame[column] for frame in frames], ignore_index=True)
                        for column in frames[0].columns}) if frames else pd.concat(frames)
    obs["condition"] = pd.Categorical(obs["condition"], categories=list(condition_levels))
    obs["condition_source"] = pd.Categorical(obs["condition_source"])
    obs.index = pd.Index(study.accession + ":" + obs["sample"].astype(str) + ":" + obs["barcode"].astype(str))
    return obs


def _study_uns(study: Study, report: StudyReadReport) -> dict:
    return {"study": {"accession": study.accession, "title": study.title, "species": study.species,
                      "format": study.format, "gene_id_type": study.gene_id_type,
                      "condition_na_reason": study.condition_na_reason},
            "ingest": report.uns()}


def build_study_anndata(study: Study, raw_dir: Path, *, condition_levels: tuple[str, str] = ("control", "AD"),
                        progress: Progress | None = None,
                        limits: ExtractionLimits = ExtractionLimits()) -> ad.AnnData:
    """Read, harmonise and annotate one study in memory (for notebooks and tests).

    Returns an AnnData with integer counts in ``X`` (CSR, int32, cells x genes), ``obs``
    columns ``study``, ``sample``, ``sample_name``, ``barcode``, ``condition`` (categorical,
    NA where unknown), ``condition_source`` (the metadata value the rule read),
    ``n_counts`` (total counts of the cell over all its genes) and ``n_genes`` (detected),
    and ``var`` indexed by gene symbol with ``gene_symbol`` and ``ensembl_id``.
    :func:`write_study_h5ad` writes the same object to disk without holding the study.
    """
    genes = GeneUnion()
    blocks, frames = [], []
    report = StudyReadReport()
    for block, obs in iter_study_blocks(study, raw_dir, genes, condition_levels=condition_levels, progress=progress,
                                        limits=limits, report=report):
        blocks.append(block)
        frames.append(obs)
    width = len(genes)
    counts = sp.vstack([sp.csr_matrix((b.data, b.indices, b.indptr), shape=(b.shape[0], width)) for b in blocks],
                       format="csr").astype(np.int32)
    adata = ad.AnnData(X=counts, obs=_finish_obs(study, frames, condition_levels), var=genes.var())
    adata.uns.update(_study_uns(study, report))
    return adata


def _queue_into(messages: deque) -> Progress:
    """A progress callback that only queues its calls (it runs in the read-ahead thread)."""
    def queued(done: int, total: int, /, **detail: object) -> None:
        messages.append((done, total, detail))
    return queued


def _deliver(messages: deque, progress: Progress | None) -> None:
    """Hand the queued progress calls to ``progress``, in the caller's thread."""
    while messages:
        done, total, detail = messages.popleft()
        report(progress, done, total, **detail)


def write_study_h5ad(study: Study, raw_dir: Path, output: Path, *,
                     condition_levels: tuple[str, str] = ("control", "AD"),
                     progress: Progress | None = None,
                     limits: ExtractionLimits = ExtractionLimits()) -> ad.AnnData:
    """Stream one study into an ``.h5ad`` at ``output`` (atomically); memory holds one sample.

    X is appended sample by sample as CSR (anndata's on-disk ``csr_matrix`` encoding);
    returns the written object's obs/var (and ``uns``, with what was left out under
    ``uns["ingest"]``) as an AnnData without X, for metadata.
    """
    genes = GeneUnion()
    frames: list[pd.DataFrame] = []
    report = StudyReadReport()
    # The next sample is read and parsed in a thread while this one is written; progress
    # messages are handed back so the caller's callback runs in the caller's thread.
    messages: deque[tuple[int, int, dict]] = deque()
    with atomic_path(output) as tmp, h5py.File(tmp, "w") as handle:
        group = handle.create_group("X")
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        n_values = 0
        blocks = iter_study_blocks(study, raw_dir, genes, condition_levels=condition_levels,
                                   progress=_queue_into(messages) if progress else None, limits=limits,
                                   report=report)
        for block, obs in read_ahead(blocks, name=f"read-{study.accession}"):
            _deliver(messages, progress)
            data.resize((n_values + block.nnz,))
            indices.resize((n_values + block.nnz,))
            data[n_values:] = block.data
            indices[n_values:] = block.indices
            indptr.append(block.indptr[1:].astype(np.int64) + n_values)
            n_values += block.nnz
            frames.append(obs)
        _deliver(messages, progress)
        obs = _finish_obs(study, frames, condition_levels)
        var = genes.var()
        group.create_dataset("indptr", data=np.concatenate(indptr))
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                            "shape": (len(obs), len(var))})
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", var)
        uns = _study_uns(study, report)
        write_elem(handle, "uns", uns)
        for name in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(handle, name, {})
        handle.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    release_free_memory()  # the study's sample arrays, so that the next stage does not stack on them
    return ad.AnnData(obs=obs, var=var, uns=uns)


def _check_barcodes(study: Study, sample: SampleCounts) -> None:
    names = pd.Index(sample.cell_names)
    if names.has_duplicates:
        duplicated = names[names.duplicated()].unique()[:3].tolist()
        raise ScgrnInputError(f"sample {sample.sample} has duplicate cell barcodes {duplicated}", study=study.accession,
                              file=sample.cell_file or sample.source_file,
                              fix="re-download the file or exclude the sample")


def cell_identities(sample: SampleCounts) -> list[str]:
    """The study-level names of the sample's cells (``<sample>:<barcode>``, or ``<sample>:<well>.<plate>``)."""
    if sample.cell_plates is not None:
        return [f"{sample.sample}:{well}.{plate}" for well, plate in zip(sample.cell_names, sample.cell_plates)]
    return [f"{sample.sample}:{barcode}" for barcode in sample.cell_names]


def _refuse_cells_read_before(study: Study, sample: SampleCounts, file_of_cell: dict[str, str]) -> None:
    """Raise when cells of ``sample`` were already read from another (or the same) file of the study.

    A member appended again to a RAW tar (``tar -rf``) or two files of one GSM sharing barcodes
    would otherwise double cells silently, and every later count check would still pass.
    """
    names = cell_identities(sample)
    seen = [name for name in names if name in file_of_cell]
    if seen:
        raise ScgrnInputError(
            f"{len(seen)} cells of sample {sample.sample} in {sample.source_file} were already read from "
            f"{file_of_cell[seen[0]]} (e.g. {seen[:3]}): the archive holds these cells twice",
            study=study.accession,
            fix="remove the repeated member from the archive (re-download it from GEO), or keep one of the two files")
    file_of_cell.update(dict.fromkeys(names, sample.source_file))


def _read_gene_map(study: Study, raw_dir: Path) -> dict[str, str] | None:
    files = study.files_with_role("gene_map")
    if not files:
        return None
    table = read_metadata_table(raw_dir / files[0].name, study=study.accession, encoding=study.encoding)
    if table.shape[1] < 2:
        raise ScgrnInputError("gene map needs two columns (ensembl_id, gene_symbol)", study=study.accession,
                              file=files[0].name, fix="fix the gene_map file")
    return dict(zip(table.iloc[:, 0].str.split(".").str[0], table.iloc[:, 1]))


def _join_cell_metadata(study: Study, sample: SampleCounts, metadata: pd.DataFrame | None,
                        condition_levels: tuple[str, str]) -> tuple[pd.DataFrame, int]:
    """The sample's obs rows and how many of its cells have no metadata row (only with ``cells_without_metadata: na``)."""
    n_cells = len(sample.cell_names)
    if metadata is None:  # a study without a metadata table: NA metadata, said in uns["ingest"]
        return _obs_rows(study, sample, pd.Categorical([None] * n_cells, categories=list(condition_levels)),
                         pd.Categorical([None] * n_cells)), 0
    where = study.metadata.file
    keep_unmatched = study.metadata.cells_without_metadata == "na"
    if sample.cell_plates is not None:
        rows = _rows_by_well_and_plate(study, sample, metadata)
    else:
        column = study.metadata.sample_column
        if column not in metadata.columns:
            raise ScgrnInputError(f"has no column {column!r} to join samples on (read as "
                                  f"{metadata.attrs.get('read_as', 'utf-8')}; columns: {list(metadata.columns)[:12]})",
                                  study=study.accession, file=where,
                                  fix="set metadata.sample_column in the catalog, or save the table as UTF-8 with "
                                      "one of , TAB ; between its fields")
        matches = metadata.index[metadata[column].str.strip() == sample.sample]
        if len(matches) == 0 and not keep_unmatched:
            raise ScgrnInputError(f"has no row for sample {sample.sample} (file {sample.source_file}) in column "
                                  f"{column!r}", study=study.accession, file=where,
                                  fix="re-download the metadata table, or set metadata.cells_without_metadata: na "
                                      "to keep the sample with NA metadata")
        rows = np.full(n_cells, matches[0] if len(matches) else -1)
    matched = rows >= 0
    condition_source = pd.Series(pd.Categorical([None] * n_cells))
    condition = pd.Series(pd.Categorical([None] * n_cells, categories=list(condition_levels)))
    if study.condition is not None:
        column = study.condition.column
        if column not in metadata.columns:
            raise ScgrnInputError(f"has no column {column!r} for the condition rule (columns: "
                                  f"{list(metadata.columns)[:12]})", study=study.accession, file=where,
                                  fix="fix condition.column in the catalog")
        if sample.cell_plates is None:
            # Several runs of one sample must agree on the condition, or the label is meaningless.
            values = metadata.loc[metadata[study.metadata.sample_column].str.strip() == sample.sample, column]
            if values.str.strip().nunique() > 1:
                raise ScgrnInputError(f"sample {sample.sample} has conflicting {column!r} values "
                                      f"{sorted(values.unique())}", study=study.accession, file=where,
                                      fix="fix the metadata table or the catalog's condition rule")
        raw_values = np.full(n_cells, None, dtype=object)
        raw_values[matched] = metadata.loc[rows[matched], column].str.strip().to_numpy()
        condition_source = pd.Series(pd.Categorical(raw_values))
        mapped = [study.condition.values.get(v) for v in raw_values]
        condition = pd.Series(pd.Categorical(mapped, categories=list(condition_levels)))
    animal = np.full(n_cells, sample.sample, dtype=object)
    if study.metadata.animal_column:
        column = study.metadata.animal_column
        if column not in metadata.columns:
            raise ScgrnInputError(f"has no column {column!r} naming the animal (columns: {list(metadata.columns)[:12]})",
                                  study=study.accession, file=where, fix="fix metadata.animal_column in the catalog")
        named = metadata.loc[rows[matched], column].astype(str).str.strip().to_numpy()
        # A cell without a metadata row keeps its sample as the animal (never a shared "nan" animal).
        animal[matched] = np.where(np.isin(named, ("", "nan", "None")), sample.sample, named)
    return _obs_rows(study, sample, condition.array, condition_source.array, animal), int((~matched).sum())


def _obs_rows(study: Study, sample: SampleCounts, condition, condition_source, animal=None) -> pd.DataFrame:
    """The sample's obs rows; ``animal`` defaults to the sample (one GSM, one animal)."""
    return pd.DataFrame({
        "study": study.accession,
        "sample": sample.sample,
        "sample_name": sample.sample_name,
        "animal": sample.sample if animal is None else animal,
        "barcode": sample.cell_names,
        "condition": condition,
        "condition_source": condition_source,
    })


def _rows_by_well_and_plate(study: Study, sample: SampleCounts, metadata: pd.DataFrame) -> np.ndarray:
    join = study.metadata
    for column in (join.well_column, join.plate_column):
        if column not in metadata.columns:
            raise ScgrnInputError(f"has no column {column!r} to join cells on", study=study.accession, file=join.file,
                                  fix="set metadata.well_column / plate_column in the catalog")
    keys = metadata[join.well_column].map(normalise_well_id) + "." + metadata[join.plate_column].map(normalise_plate_id)
    _refuse_conflicting_well_plate_rows(study, metadata, keys)
    lookup = pd.Series(metadata.index, index=keys)
    lookup = lookup[~lookup.index.duplicated()]
    cell_keys = [f"{w}.{p}" for w, p in zip(sample.cell_names, sample.cell_plates)]
    rows = lookup.reindex(cell_keys)
    missing = rows.isna()
    if missing.any() and join.cells_without_metadata == "na":
        return rows.fillna(-1).to_numpy(dtype=np.int64)
    if missing.any():
        examples = [k for k, m in zip(cell_keys, missing) if m][:3]
        raise ScgrnInputError(f"{int(missing.sum())} of {len(cell_keys)} cells of {sample.sample} have no "
                              f"{join.well_column}+{join.plate_column} row (e.g. {examples})", study=study.accession,
                              file=join.file, fix="check that the metadata table belongs to this study's counts, or "
                                                  "set metadata.cells_without_metadata: na to keep them with NA metadata")
    return rows.to_numpy(dtype=np.int64)


def _refuse_conflicting_well_plate_rows(study: Study, metadata: pd.DataFrame, keys: pd.Series) -> None:
    """Two metadata rows for one well and plate that disagree on the condition column are an error.

    Rows that agree (one cell sequenced in two runs) are fine; disagreeing ones would otherwise
    label the cell by whichever row came first.
    """
    if study.condition is None or study.condition.column not in metadata.columns:
        return
    values = metadata[study.condition.column].str.strip()
    located = pd.Series(True, index=metadata.index)
    for column in (study.metadata.well_column, study.metadata.plate_column):  # bulk rows have neither
        text = metadata[column].fillna("").astype(str).str.strip()
        located &= text.ne("") & text.str.lower().ne("nan")
    repeated = keys.duplicated(keep=False) & located
    conflicts = values[repeated].groupby(keys[repeated]).nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        examples = {key: sorted(values[keys == key].unique()) for key in conflicts.index[:3]}
        raise ScgrnInputError(
            f"{len(conflicts)} {study.metadata.well_column}+{study.metadata.plate_column} pairs have rows with "
            f"different {study.condition.column!r} values (e.g. {examples})", study=study.accession,
            file=study.metadata.file, fix="fix the metadata table: one row per well and plate, or rows that agree")
