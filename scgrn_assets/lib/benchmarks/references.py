"""Which reference networks apply, read through the configuration; ground truths and TF lists for a run.

:class:`ReferenceSource` names a file format, its local path or official URL and a species, and
:func:`load_reference` reads one with the reader of :mod:`~scgrn_assets.lib.benchmarks.reference_files`
(every reader returns its normalised form), downloading it first through
:func:`scgrn_assets.lib.ingest.download.fetch_file` when a URL is configured. :func:`load_ground_truth`
reads the truth file of ``scgrn benchmark`` (format detected), :func:`load_tf_list` a list of regulators.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from scgrn_assets.lib.benchmarks.reference_files import (_TRRUST_MODE_SIGN, _require_file, load_edge_list,
                                                        load_regulon_table, load_string_v12, load_trrust)
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.text_files import open_text


@dataclasses.dataclass(frozen=True)
class ReferenceSource:
    """Where one reference comes from and how to read it (one entry of the reference configuration).

    Attributes
    ----------
    name
        Reference name, e.g. ``"TRRUST"``, ``"STRING"``.
    format
        ``"trrust"``, ``"regulon"`` (DoRothEA / CollecTRI), ``"edge_list"`` or ``"string_v12"``.
    species
        Species the reference applies to, e.g. ``"human"``, ``"mouse"``; :func:`references_for_species` filters on it.
    files
        Role -> local path. ``"edges"`` for single-file formats; ``"info"``, ``"links"`` and optionally
        ``"aliases"`` for STRING.
    urls
        Role -> official URL. When a role has a URL the file is downloaded into the cache folder first.
    sha256
        Role -> expected checksum of the download (optional).
    options
        Extra keyword arguments of the loader (``min_combined_score``, ``directed``, ``sign_column``, ...).
    """

    name: str
    format: str
    species: str
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    urls: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sha256: Mapping[str, str] = dataclasses.field(default_factory=dict)
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)


_ROLES_BY_FORMAT = {
    "trrust": ("edges",),
    "regulon": ("edges",),
    "edge_list": ("edges",),
    "string_v12": ("info", "links", "aliases"),
}
_OPTIONAL_ROLES = {"aliases"}


def references_for_species(sources: Iterable[ReferenceSource], species: str) -> list[ReferenceSource]:
    """The configured references that apply to ``species`` (case-insensitive)."""
    return [source for source in sources if source.species.lower() == species.lower()]


def load_reference(
    source: ReferenceSource,
    *,
    download_dir: str | Path | None = None,
    gene_symbols: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Load one configured reference, downloading its files from their official URLs when configured.

    Parameters
    ----------
    source
        The configuration entry.
    download_dir
        Folder for downloaded files; required when ``source.urls`` is not empty.
    gene_symbols
        The data's genes; used by STRING to map proteins to the data's symbols.

    Returns
    -------
    pandas.DataFrame
        The normalised reference (see the module docstring).
    """
    if source.format not in _ROLES_BY_FORMAT:
        raise ScgrnInputError(
            f"unknown reference format {source.format!r}", study=source.name,
            fix=f"use one of {sorted(_ROLES_BY_FORMAT)}",
        )
    paths = {}
    for role in _ROLES_BY_FORMAT[source.format]:
        if role in source.urls:
            if download_dir is None:
                raise ScgrnInputError(
                    f"file {role!r} has a URL but no download folder was given", study=source.name,
                    fix="pass download_dir (e.g. a folder under SCGRN_HOME)",
                )
            from scgrn_assets.lib.ingest.download import fetch_file  # only needed for URL sources

            url = source.urls[role]
            destination = Path(download_dir) / source.name / url.rstrip("/").rsplit("/", 1)[-1]
            destination.parent.mkdir(parents=True, exist_ok=True)
            fetch_file(url, destination, sha256=source.sha256.get(role), study=source.name)
            paths[role] = destination
        elif role in source.files:
            paths[role] = Path(source.files[role])
        elif role not in _OPTIONAL_ROLES:
            raise ScgrnInputError(
                f"no path or URL configured for its {role!r} file", study=source.name,
                fix=f"add files[{role!r}] or urls[{role!r}] to the reference configuration",
            )
    options = dict(source.options)
    if source.format == "trrust":
        return load_trrust(paths["edges"], name=source.name, study=source.name, **options)
    if source.format == "regulon":
        return load_regulon_table(paths["edges"], name=source.name, study=source.name, **options)
    if source.format == "edge_list":
        return load_edge_list(paths["edges"], name=source.name, study=source.name, **options)
    return load_string_v12(
        paths["info"], paths["links"], paths.get("aliases"),
        gene_symbols=gene_symbols, name=source.name, study=source.name, **options,
    )


TRUTH_FORMATS = ("auto", "trrust", "edge_list")
_SOURCE_HEADERS = ("gene1", "regulator", "tf", "source", "from")
_TARGET_HEADERS = ("gene2", "target", "to")
_SIGN_HEADERS = ("type", "sign", "mode", "mor")


def load_ground_truth(path: str | Path, *, format: str = "auto", name: str | None = None,
                      directed: bool = True) -> pd.DataFrame:
    """Read a ground-truth network file with the reader its layout needs.

    ``auto`` decides from the first line: four tab-separated fields whose third is a TRRUST mode
    -> :func:`~scgrn_assets.lib.benchmarks.reference_files.load_trrust`; a header naming the regulator
    (``Gene1``, ``regulator``, ``tf``, ``source``, ``from``) and the target (``Gene2``, ``target``, ``to``)
    -> :func:`~scgrn_assets.lib.benchmarks.reference_files.load_edge_list` on those columns, signs from
    ``Type`` / ``sign`` / ``mode`` / ``mor`` when present (BEELINE's ``GroundTruthNetwork.csv``,
    ``krumsiek11_edges_derived.csv``, DoRothEA-style tables); otherwise
    a plain two-column regulator, target list (SERGIO's ``gt_GRN.csv``).

    Returns
    -------
    pandas.DataFrame
        The normalised reference, named ``name`` (default: the file name without suffixes).
    """
    path = _require_file(path, study=name)
    name = name or path.name.split(".")[0]
    if format not in TRUTH_FORMATS:
        raise ScgrnInputError(f"unknown truth format {format!r}", file=str(path),
                              fix=f"use one of {', '.join(TRUTH_FORMATS)}")
    with open_text(path) as handle:
        first_line = next((line.rstrip("\r\n") for line in handle if line.strip()), "")
    tab_fields = first_line.split("\t")
    if format == "trrust" or (format == "auto" and len(tab_fields) == 4 and tab_fields[2] in _TRRUST_MODE_SIGN):
        return load_trrust(path, name=name)
    separator = "," if "," in first_line else ("\t" if "\t" in first_line else None)
    header = [field.strip().strip('"') for field in (first_line.split(separator) if separator else first_line.split())]
    lowered = [field.lower() for field in header]
    source = next((header[lowered.index(key)] for key in _SOURCE_HEADERS if key in lowered), None)
    target = next((header[lowered.index(key)] for key in _TARGET_HEADERS if key in lowered), None)
    if source is not None and target is not None:
        sign = next((header[lowered.index(key)] for key in _SIGN_HEADERS if key in lowered), None)
        return load_edge_list(path, name=name, directed=directed, source_column=source, target_column=target,
                              sign_column=sign, header=True)
    return load_edge_list(path, name=name, directed=directed)


def load_tf_list(path: str | Path, *, study: str | None = None) -> list[str]:
    """Read a TF list: BEELINE's ``human-tfs.csv`` (``TF,Sources``) or one symbol per line.

    Returns
    -------
    list of str
        TF symbols in file order, deduplicated.
    """
    path = _require_file(path, study=study)
    with open_text(path) as handle:
        lines = [line.strip() for line in handle if line.strip()]
    symbols = [line.split(",")[0].split("\t")[0].strip() for line in lines]
    if symbols and symbols[0].upper() in {"TF", "GENE", "SYMBOL"}:
        symbols = symbols[1:]
    return list(dict.fromkeys(symbols))
