"""Study catalogs: which public studies make up a corpus, where their files are, how to read them.

A catalog is a YAML file (see ``scgrn_assets/catalogs/demo.yaml``). It is validated on
load so that a typo surfaces as one clear message naming the catalog, the study and the
field, not as a KeyError deep inside a materialisation.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit

import yaml

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest import formats
from scgrn_assets.lib.ingest.catalog_schema import (ConditionRuleDoc, FileDoc, NoConditionDoc, ReferenceDoc, StudyDoc,
                                                    validate_catalog_document)
from scgrn_assets.lib.ingest.formats import STUDY_FORMATS
from scgrn_assets.lib.ingest.strict_yaml import load_strict_yaml

#: Study layouts with a reader in :mod:`scgrn_assets.lib.ingest.readers` (defined in :mod:`.formats`).
KNOWN_FORMATS = STUDY_FORMATS
ALLOWED_URL_SCHEMES = ("file", "https", "http")


@dataclass(frozen=True)
class StudyFile:
    """One file of a study: where it lives, its checksum and what it holds.

    ``sha256`` is None when the catalog leaves it to trust on first use: the first download
    pins it in the catalog's lock file (:mod:`scgrn_assets.lib.ingest.checksum_lock`).
    """

    name: str
    url: str
    sha256: str | None
    role: str  # counts | metadata | gene_map


@dataclass(frozen=True)
class ConditionRule:
    """Derives ``condition`` from one metadata column; values not listed map to NA."""

    column: str
    values: dict[str, str]


@dataclass(frozen=True)
class MetadataJoin:
    """How cells meet their metadata table (an SraRunTable CSV or a GEO series matrix)."""

    file: str
    # Per-sample layouts: the column holding the GSM accession that prefixes each sample file
    # (``geo_accession`` in a series matrix).
    sample_column: str = "Sample Name"
    # Processed well/plate layouts: the columns forming the cell name <well>.<plate>.
    well_column: str = "well_id"
    plate_column: str = "plate_id"
    # "error": a cell or sample without a metadata row stops the study; "na": it keeps NA metadata.
    cells_without_metadata: str = "error"
    # The column naming the animal (mouse, donor) of each cell, where one GSM is not one animal
    # (plate layouts with one GSM per cell). Empty: the GSM sample is the animal.
    animal_column: str = ""


@dataclass(frozen=True)
class Study:
    """One catalog entry."""

    accession: str
    title: str
    species: str
    format: str
    gene_id_type: str
    files: tuple[StudyFile, ...]
    metadata: MetadataJoin | None  # None: the study has no metadata table, every cell's metadata is NA
    condition: ConditionRule | None
    strip_r_prefix: bool = False
    # Why a study without a condition rule is all NA (no Alzheimer's/control contrast, bulk, ...).
    condition_na_reason: str = ""
    # Skip (and list) sample files that fail to parse instead of stopping the study.
    skip_bad_samples: bool = False
    # Samples (GSM accessions; ``plate<N>`` in well/plate layouts) left out without being read.
    exclude_samples: tuple[str, ...] = ()
    # Encoding of the study's text files (names in count files, metadata tables): a byte not valid in
    # it is an error naming the line. A UTF-16 or UTF-8 byte-order mark on a table decides over it.
    encoding: str = "utf-8"

    def files_with_role(self, role: str) -> list[StudyFile]:
        return [f for f in self.files if f.role == role]

    @property
    def metadata_file(self) -> StudyFile | None:
        if self.metadata is None:
            return None
        return next(f for f in self.files if f.name == self.metadata.file)


@dataclass(frozen=True)
class ReferenceEntry:
    """A reference network: its files by role (``edges``; STRING: ``info``, ``links``, ``aliases``)."""

    name: str
    format: str
    species: str
    files: dict[str, StudyFile]
    options: dict[str, Any]


@dataclass(frozen=True)
class Catalog:
    """A validated list of studies. ``condition_levels[0]`` is the reference level."""

    name: str
    path: Path
    studies: tuple[Study, ...]
    condition_levels: tuple[str, str] = ("control", "AD")
    description: str = ""
    # Gene symbol, Ensembl ID and length table (TSV) shared by the studies; optional.
    gene_annotation: StudyFile | None = None
    # Overrides of the corpus QC thresholds (scgrn_assets.lib.corpus.thresholds.QC_FIELDS).
    qc: dict[str, int] | None = None
    # Reference networks the benchmarks score against (STRING, TRRUST, ...).
    references: tuple["ReferenceEntry", ...] = ()

    @property
    def accessions(self) -> list[str]:
        return [s.accession for s in self.studies]

    @property
    def lock_path(self) -> Path:
        """Where trust-on-first-use sha256 pins live: ``<catalog>.lock.yaml`` beside the catalog."""
        return self.path.with_name(f"{self.path.stem}.lock.yaml")

    def study(self, accession: str) -> Study:
        for study in self.studies:
            if study.accession == accession:
                return study
        raise ScgrnInputError(
            f"study {accession!r} is not in catalog {self.name!r} ({self.path})",
            fix=f"pick one of {', '.join(self.accessions)}",
        )


def builtin_catalog_path(name: str) -> Path:
    return Path(__file__).resolve().parents[2] / "catalogs" / f"{name}.yaml"


def resolve_catalog_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in catalog name (``demo``) or a path to a user's YAML file."""
    text = str(name_or_path)
    if not text.endswith((".yaml", ".yml")) and os.sep not in text:
        path = builtin_catalog_path(text)
        if not path.exists():
            builtins = sorted(p.stem for p in builtin_catalog_path("x").parent.glob("*.yaml"))
            raise ScgrnInputError(
                f"no built-in catalog named {text!r}", fix=f"use one of {builtins} or a path to a .yaml file"
            )
        return path
    return Path(text).expanduser().resolve()


def load_catalog(name_or_path: str | os.PathLike, *, variables: dict[str, str] | None = None) -> Catalog:
    """Load and validate a catalog.

    ``${NAME}`` in URLs expands from ``variables`` (e.g. ``SCGRN_HOME``, so the demo catalog can
    address files under the user's storage root) and from the environment only for the names the
    user lists in ``SCGRN_CATALOG_ENV``; ``file://`` URLs must lie under SCGRN_HOME or a folder in
    ``SCGRN_FILE_ROOTS`` (see :func:`expand_variables`, :func:`refuse_file_url_outside_roots`).
    """
    path = resolve_catalog_path(name_or_path)
    if not path.exists():
        raise ScgrnInputError(f"catalog file {path} does not exist", fix="check the path or SCGRN_CATALOG")
    try:
        raw = load_strict_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ScgrnInputError(f"catalog {path} is not valid YAML: {exc}", fix="fix the YAML syntax") from exc
    return parse_catalog(raw, path=path, variables=variables or {})


def parse_catalog(raw: Any, *, path: Path, variables: dict[str, str]) -> Catalog:
    """Validate ``raw`` (a parsed catalog file) against :mod:`.catalog_schema`, then what spans entries."""
    where = str(path)
    document = validate_catalog_document(raw, where=where)
    levels = tuple(document.condition_levels)
    studies = tuple(_study(entry, where, levels, variables) for entry in document.studies)
    seen: set[str] = set()
    for study in studies:
        if study.accession in seen:
            raise ScgrnInputError(f"catalog {where} lists study {study.accession} twice", study=study.accession,
                                  fix="keep one entry per accession")
        seen.add(study.accession)
    annotation = None
    if document.gene_annotation is not None:
        annotation = _file(document.gene_annotation, f"catalog {where} gene_annotation", "catalog", variables)
    references = tuple(_reference(entry, index, where, variables)
                       for index, entry in enumerate(document.references or []))
    return Catalog(name=str(document.name or path.stem), path=path, studies=studies,
                   condition_levels=levels, description=str(document.description),
                   gene_annotation=annotation, qc=dict(document.qc) if document.qc is not None else None,
                   references=references)


def _reference(entry: ReferenceDoc, index: int, where: str, variables: dict[str, str]) -> ReferenceEntry:
    here = f"catalog {where} references[{index}]"
    files = {role: _file(spec, here, entry.name, variables) for role, spec in entry.files.items()}
    return ReferenceEntry(name=entry.name, format=entry.format, species=entry.species, files=files,
                          options=dict(entry.options or {}))


def _study(entry: StudyDoc, where: str, levels: tuple[str, str], variables: dict[str, str]) -> Study:
    accession = entry.accession
    here = f"catalog {where}"
    files = tuple(_file(f, here, accession, variables) for f in entry.files)
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ScgrnInputError(f"{here}: duplicate file names {names}", study=accession, fix="give each file a unique name")
    if not any(f.role == "counts" for f in files):
        raise ScgrnInputError(f"{here}: no file with role 'counts'", study=accession,
                              fix="mark the count archive with 'role: counts'")

    metadata = None
    if entry.metadata is not None:
        if entry.metadata.file not in names:
            raise ScgrnInputError(f"{here}: metadata file {entry.metadata.file!r} is not among the study's files "
                                  f"{names}", study=accession, fix="list it under 'files' with role: metadata")
        metadata = MetadataJoin(**entry.metadata.model_dump())
    elif isinstance(entry.condition, ConditionRuleDoc):
        raise ScgrnInputError(f"{here}: a condition rule needs the metadata table it reads", study=accession,
                              fix="add metadata: {file: <the study's metadata file>}, or drop the condition "
                                  "(condition: {na: <why>})")
    if entry.format == formats.NCBI_RNASEQ_COUNTS and entry.gene_id_type == "entrez" \
            and not any(f.role == "gene_map" for f in files):
        raise ScgrnInputError(f"{here}: NCBI GeneID counts need the GeneID -> symbol table", study=accession,
                              fix="add NCBI's annotation table (e.g. Mouse.GRCm39.annot.tsv.gz) with role: gene_map")

    condition = None
    condition_na_reason = ""
    if isinstance(entry.condition, NoConditionDoc):
        # An explicit "no contrast here": the study joins the corpus with condition NA.
        condition_na_reason = entry.condition.na
    elif isinstance(entry.condition, ConditionRuleDoc):
        values = {str(k): str(v) for k, v in entry.condition.values.items()}
        bad = sorted(set(values.values()) - set(levels))
        if bad:
            raise ScgrnInputError(f"{here}: condition labels {bad} are not among condition_levels {list(levels)}",
                                  study=accession, fix="map metadata values onto the catalog's condition_levels")
        condition = ConditionRule(column=entry.condition.column, values=values)

    strip_r_prefix = entry.strip_r_prefix if entry.strip_r_prefix is not None \
        else entry.format == formats.RAW_TAR_DROPSEQ_DGE
    return Study(accession=accession, title=entry.title if entry.title is not None else accession,
                 species=entry.species, format=entry.format, gene_id_type=entry.gene_id_type, files=files,
                 metadata=metadata, condition=condition, strip_r_prefix=strip_r_prefix,
                 condition_na_reason=condition_na_reason, skip_bad_samples=entry.skip_bad_samples,
                 exclude_samples=tuple(entry.exclude_samples or ()), encoding=entry.encoding)


def _file(entry: FileDoc, here: str, accession: str, variables: dict[str, str]) -> StudyFile:
    """A validated file entry with its URL expanded and checked: scheme, and the folders file:// may read."""
    name = entry.name
    url = expand_variables(entry.url, variables)
    try:
        scheme = urlsplit(url).scheme
    except ValueError as error:  # e.g. an unbalanced IPv6 bracket
        raise ScgrnInputError(f"{here}: file {name} has a malformed URL {url!r} ({error})", study=accession,
                              fix="fix the URL in the catalog entry") from None
    if scheme not in ALLOWED_URL_SCHEMES:
        raise ScgrnInputError(f"{here}: file {name} has URL {url!r} with scheme {scheme!r}", study=accession,
                              fix=f"use one of {list(ALLOWED_URL_SCHEMES)}://")
    if scheme == "file":
        refuse_file_url_outside_roots(url, variables, here=here, name=name, accession=accession)
    return StudyFile(name=name, url=url, sha256=entry.sha256, role=entry.role)


#: Environment variable naming (comma-separated) the other variables a catalog's URLs may use.
CATALOG_ENV_VARIABLE = "SCGRN_CATALOG_ENV"
#: Environment variable naming (os.pathsep-separated) folders that ``file://`` URLs may read, besides SCGRN_HOME.
FILE_ROOTS_VARIABLE = "SCGRN_FILE_ROOTS"


def expand_variables(text: str, variables: dict[str, str]) -> str:
    """Expand ``${NAME}`` from ``variables`` (e.g. ``SCGRN_HOME``), or from the environment when the user
    allows NAME in ``SCGRN_CATALOG_ENV``; any other name is an error.

    A catalog is often someone else's file: expanding any variable would let it send a secret
    (``?k=${AWS_SECRET_ACCESS_KEY}``) to its server and into the run logs.
    """
    if "${" not in text:
        return text  # the common case, and 10,000-study catalogs have 20,000 URLs
    allowed = {name.strip() for name in os.environ.get(CATALOG_ENV_VARIABLE, "").split(",") if name.strip()}

    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key in variables:
            return variables[key]
        if key not in allowed:
            raise ScgrnInputError(
                f"a catalog URL uses ${{{key}}}; catalogs may use only {sorted(variables) or 'no variables'} and "
                f"the variables named in {CATALOG_ENV_VARIABLE}",
                fix=f"if the catalog is yours and {key} holds no secret: export {CATALOG_ENV_VARIABLE}={key}")
        if key in os.environ:
            return os.environ[key]
        raise ScgrnInputError(f"a catalog URL uses ${{{key}}}, which is not set", fix=f"export {key}=...")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", replace, text)


def allowed_file_roots(variables: dict[str, str]) -> list[Path]:
    """Folders ``file://`` URLs may read: SCGRN_HOME (when given) and those named in ``SCGRN_FILE_ROOTS``."""
    roots = [variables["SCGRN_HOME"]] if variables.get("SCGRN_HOME") else []
    roots += [part for part in os.environ.get(FILE_ROOTS_VARIABLE, "").split(os.pathsep) if part.strip()]
    return [Path(root).expanduser().resolve() for root in roots]


def refuse_file_url_outside_roots(url: str, variables: dict[str, str], *, here: str, name: str,
                                  accession: str) -> None:
    """A ``file://`` URL must point inside an allowed root (symlinks and ``..`` resolved).

    Otherwise a catalog could copy ``/etc/passwd`` or ``~/.ssh/id_rsa`` into SCGRN_HOME, where the
    UI and the run logs show it.
    """
    from urllib.request import url2pathname

    if urlparse(url).scheme != "file":
        return
    source = Path(url2pathname(urlparse(url).path)).resolve()
    roots = allowed_file_roots(variables)
    if not any(source.is_relative_to(root) for root in roots):
        raise ScgrnInputError(
            f"{here}: file {name} reads {source} through a file:// URL, outside the folders catalogs may read "
            f"({', '.join(map(str, roots)) or 'none'})", study=accession,
            fix=f"if you mean it, name the folder: export {FILE_ROOTS_VARIABLE}={source.parent}")
