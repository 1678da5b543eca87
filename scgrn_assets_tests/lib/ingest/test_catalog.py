"""Catalog loading and validation: every mistake is one clear message naming study and fix."""

from __future__ import annotations

import copy

import pytest
import yaml

from scgrn_assets.lib.ingest.catalog import builtin_catalog_path, load_catalog, parse_catalog
from scgrn_assets.lib.errors import ScgrnInputError

SHA = "a" * 64


def minimal_catalog() -> dict:
    return {"name": "mine", "studies": [{
        "accession": "GSE98969", "title": "t", "species": "mouse", "format": "raw_tar_dense_tsv",
        "gene_id_type": "symbol",
        "files": [{"name": "GSE98969_RAW.tar", "url": "https://example.org/GSE98969_RAW.tar", "sha256": SHA,
                   "role": "counts"},
                  {"name": "runs.csv", "url": "https://example.org/runs.csv", "sha256": SHA, "role": "metadata"}],
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
    (lambda s, r: s["files"][0].update(sha256="xyz"), "has no valid sha256", "sha256sum"),
    (lambda s, r: s["files"][0].update(sha256=""), "has no valid sha256", "pin it on first download"),
    (lambda s, r: s["files"][0].update(url="ftp://ftp.ncbi.nlm.nih.gov/x.tar"), "scheme 'ftp'", "https"),
    (lambda s, r: s.update(species="yeast"), "unknown species", "mouse"),
    (lambda s, r: s.update(gene_id_type="refseq"), "unknown gene_id_type", "ensembl"),
    (lambda s, r: s.update(condition={"na": " "}), "condition.na must say why", "na:"),
    (lambda s, r: s.update(condition={"na": "atlas", "column": "x"}), "must have 'column'", "{na:"),
    (lambda s, r: s.update(skip_bad_samples="yes"), "skip_bad_samples must be true or false", None),
    (lambda s, r: s["metadata"].update(cells_without_metadata="drop"), "cells_without_metadata is 'drop'", "na"),
    (lambda s, r: s.update(format="ncbi_rnaseq_counts", gene_id_type="entrez"), "GeneID -> symbol", "gene_map"),
    (lambda s, r: s.pop("format"), "missing required field 'format'", "add 'format:'"),
    (lambda s, r: s.update(colour="blue"), "unknown fields ['colour']", "allowed fields"),
    (lambda s, r: s["metadata"].update(file="other.csv"), "metadata file 'other.csv' is not among", "role: metadata"),
    (lambda s, r: s["condition"]["values"].update({"WT": "healthy"}), "labels ['healthy']", "condition_levels"),
    (lambda s, r: r["studies"].append(copy.deepcopy(s)), "lists study GSE98969 twice", "one entry"),
    (lambda s, r: s.update(accession="GSE 1"), "not a valid partition key", "letters"),
    (lambda s, r: s["files"][0].update(name="../etc/passwd"), "must be a plain file name", None),
    (lambda s, r: s["files"][0].update(url="file://${NOT_SET_ANYWHERE}/x"), "NOT_SET_ANYWHERE", "export"),
    (lambda s, r: r.update(qc={"min_genes": 3}), "qc must map", "min_genes_per_cell"),
    (lambda s, r: r.update(qc={"min_genes_per_cell": True}), "qc must map", "min_genes_per_cell"),
    (lambda s, r: s.update(exclude_samples="GSM1"), "exclude_samples must be a list", "exclude_samples: [GSM"),
    (lambda s, r: s.update(strip_r_prefix="maybe"), "strip_r_prefix must be true or false, got 'maybe'",
     "strip_r_prefix: true"),
    (lambda s, r: s.update(strip_r_prefix=1), "strip_r_prefix must be true or false, got 1", None),
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


def test_file_without_sha256_is_left_to_trust_on_first_use(tmp_path):
    raw = _broken(lambda s, r: s["files"][0].pop("sha256"))
    catalog = parse(raw, tmp_path)
    assert catalog.study("GSE98969").files[0].sha256 is None
    assert catalog.study("GSE98969").files[1].sha256 == SHA  # a pinned file stays pinned
    assert catalog.lock_path == tmp_path / "catalog.lock.yaml"


def test_explicit_na_condition_keeps_its_reason(tmp_path):
    raw = _broken(lambda s, r: s.update(condition={"na": "lifespan atlas: no Alzheimer's/control contrast"}))
    study = parse(raw, tmp_path).study("GSE98969")
    assert study.condition is None
    assert study.condition_na_reason == "lifespan atlas: no Alzheimer's/control contrast"
    assert study.skip_bad_samples is False and study.metadata.cells_without_metadata == "error"


def test_real_catalog_has_the_seven_geo_studies_with_https_urls_formats_and_condition_rules():
    from urllib.parse import parse_qs, urlsplit

    from scgrn_assets.lib.ingest.catalog import KNOWN_FORMATS

    catalog = load_catalog("real")
    assert catalog.accessions == ["GSE98969", "GSE98971", "GSE121654", "GSE123025", "GSE123030", "GSE74995",
                                  "GSE130627"]
    assert catalog.lock_path == builtin_catalog_path("real").with_name("real.lock.yaml")
    for study in catalog.studies:
        assert study.species == "mouse" and study.format in KNOWN_FORMATS
        assert study.condition is not None or study.condition_na_reason, study.accession
        assert study.metadata_file.name == f"{study.accession}_series_matrix.txt.gz"
        for study_file in study.files:
            parts = urlsplit(study_file.url)
            assert parts.scheme == "https" and study_file.sha256 is None  # pinned on first use
            if parts.netloc == "ftp.ncbi.nlm.nih.gov":  # GEO's layout: /geo/series/GSE98nnn/GSE98969/{suppl,matrix}/
                _, geo, series, stem, accession, folder, name = parts.path.split("/")
                assert (geo, series, stem, name) == ("geo", "series", accession[:-3] + "nnn", study_file.name)
                assert folder == ("matrix" if study_file.role == "metadata" else "suppl")
            else:  # GEO's NCBI-generated counts and annotation
                assert parts.netloc == "www.ncbi.nlm.nih.gov" and parts.path == "/geo/download/"
                assert parse_qs(parts.query)["file"] == [study_file.name]
    for accession in ("GSE98969", "GSE98971", "GSE121654", "GSE123025"):  # the four processed studies
        assert catalog.study(accession).gene_id_type == "symbol"
    assert catalog.study("GSE98969").condition.column == "strain"
    assert catalog.study("GSE98969").condition.values == {"5XFAD": "AD", "C57BL/6": "control"}
    assert catalog.study("GSE98969").skip_bad_samples
    assert [s.accession for s in catalog.studies if s.condition is None] == [
        "GSE121654", "GSE123025", "GSE123030", "GSE74995", "GSE130627"]


def alias_bomb(depth: int) -> str:
    """Anchors nested ``depth`` deep, nine aliases each: 9**depth strings from a few hundred bytes."""
    lines = ['description: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, depth):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("depth", [3, 9])
def test_yaml_alias_bomb_is_refused_at_once_naming_the_catalog(tmp_path, depth):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(depth) + yaml.safe_dump(minimal_catalog()))
    started = time.monotonic()
    with pytest.raises(ScgrnInputError, match=r"bomb.yaml is not valid YAML: aliases \(\*l0\) are not allowed"):
        load_catalog(str(path))
    assert time.monotonic() - started < 2


def test_yaml_alias_bomb_in_a_lock_file_is_refused(tmp_path):
    from scgrn_assets.lib.ingest.checksum_lock import ChecksumLock

    path = tmp_path / "catalog.lock.yaml"
    path.write_text(alias_bomb(3) + "files: {}\n")
    with pytest.raises(ScgrnInputError, match="aliases"):
        ChecksumLock(path).pins()


def test_duplicate_yaml_keys_are_refused_not_last_one_wins(tmp_path):
    path = tmp_path / "dup.yaml"
    text = yaml.safe_dump(minimal_catalog(), sort_keys=False)
    assert "\n  species: mouse\n" in text
    path.write_text(text.replace("\n  species: mouse\n", "\n  species: mouse\n  species: human\n"))
    with pytest.raises(ScgrnInputError, match="dup.yaml is not valid YAML: duplicate key 'species'"):
        load_catalog(str(path))


def test_condition_values_are_the_text_written_not_yaml_1_1_booleans_or_numbers(tmp_path):
    text = yaml.safe_dump(minimal_catalog(), sort_keys=False)
    text = text.replace("      5XFAD: AD\n      C57BL/6: control\n",
                        "      yes: AD\n      off: control\n      ~: control\n      01: AD\n      2020-01-01: AD\n")
    path = tmp_path / "scalars.yaml"
    path.write_text(text)
    values = load_catalog(str(path)).study("GSE98969").condition.values
    assert values == {"yes": "AD", "off": "control", "~": "control", "01": "AD", "2020-01-01": "AD"}


def test_yaml_1_1_yes_is_not_a_boolean_field_value(tmp_path):
    text = yaml.safe_dump(_broken(lambda s, r: s.update(skip_bad_samples=True)), sort_keys=False)
    path = tmp_path / "yes.yaml"
    path.write_text(text.replace("skip_bad_samples: true", "skip_bad_samples: yes"))
    with pytest.raises(ScgrnInputError, match="skip_bad_samples must be true or false, got 'yes'"):
        load_catalog(str(path))


def test_metadata_is_optional_for_a_study_without_a_condition(tmp_path):
    raw = _broken(lambda s, r: (s.pop("metadata"), s.pop("condition"), s["files"].pop(1)))
    study = parse(raw, tmp_path).study("GSE98969")
    assert study.metadata is None and study.metadata_file is None and study.condition is None


def test_a_condition_rule_without_a_metadata_table_is_refused(tmp_path):
    with pytest.raises(ScgrnInputError, match="a condition rule needs the metadata table it reads"):
        parse(_broken(lambda s, r: s.pop("metadata")), tmp_path)


# --- hostile catalogs that used to give raw tracebacks, and catalog scale ------------------------


@pytest.mark.parametrize("nesting", [
    pytest.param("[" * 50_000 + "]" * 50_000, id="flow"),
    pytest.param("".join("\n" + " " * depth + "-" for depth in range(1, 2_000)), id="block"),
    pytest.param("".join("\n" + " " * depth + f"k{depth}:" for depth in range(1, 2_000)), id="mapping"),
])
def test_a_deeply_nested_catalog_names_the_file_not_a_recursion_error(tmp_path, nesting):
    path = tmp_path / "deep.yaml"
    path.write_text(yaml.safe_dump(minimal_catalog()) + "options: " + nesting + "\n")
    with pytest.raises(ScgrnInputError, match=r"(?s)deep.yaml is not valid YAML: .*nest") as error:
        load_catalog(str(path))
    assert "fix the YAML" in str(error.value)


def test_an_integer_of_5000_digits_names_the_file_not_a_value_error(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(minimal_catalog()) + "qc: {min_genes_per_cell: " + "9" * 5000 + "}\n")
    with pytest.raises(ScgrnInputError, match=r"digits.yaml is not valid YAML: an integer of 5000 digits"):
        load_catalog(str(path))


def test_yaml_tags_beyond_plain_data_are_refused(tmp_path):
    path = tmp_path / "tagged.yaml"
    path.write_text(yaml.safe_dump(minimal_catalog()) + "description: !!binary aGVsbG8=\n")
    with pytest.raises(ScgrnInputError, match=r"tagged.yaml is not valid YAML: the tag .*binary is not allowed"):
        load_catalog(str(path))


@pytest.mark.parametrize("libyaml", [True, False], ids=["libyaml", "pure_python"])
def test_libyaml_and_pure_python_parsers_read_the_same_values_and_refuse_the_same_files(monkeypatch, libyaml):
    from scgrn_assets.lib.ingest.strict_yaml import StrictYamlError, load_strict_yaml

    if libyaml and not yaml.__with_libyaml__:
        pytest.skip("PyYAML without libyaml")
    monkeypatch.setattr(yaml, "__with_libyaml__", libyaml)
    real = builtin_catalog_path("real").read_text()
    assert load_strict_yaml(real) == yaml.safe_load(real)  # nothing YAML 1.1-specific in it
    text = "a: [1, -2, 1.5, .inf, ~, '', true, yes, 01, 2020-01-01, !!str 3, \"4\"]\nyes: {off: ~}\n"
    assert load_strict_yaml(text) == {"a": [1, -2, 1.5, float("inf"), None, "", True, "yes", "01", "2020-01-01",
                                            "3", "4"], "yes": {"off": None}}
    for bad, message in [("a: &x 1\nb: *x\n", r"aliases \(\*x\)"), ("a: 1\na: 2\n", "duplicate key 'a'"),
                         ("? [1]\n: 2\n", "mapping key must be plain text"), ("a: 1\n---\nb: 2\n", "single document"),
                         ("a: " + "[" * 101 + "]" * 101 + "\n", "nested more than 100 levels"),
                         ("a: " + "7" * 5000 + "\n", "an integer of 5000 digits")]:
        with pytest.raises(StrictYamlError, match=message):
            load_strict_yaml(bad)


def test_a_10000_study_catalog_loads_in_under_5_seconds(tmp_path):
    """The scale goal of bench/catalog_scale.py; it took 29-46 s through SafeLoader's composer."""
    import json
    import time

    raw = minimal_catalog()
    study = raw["studies"][0]
    raw["studies"] = [{**copy.deepcopy(study), "accession": f"GSE{100_000 + index}", "files": [
        {"name": f["name"], "url": f["url"].replace("GSE98969", f"GSE{100_000 + index}"), "role": f["role"]}
        for f in study["files"]]} for index in range(10_000)]
    path = tmp_path / "scale.yaml"
    # JSON (YAML in flow style) because yaml.safe_dump of 10,000 studies takes longer than the load.
    path.write_text(json.dumps(raw, indent=1))
    started = time.process_time()  # CPU time: other processes on a shared machine do not count against it
    catalog = load_catalog(path, variables={"SCGRN_HOME": str(tmp_path)})
    seconds = time.process_time() - started
    assert len(catalog.studies) == 10_000 and catalog.studies[-1].accession == "GSE109999"
    assert seconds < 5, f"{seconds:.1f} s"
