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
from urllib.parse import urlparse

import yaml

from scgrn_assets.lib.corpus.thresholds import QC_FIELDS
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest import formats
from scgrn_assets.lib.ingest.formats import STUDY_FORMATS
from scgrn_assets.lib.ingest.strict_yaml import load_strict_yaml

#: Study layouts with a reader in :mod:`scgrn_assets.lib.ingest.readers` (defined in :mod:`.formats`).
KNOWN_FORMATS = STUDY_FORMATS
KNOWN_GENE_ID_TYPES = ("symbol", "ensembl", "entrez")
KNOWN_SPECIES = ("mouse", "human")
ALLOWED_URL_SCHEMES = ("file", "https", "http")
FILE_ROLES = ("counts", "metadata", "gene_map", "gene_annotation")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ACCESSION = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


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

    def files_with_role(self, role: str) -> list[StudyFile]:
        return [f for f in self.files if f.role == role]

    @property
    def metadata_file(self) -> StudyFile | None:
        if self.metadata is None:
            return None
        return next(f for f in self.files if f.name == self.metadata.file)


REFERENCE_FORMATS = {"trrust": ("edges",), "regulon": ("edges",), "edge_list": ("edges",),
                     "string_v12": ("info", "links", "aliases")}


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
    where = str(path)
    if not isinstance(raw, dict):
        raise ScgrnInputError(f"catalog {where} must be a mapping with a 'studies' list")
    allowed = {"name", "description", "condition_levels", "gene_annotation", "qc", "references", "studies"}
    unknown = set(raw) - allowed
    if unknown:
        raise ScgrnInputError(f"catalog {where} has unknown top-level keys {sorted(unknown)}",
                              fix=f"allowed: {', '.join(sorted(allowed))}")
    levels = raw.get("condition_levels", ("control", "AD"))
    levels = tuple(levels) if isinstance(levels, (list, tuple)) else ()
    if len(levels) != 2 or not all(isinstance(v, str) for v in levels) or len(set(levels)) != 2:
        raise ScgrnInputError(f"catalog {where}: condition_levels must be two distinct labels, reference first",
                              fix="e.g. condition_levels: [control, AD]")
    studies_raw = raw.get("studies")
    if not isinstance(studies_raw, list) or not studies_raw:
        raise ScgrnInputError(f"catalog {where} has no 'studies' list", fix="add at least one study entry")
    studies = tuple(_parse_study(entry, index, where, levels, variables) for index, entry in enumerate(studies_raw))
    seen: set[str] = set()
    for study in studies:
        if study.accession in seen:
            raise ScgrnInputError(f"catalog {where} lists study {study.accession} twice", study=study.accession,
                                  fix="keep one entry per accession")
        seen.add(study.accession)
    annotation = None
    if raw.get("gene_annotation") is not None:
        annotation = _parse_file({"role": "gene_annotation", **raw["gene_annotation"]}
                                 if isinstance(raw["gene_annotation"], dict) else raw["gene_annotation"],
                                 f"catalog {where} gene_annotation", "catalog", variables)
    qc = raw.get("qc")
    qc_fields = set(QC_FIELDS)
    if qc is not None and (not isinstance(qc, dict) or set(qc) - qc_fields
                           or not all(type(v) is int and v >= 0 for v in qc.values())):  # bool is an int
        raise ScgrnInputError(f"catalog {where}: qc must map {sorted(qc_fields)} to non-negative integers, got {qc!r}",
                              fix="e.g. qc: {min_genes_per_cell: 200}")
    references = tuple(_parse_reference(entry, index, where, variables)
                       for index, entry in enumerate(raw.get("references") or []))
    return Catalog(name=str(raw.get("name") or path.stem), path=path, studies=studies,
                   condition_levels=levels, description=str(raw.get("description", "")),
                   gene_annotation=annotation, qc=qc, references=references)


def _parse_reference(entry: Any, index: int, where: str, variables: dict[str, str]) -> ReferenceEntry:
    here = f"catalog {where} references[{index}]"
    if not isinstance(entry, dict):
        raise ScgrnInputError(f"{here} must be a mapping with name, format, species, files")
    name = _require(entry, "name", here, None)
    fmt = _require(entry, "format", here, name)
    if fmt not in REFERENCE_FORMATS:
        raise ScgrnInputError(f"{here}: unknown reference format {fmt!r}", study=name,
                              fix=f"use one of {sorted(REFERENCE_FORMATS)}")
    species = _require(entry, "species", here, name)
    files_raw = _require(entry, "files", here, name, dict)
    unknown_roles = set(files_raw) - set(REFERENCE_FORMATS[fmt])
    if unknown_roles:
        raise ScgrnInputError(f"{here}: unknown file roles {sorted(unknown_roles)} for format {fmt}", study=name,
                              fix=f"use {list(REFERENCE_FORMATS[fmt])}")
    files = {role: _parse_file({"role": "counts", **spec} if isinstance(spec, dict) else spec, here, name, variables)
             for role, spec in files_raw.items()}
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ScgrnInputError(f"{here}: options must be a mapping", study=name)
    return ReferenceEntry(name=name, format=fmt, species=species, files=files, options=dict(options))


def _require(entry: dict, key: str, where: str, study: str | None, kind: type | tuple = str) -> Any:
    if key not in entry or entry[key] in (None, ""):
        raise ScgrnInputError(f"{where}: missing required field {key!r}", study=study,
                              fix=f"add '{key}:' to the study entry")
    value = entry[key]
    if not isinstance(value, kind):
        raise ScgrnInputError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}",
                              study=study)
    return value


def _parse_study(entry: Any, index: int, where: str, levels: tuple[str, str], variables: dict[str, str]) -> Study:
    if not isinstance(entry, dict):
        raise ScgrnInputError(f"catalog {where}: studies[{index}] must be a mapping")
    accession = _require(entry, "accession", f"catalog {where} studies[{index}]", None)
    if not _ACCESSION.fullmatch(accession):
        raise ScgrnInputError(f"catalog {where}: accession {accession!r} is not a valid partition key",
                              study=accession, fix="use letters, digits, '_', '.', '-' (e.g. GSE98969)")
    here = f"catalog {where}"
    allowed = {"accession", "title", "species", "format", "gene_id_type", "files", "metadata", "condition",
               "strip_r_prefix", "skip_bad_samples", "exclude_samples"}
    unknown = set(entry) - allowed
    if unknown:
        raise ScgrnInputError(f"{here}: unknown fields {sorted(unknown)}", study=accession,
                              fix=f"allowed fields: {sorted(allowed)}")
    fmt = _require(entry, "format", here, accession)
    if fmt not in KNOWN_FORMATS:
        raise ScgrnInputError(f"{here}: unknown format {fmt!r}", study=accession,
                              fix=f"use one of {sorted(KNOWN_FORMATS)}")
    species = _require(entry, "species", here, accession)
    if species not in KNOWN_SPECIES:
        raise ScgrnInputError(f"{here}: unknown species {species!r}", study=accession,
                              fix=f"use one of {list(KNOWN_SPECIES)}")
    gene_id_type = _require(entry, "gene_id_type", here, accession)
    if gene_id_type not in KNOWN_GENE_ID_TYPES:
        raise ScgrnInputError(f"{here}: unknown gene_id_type {gene_id_type!r}", study=accession,
                              fix=f"use one of {list(KNOWN_GENE_ID_TYPES)}")
    files_raw = _require(entry, "files", here, accession, list)
    files = tuple(_parse_file(f, here, accession, variables) for f in files_raw)
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ScgrnInputError(f"{here}: duplicate file names {names}", study=accession, fix="give each file a unique name")
    if not any(f.role == "counts" for f in files):
        raise ScgrnInputError(f"{here}: no file with role 'counts'", study=accession,
                              fix="mark the count archive with 'role: counts'")

    metadata = None
    if entry.get("metadata") is not None:
        metadata = _parse_metadata_join(entry, names, here, accession)
    elif isinstance(entry.get("condition"), dict) and set(entry["condition"]) != {"na"}:
        raise ScgrnInputError(f"{here}: a condition rule needs the metadata table it reads", study=accession,
                              fix="add metadata: {file: <the study's metadata file>}, or drop the condition "
                                  "(condition: {na: <why>})")
    if fmt == formats.NCBI_RNASEQ_COUNTS and not any(f.role == "gene_map" for f in files) and gene_id_type == "entrez":
        raise ScgrnInputError(f"{here}: NCBI GeneID counts need the GeneID -> symbol table", study=accession,
                              fix="add NCBI's annotation table (e.g. Mouse.GRCm39.annot.tsv.gz) with role: gene_map")
    skip_bad_samples = _boolean_field(entry, "skip_bad_samples", False, here, accession)
    exclude_samples = entry.get("exclude_samples") or []
    if not isinstance(exclude_samples, list) or not all(isinstance(v, str) and v.strip() for v in exclude_samples):
        raise ScgrnInputError(f"{here}: exclude_samples must be a list of sample accessions, got {exclude_samples!r}",
                              study=accession, fix="e.g. exclude_samples: [GSM2629430]")
    strip_r_prefix = _boolean_field(entry, "strip_r_prefix", fmt == formats.RAW_TAR_DROPSEQ_DGE, here, accession)

    condition = None
    condition_na_reason = ""
    rule = entry.get("condition")
    if isinstance(rule, dict) and set(rule) == {"na"}:
        # An explicit "no contrast here": the study joins the corpus with condition NA.
        if not isinstance(rule["na"], str) or not rule["na"].strip():
            raise ScgrnInputError(f"{here}: condition.na must say why the study has no condition", study=accession,
                                  fix="e.g. condition: {na: lifespan atlas, no Alzheimer's/control contrast}")
        condition_na_reason = rule["na"].strip()
    elif rule is not None:
        if not isinstance(rule, dict) or not isinstance(rule.get("column"), str) or not rule["column"] \
                or not isinstance(rule.get("values"), dict):
            raise ScgrnInputError(f"{here}: condition must have 'column' and a 'values' mapping", study=accession,
                                  fix="e.g. condition: {column: strain, values: {5XFAD: AD, C57BL/6: control}}, "
                                      "or condition: {na: <why the study has no contrast>}")
        values = {str(k): str(v) for k, v in rule["values"].items()}
        bad = sorted(set(values.values()) - set(levels))
        if bad:
            raise ScgrnInputError(f"{here}: condition labels {bad} are not among condition_levels {list(levels)}",
                                  study=accession, fix="map metadata values onto the catalog's condition_levels")
        condition = ConditionRule(column=str(rule["column"]), values=values)

    return Study(accession=accession, title=str(entry.get("title", accession)), species=species, format=fmt,
                 gene_id_type=gene_id_type, files=files, metadata=metadata, condition=condition,
                 strip_r_prefix=strip_r_prefix,
                 condition_na_reason=condition_na_reason, skip_bad_samples=skip_bad_samples,
                 exclude_samples=tuple(v.strip() for v in exclude_samples))


def _parse_metadata_join(entry: dict, names: list[str], here: str, accession: str) -> MetadataJoin:
    metadata_raw = _require(entry, "metadata", here, accession, dict)
    metadata_file = _require(metadata_raw, "file", f"{here} metadata", accession)
    if metadata_file not in names:
        raise ScgrnInputError(f"{here}: metadata file {metadata_file!r} is not among the study's files {names}",
                              study=accession, fix="list it under 'files' with role: metadata")
    metadata_keys = {"file", "sample_column", "well_column", "plate_column", "cells_without_metadata",
                     "animal_column"}
    metadata = MetadataJoin(file=metadata_file, **{k: str(v) for k, v in metadata_raw.items() if k != "file"}) \
        if set(metadata_raw) <= metadata_keys else None
    if metadata is None:
        raise ScgrnInputError(f"{here}: unknown metadata keys {sorted(set(metadata_raw) - metadata_keys)}",
                              study=accession, fix=f"allowed: {', '.join(sorted(metadata_keys))}")
    if metadata.cells_without_metadata not in ("error", "na"):
        raise ScgrnInputError(f"{here}: metadata.cells_without_metadata is {metadata.cells_without_metadata!r}",
                              study=accession, fix="use error (the default) or na")
    return metadata


def _boolean_field(entry: dict, key: str, default: bool, here: str, accession: str) -> bool:
    """A true/false field; anything else (``maybe``, ``1``, ``"false"``) is an error, not a truthy guess."""
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ScgrnInputError(f"{here}: {key} must be true or false, got {value!r}", study=accession,
                              fix=f"write {key}: true or {key}: false")
    return value


def _parse_file(raw: Any, here: str, accession: str, variables: dict[str, str]) -> StudyFile:
    if not isinstance(raw, dict):
        raise ScgrnInputError(f"{here}: each file must be a mapping with name, url, sha256, role", study=accession)
    name = _require(raw, "name", f"{here} file", accession)
    if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise ScgrnInputError(f"{here}: file name {name!r} must be a plain file name", study=accession)
    url = expand_variables(_require(raw, "url", f"{here} file {name}", accession), variables)
    try:
        scheme = urlparse(url).scheme
    except ValueError as error:  # e.g. an unbalanced IPv6 bracket
        raise ScgrnInputError(f"{here}: file {name} has a malformed URL {url!r} ({error})", study=accession,
                              fix="fix the URL in the catalog entry") from None
    if scheme not in ALLOWED_URL_SCHEMES:
        raise ScgrnInputError(f"{here}: file {name} has URL {url!r} with scheme {scheme!r}", study=accession,
                              fix=f"use one of {list(ALLOWED_URL_SCHEMES)}://")
    refuse_file_url_outside_roots(url, variables, here=here, name=name, accession=accession)
    sha256 = raw.get("sha256")
    # Absent: trust on first use (pinned in the lock file by the first download). Present: must be valid.
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256.lower())):
        raise ScgrnInputError(f"{here}: file {name} has no valid sha256 (64 hex digits), got {sha256!r}",
                              study=accession, fix="add the file's sha256 (sha256sum FILE) or leave the field out "
                                                   "to pin it on first download")
    role = raw.get("role", "counts")
    if not isinstance(role, str) or role not in FILE_ROLES:
        raise ScgrnInputError(f"{here}: file {name} has unknown role {role!r}", study=accession,
                              fix=f"use one of {list(FILE_ROLES)}")
    return StudyFile(name=name, url=url, sha256=sha256.lower() if sha256 is not None else None, role=role)


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
