"""Metadata tables of a study: an SraRunTable, a GEO series matrix, or any CSV/TSV, as strings."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.archive import ExtractionLimits, open_maybe_gzip, read_guard
from scgrn_assets.lib.text_files import decode_text_file, iter_decoded_lines


_SERIES_MATRIX = re.compile(r"_series_matrix\.txt(\.gz)?$")
# Separators a table may use whatever its name says: Excel in many locales saves "CSV" with ";".
_SEPARATORS = (",", "\t", ";")


def read_metadata_table(path: Path, *, study: str, limits: ExtractionLimits = ExtractionLimits(),
                        encoding: str = "utf-8") -> pd.DataFrame:
    """An SraRunTable (CSV, one row per run), a GEO series matrix (``…_series_matrix.txt.gz``,
    one row per GSM: :func:`read_series_matrix`) or any CSV/TSV metadata table, as strings (at
    most ``limits.max_member_bytes`` decompressed).

    Text is decoded strictly in ``encoding`` (an undecodable byte is an error naming the line); a
    UTF-16 or UTF-8 byte-order mark decides over it. The separator is the name's (tab for ``.tsv``
    and ``.txt``, else comma) unless the header holds none of it but another of ``, TAB ;``: then
    that one. ``table.attrs["read_as"]`` says which encoding and separator were used, for errors.
    """
    if _SERIES_MATRIX.search(path.name):
        return read_series_matrix(path, study=study, limits=limits, encoding=encoding)
    sep = "\t" if path.name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")) else ","
    try:
        with read_guard(study=study, file=path.name):
            raw = path.open("rb")
            with open_maybe_gzip(raw, name=path.name, max_bytes=limits.max_member_bytes, study=study) as stream:
                data = stream.read()
        text, encoding = decode_text_file(data, encoding=encoding, study=study, file=path.name)
        sep = _sniff_separator(text, sep)
        table = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ScgrnInputError(f"cannot be read as a metadata table ({str(exc).splitlines()[0]})", study=study,
                              file=path.name, fix="re-download the metadata table (e.g. the SraRunTable)") from None
    if not isinstance(table.index, pd.RangeIndex):
        # pandas turns the extra leading fields of rows wider than the header into an index.
        raise ScgrnInputError("has rows with more fields than its header", study=study, file=path.name,
                              fix="re-download the metadata table (e.g. the SraRunTable)")
    table.columns = [str(c).strip() for c in table.columns]
    table.attrs["read_as"] = f"{encoding}, separated by {sep!r}"
    return table


def _sniff_separator(text: str, default: str) -> str:
    """``default`` unless the header line holds none of it but another separator (the most frequent)."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    if default in header:
        return default
    counts = {sep: header.count(sep) for sep in _SEPARATORS if sep != default}
    best = max(counts, key=counts.get)
    return best if counts[best] else default


def read_series_matrix(path: Path, *, study: str, limits: ExtractionLimits = ExtractionLimits(),
                       encoding: str = "utf-8") -> pd.DataFrame:
    """The sample header of a GEO series matrix as one row per GSM, all strings.

    Columns: each ``!Sample_<field>`` line by its field name (``geo_accession``, ``title``,
    ``source_name_ch1``, ...; repeated lines joined with ``"; "``), plus one column per key
    of the ``!Sample_characteristics_ch1`` lines' ``key: value`` cells. GEO aligns those
    lines by position, not by key, so each sample's keys are read from its own cells; a
    sample without a key gets ``""``. The expression table after
    ``!series_matrix_table_begin`` is never read. Lines are decoded strictly in ``encoding``
    (a UTF-16 or UTF-8 byte-order mark decides over it): an undecodable byte is an error naming the line.
    """
    fields: dict[str, list[str]] = {}
    characteristics: list[list[str]] = []
    try:
        with read_guard(study=study, file=path.name), path.open("rb") as raw, \
                open_maybe_gzip(raw, name=path.name, max_bytes=limits.max_member_bytes, study=study) as stream:
            text = iter_decoded_lines(stream, encoding=encoding, study=study, file=path.name)
            for cells in csv.reader(text, delimiter="\t", quotechar='"'):
                if not cells:
                    continue
                key = cells[0].strip()
                if key.lower() == "!series_matrix_table_begin":
                    break
                if not key.startswith("!Sample_"):
                    continue
                values = [c.strip() for c in cells[1:]]
                if key == "!Sample_characteristics_ch1":
                    characteristics.append(values)
                else:
                    name = key[len("!Sample_"):]
                    if name in fields:
                        fields[name] = [f"{a}; {b}" if a and b else a or b
                                        for a, b in zip(fields[name], values + [""] * len(fields[name]))]
                    else:
                        fields[name] = values
    except csv.Error as error:
        raise ScgrnInputError(f"cannot be read as a GEO series matrix ({error})", study=study, file=path.name,
                              fix="re-download the series matrix") from None
    gsms = fields.get("geo_accession")
    if not gsms:
        raise ScgrnInputError("has no !Sample_geo_accession line: not a GEO series matrix", study=study,
                              file=path.name, fix="re-download the series matrix (…_series_matrix.txt.gz)")
    n_samples = len(gsms)
    for name, values in list(fields.items()) + [(f"characteristics_ch1 line {i + 1}", v)
                                                for i, v in enumerate(characteristics)]:
        if len(values) > n_samples:
            raise ScgrnInputError(f"!Sample_{name} has {len(values)} values for {n_samples} samples", study=study,
                                  file=path.name, fix="re-download the series matrix")
    table = {name: values + [""] * (n_samples - len(values)) for name, values in fields.items()}
    per_sample: list[dict[str, str]] = [{} for _ in range(n_samples)]
    for values in characteristics:
        for index, cell in enumerate(values):
            if not cell:
                continue
            key, colon, value = cell.partition(":")
            key, value = (key.strip(), value.strip()) if colon else ("characteristics_ch1", cell)
            if key in table:  # a characteristic named like a sample field: keep both
                key = f"{key} (characteristics)"
            previous = per_sample[index].get(key)
            per_sample[index][key] = f"{previous}; {value}" if previous else value
    keys = list(dict.fromkeys(k for sample in per_sample for k in sample))
    for key in keys:
        table[key] = [sample.get(key, "") for sample in per_sample]
    return pd.DataFrame(table, dtype=str)
