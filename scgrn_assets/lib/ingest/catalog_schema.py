"""The shape of a catalog file, as pydantic models: what :func:`catalog.parse_catalog` validates first.

Every model forbids keys it does not know (``extra="forbid"``) and is strict: YAML's ``yes`` is not
a boolean, ``1`` is not ``true``. A :class:`pydantic.ValidationError` never reaches the user: the first
error becomes one :class:`ScgrnInputError` that names the catalog, the study and the fix, as the
hand-written checks did. What needs more than one entry at a time (file URLs and the folders they may
read, a metadata file among the study's files, condition labels among the catalog's levels, repeated
accessions) is checked in :mod:`scgrn_assets.lib.ingest.catalog` once the shape is known to be right.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints, ValidationError
from pydantic import ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from scgrn_assets.lib.corpus.thresholds import QC_FIELDS
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.formats import STUDY_FORMATS
from scgrn_assets.lib.text_files import TEXT_ENCODINGS

KNOWN_GENE_ID_TYPES = ("symbol", "ensembl", "entrez")
KNOWN_SPECIES = ("mouse", "human")
FILE_ROLES = ("counts", "metadata", "gene_map", "gene_annotation")
REFERENCE_FORMATS = {"trrust": ("edges",), "regulon": ("edges",), "edge_list": ("edges",),
                     "string_v12": ("info", "links", "aliases")}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ACCESSION = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")

#: A field that must be present and not empty.
Text = Annotated[str, StringConstraints(min_length=1)]
#: A field read as the text written (old catalogs give numbers as titles or column names).
AsText = Annotated[str, BeforeValidator(str)]


def refusal(message: str, fix: str = "") -> PydanticCustomError:
    """A validation error carrying our own message and fix (mapped to ScgrnInputError unchanged)."""
    return PydanticCustomError("catalog", "{message}", {"message": message, "fix": fix})


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FileDoc(_Document):
    """One file of a study (or a reference, or the gene annotation)."""

    name: Text
    url: Text
    sha256: Any = None  # absent: trust on first use; present: 64 hex digits
    role: Any = "counts"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
            raise refusal(f"file name {name!r} must be a plain file name")
        return name

    @field_validator("sha256")
    @classmethod
    def _valid_sha256(cls, sha256: Any, info: ValidationInfo) -> str | None:
        if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256.lower())):
            raise refusal(f"file {info.data.get('name')} has no valid sha256 (64 hex digits), got {sha256!r}",
                          "add the file's sha256 (sha256sum FILE) or leave the field out to pin it on first download")
        return sha256.lower() if sha256 is not None else None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: Any, info: ValidationInfo) -> str:
        if not isinstance(role, str) or role not in FILE_ROLES:
            raise refusal(f"file {info.data.get('name')} has unknown role {role!r}", f"use one of {list(FILE_ROLES)}")
        return role


class AnnotationFileDoc(FileDoc):
    role: Any = "gene_annotation"


class MetadataDoc(_Document):
    """How cells meet their metadata table (see :class:`catalog.MetadataJoin`)."""

    file: Text
    sample_column: AsText = "Sample Name"
    well_column: AsText = "well_id"
    plate_column: AsText = "plate_id"
    cells_without_metadata: Annotated[Literal["error", "na"], BeforeValidator(str)] = "error"
    animal_column: AsText = ""


class NoConditionDoc(_Document):
    """``condition: {na: <why>}``: the study has no contrast; its cells' condition is NA."""

    na: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class ConditionRuleDoc(_Document):
    """``condition: {column: strain, values: {5XFAD: AD, C57BL/6: control}}``."""

    column: Text
    values: dict[Any, Any]


class StudyDoc(_Document):
    """One study entry."""

    accession: Text
    title: AsText | None = None
    species: Literal[KNOWN_SPECIES]
    format: Literal[tuple(STUDY_FORMATS)]
    gene_id_type: Literal[KNOWN_GENE_ID_TYPES]
    files: list[FileDoc]
    metadata: MetadataDoc | None = None
    condition: NoConditionDoc | ConditionRuleDoc | None = None
    strip_r_prefix: StrictBool | None = None  # None: true for Drop-seq DGE files, false otherwise
    skip_bad_samples: StrictBool = False
    exclude_samples: list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]] | None = None
    # Of the study's text files; a byte not valid in it is an error naming the file and line.
    encoding: Literal[TEXT_ENCODINGS] = "utf-8"

    @field_validator("accession")
    @classmethod
    def _partition_key(cls, accession: str) -> str:
        if not _ACCESSION.fullmatch(accession):
            raise refusal(f"accession {accession!r} is not a valid partition key",
                          "use letters, digits, '_', '.', '-' (e.g. GSE98969)")
        return accession


class ReferenceDoc(_Document):
    """A reference network and its files by role."""

    name: Text
    format: Literal[tuple(REFERENCE_FORMATS)]
    species: Text
    files: dict[str, FileDoc]
    options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _roles_of_the_format(self) -> "ReferenceDoc":
        unknown_roles = set(self.files) - set(REFERENCE_FORMATS[self.format])
        if unknown_roles:
            raise refusal(f"unknown file roles {sorted(unknown_roles)} for format {self.format}",
                          f"use {list(REFERENCE_FORMATS[self.format])}")
        return self


class CatalogDoc(_Document):
    """A whole catalog file."""

    name: Any = None
    description: Any = ""
    condition_levels: list[str] = ["control", "AD"]
    gene_annotation: AnnotationFileDoc | None = None
    qc: dict[Literal[QC_FIELDS], Annotated[int, Field(ge=0)]] | None = None
    references: list[ReferenceDoc] | None = None
    studies: Annotated[list[StudyDoc], Field(min_length=1)]

    @field_validator("condition_levels")
    @classmethod
    def _two_levels(cls, levels: list[str]) -> list[str]:
        if len(levels) != 2 or len(set(levels)) != 2:
            raise refusal("condition_levels must be two distinct labels, reference first",
                          "e.g. condition_levels: [control, AD]")
        return levels


def validate_catalog_document(raw: Any, *, where: str) -> CatalogDoc:
    """``raw`` (the parsed YAML) as a :class:`CatalogDoc`, or the first problem as a ScgrnInputError."""
    try:
        return CatalogDoc.model_validate(raw)
    except ValidationError as error:
        raise _input_error(error.errors(include_url=False), raw, where) from None


# --------------------------------------------------------------------------- errors, as the user reads them


def _at(raw: Any, loc: tuple) -> Any:
    """The raw value at ``loc`` (None where the path does not exist)."""
    for key in loc:
        try:
            raw = raw[key]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model validating the mapping at ``loc`` (for the list of keys it allows)."""
    if loc == ():
        return CatalogDoc
    if loc == ("gene_annotation",):
        return AnnotationFileDoc
    if len(loc) == 2 and loc[0] == "studies":
        return StudyDoc
    if len(loc) == 2 and loc[0] == "references":
        return ReferenceDoc
    if len(loc) == 3 and loc[0] == "studies" and loc[2] == "metadata":
        return MetadataDoc
    if len(loc) == 4 and loc[2] == "files":
        return FileDoc
    return None


def _input_error(errors: list[dict], raw: Any, where: str) -> ScgrnInputError:
    error = errors[0]
    loc = tuple(error["loc"])
    # Where in the catalog, and which study (or reference) to name.
    study = None
    here = f"catalog {where}"
    if loc[:1] in (("studies",), ("references",)) and len(loc) >= 2:
        key = "accession" if loc[0] == "studies" else "name"
        named = _at(raw, loc[:2] + (key,))
        if isinstance(named, str) and named:
            study = named
            if loc[0] == "references":
                here = f"{here} references[{loc[1]}]"
        else:
            here = f"{here} {loc[0]}[{loc[1]}]"
    elif loc[:1] == ("gene_annotation",):
        here = f"{here} gene_annotation"
        study = "catalog"
    if len(loc) >= 4 and loc[2] == "files":
        file_name = _at(raw, loc[:4] + ("name",))
        file_here = f"{here} file {file_name}" if isinstance(file_name, str) and file_name else f"{here} file"
    elif loc[:1] == ("gene_annotation",):
        file_here = here
    else:
        file_here = here

    def refuse(problem: str, fix: str | None = None, *, at: str | None = None) -> ScgrnInputError:
        return ScgrnInputError(f"{at or here}: {problem}", study=study, fix=fix)

    kind, field, value = error["type"], (loc[-1] if loc else None), error.get("input")
    if kind == "catalog":  # our own message
        return refuse(error["ctx"]["message"], error["ctx"]["fix"] or None)
    if loc == ():
        return ScgrnInputError(f"catalog {where} must be a mapping with a 'studies' list")
    if loc == ("studies",):
        return ScgrnInputError(f"catalog {where} has no 'studies' list", fix="add at least one study entry")
    if loc[0] == "condition_levels":
        return refuse("condition_levels must be two distinct labels, reference first",
                      "e.g. condition_levels: [control, AD]")
    if loc[0] == "qc":
        return refuse(f"qc must map {sorted(QC_FIELDS)} to non-negative integers, got {raw.get('qc')!r}",
                      "e.g. qc: {min_genes_per_cell: 200}")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        extras = sorted(str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden"
                        and tuple(e["loc"][:-1]) == parent)
        model = _model_at(parent)
        allowed = sorted(model.model_fields) if model is not None else []
        if parent == ():
            return ScgrnInputError(f"catalog {where} has unknown top-level keys {extras}",
                                   fix=f"allowed: {', '.join(allowed)}")
        if model is MetadataDoc:
            return refuse(f"unknown metadata keys {extras}", f"allowed: {', '.join(allowed)}")
        if model is None:  # inside a condition rule: handled below
            pass
        else:
            return refuse(f"unknown fields {extras}", f"allowed fields: {allowed}",
                          at=file_here if model in (FileDoc, AnnotationFileDoc) else None)
    if len(loc) >= 3 and loc[2] == "condition":
        rule = _at(raw, loc[:3])
        if isinstance(rule, dict) and set(rule) == {"na"}:
            return refuse("condition.na must say why the study has no condition",
                          "e.g. condition: {na: lifespan atlas, no Alzheimer's/control contrast}")
        return refuse("condition must have 'column' and a 'values' mapping",
                      "e.g. condition: {column: strain, values: {5XFAD: AD, C57BL/6: control}}, "
                      "or condition: {na: <why the study has no contrast>}")
    if len(loc) >= 3 and loc[2] == "exclude_samples":
        return refuse(f"exclude_samples must be a list of sample accessions, got {_at(raw, loc[:3])!r}",
                      "e.g. exclude_samples: [GSM2629430]")
    if kind == "model_type":
        if len(loc) == 2 and loc[0] == "studies":
            return ScgrnInputError(f"catalog {where}: studies[{loc[1]}] must be a mapping")
        if len(loc) == 2 and loc[0] == "references":
            return ScgrnInputError(f"{here} must be a mapping with name, format, species, files")
        if _is_file(loc):
            return refuse("each file must be a mapping with name, url, sha256, role")
        return refuse(f"field {field!r} must be a mapping, got {value!r}")
    if kind == "bool_type":
        return refuse(f"{field} must be true or false, got {value!r}", f"write {field}: true or {field}: false")
    if kind == "literal_error":
        if field == "cells_without_metadata":
            return refuse(f"metadata.cells_without_metadata is {value!r}", "use error (the default) or na")
        noun = "reference format" if loc[0] == "references" else field
        return refuse(f"unknown {noun} {value!r}", f"use one of {_choices(field, loc)}")
    at = file_here if _is_file(loc[:-1]) else f"{here} metadata" if "metadata" in loc[:-1] else here
    if kind == "missing" or (kind == "string_type" and value is None) or kind == "string_too_short":
        return refuse(f"missing required field {field!r}", f"add '{field}:' to the study entry", at=at)
    if kind.endswith("_type"):
        expected = kind.removesuffix("_type").replace("string", "str").replace("model", "dict")
        return refuse(f"field {field!r} must be {expected}, got {value!r}", at=at)
    return refuse(f"{'.'.join(map(str, loc))}: {error['msg']}", at=at)


def _is_file(loc: tuple) -> bool:
    return loc == ("gene_annotation",) or (len(loc) == 4 and loc[2] == "files")


def _choices(field: Any, loc: tuple) -> list[str]:
    if loc[0] == "references":
        return sorted(REFERENCE_FORMATS)
    return {"format": sorted(STUDY_FORMATS), "species": list(KNOWN_SPECIES),
            "gene_id_type": list(KNOWN_GENE_ID_TYPES), "encoding": list(TEXT_ENCODINGS)}.get(field, [])


__all__ = ["CatalogDoc", "StudyDoc", "FileDoc", "MetadataDoc", "ReferenceDoc", "validate_catalog_document"]
