"""Catalog loading and validation: every mistake is one clear message naming study and fix."""

from __future__ import annotations

import copy

import pytest
import yaml

from scgrn_assets.lib.catalog import builtin_catalog_path, load_catalog, parse_catalog
from scgrn_assets.lib.errors import ScgrnInputError

SHA = "a" * 64


def minimal_catalog() -> dict:
    return {"name": "mine", "studies": [{
        "accession": "GSE98969", "title": "t", "species": "mouse", "format": "raw_tar_dense_tsv",
        "gene_id_type": "symbol",
        "files": [{"name": "GSE98969_RAW.tar", "url": "https://example.org/GSE98969_RAW.tar", "sha256": SHA,
                   "role": "counts"},
                  {"name": "runs.csv", "url": "file:///data/runs.csv", "sha256": SHA, "role": "metadata"}],
        "metadata": {"file": "runs.csv"},
        "condition": {"column": "strain", "values": {"5XFAD": "AD", "C57BL/6": "control"}},
    }]}


def parse(raw: dict, tmp_path):
    return parse_catalog(raw, path=tmp_path / "catalog.yaml", variables={"SCGRN_HOME": "/home/me"})


def test_builtin_demo_catalog_loads_with_home_expanded(tmp_path):
    catalog = load_catalog("demo", variables={"SCGRN_HOME": str(tmp_path)})
    assert catalog.accessions == ["GSE900001", "GSE900002", "GSE900003", "GSE900004"]
    assert {s.format for s in catalog.studies} == {"raw_tar_dense_tsv", "processed_csv_well_plate",
                                                   "raw_tar_dropseq_dge", "raw_tar_10x_mtx"}
    assert all(f.url.startswith(f"file://{tmp_path}/demo_geo/") for s in catalog.studies for f in s.files)
    assert catalog.study("GSE900003").condition is None  # the study without an AD/control contrast


def test_user_catalog_file_path_is_accepted(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(minimal_catalog()))
    catalog = load_catalog(str(path))
    assert catalog.name == "mine" and catalog.accessions == ["GSE98969"]
    assert catalog.study("GSE98969").condition.values["5XFAD"] == "AD"


def _broken(mutate) -> dict:
    raw = copy.deepcopy(minimal_catalog())
    mutate(raw["studies"][0], raw)
    return raw


@pytest.mark.parametrize("mutate, message, fix", [
    (lambda s, r: s.update(format="parquet"), "unknown format 'parquet'", "raw_tar_10x_mtx"),
    (lambda s, r: s["files"][0].pop("sha256"), "has no valid sha256", "sha256sum"),
    (lambda s, r: s["files"][0].update(sha256="xyz"), "has no valid sha256", "sha256sum"),
    (lambda s, r: s["files"][0].update(url="ftp://ftp.ncbi.nlm.nih.gov/x.tar"), "scheme 'ftp'", "https"),
    (lambda s, r: s.update(species="yeast"), "unknown species", "mouse"),
    (lambda s, r: s.update(gene_id_type="entrez"), "unknown gene_id_type", "ensembl"),
    (lambda s, r: s.pop("format"), "missing required field 'format'", "add 'format:'"),
    (lambda s, r: s.update(colour="blue"), "unknown fields ['colour']", "allowed fields"),
    (lambda s, r: s["metadata"].update(file="other.csv"), "metadata file 'other.csv' is not among", "role: metadata"),
    (lambda s, r: s["condition"]["values"].update({"WT": "healthy"}), "labels ['healthy']", "condition_levels"),
    (lambda s, r: r["studies"].append(copy.deepcopy(s)), "lists study GSE98969 twice", "one entry"),
    (lambda s, r: s.update(accession="GSE 1"), "not a valid partition key", "letters"),
    (lambda s, r: s["files"][0].update(name="../etc/passwd"), "must be a plain file name", None),
    (lambda s, r: s["files"][0].update(url="file://${NOT_SET_ANYWHERE}/x"), "NOT_SET_ANYWHERE", "export"),
    (lambda s, r: r.update(qc={"min_genes": 3}), "qc must map", "min_genes_per_cell"),
])
def test_invalid_catalogs_get_clear_messages(tmp_path, mutate, message, fix):
    with pytest.raises(ScgrnInputError) as error:
        parse(_broken(mutate), tmp_path)
    text = str(error.value)
    assert message in text
    if fix:
        assert fix in text


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("studies: [\n  - {accession: GSE1")
    with pytest.raises(ScgrnInputError, match="bad.yaml is not valid YAML"):
        load_catalog(str(path))


def test_unknown_builtin_catalog_lists_the_builtins():
    with pytest.raises(ScgrnInputError, match="demo"):
        load_catalog("no_such_catalog")
    assert builtin_catalog_path("demo").exists()
