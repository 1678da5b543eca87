"""The Dagster graph on real files: `materialize` over a real (temporary) instance."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pytest
import yaml

from scgrn_assets.definitions import build_definitions
from scgrn_assets.lib.ingest.catalog import builtin_catalog_path
from scgrn_assets.lib.corpus.build import read_corpus
from scgrn_assets_tests.support.archives import tar_bytes

def materialise(home: Path, catalog: str, instance, *, partition: str | None = None, selection=None):
    built = build_definitions(catalog, home=home, quick=True)
    return dg.materialize([*built.assets, *built.asset_checks],
                          selection=selection or dg.AssetSelection.groups("ingest"),
                          partition_key=partition, instance=instance, resources=dict(built.resources),
                          raise_on_error=False)


def test_packaged_demo_catalog_pins_the_simulators_output(demo_files):
    """The simulator is deterministic and the packaged catalog's sha256 values are its output."""
    packaged = yaml.safe_load(builtin_catalog_path("demo").read_text())
    pinned = {f["name"]: f["sha256"] for s in packaged["studies"] for f in s["files"]}
    pinned[packaged["gene_annotation"]["name"]] = packaged["gene_annotation"]["sha256"]
    written = {w.name: w.sha256 for w in demo_files.written if w.name in pinned}
    assert written == pinned, "regenerate: scgrn simulate --write-catalog scgrn_assets/catalogs/demo.yaml"


@pytest.mark.slow
def test_demo_graph_materialises_with_passing_checks(demo_files, scgrn_home):
    from scgrn_assets.cli import materialisation_plan

    shutil.copytree(demo_files.home / "demo_geo", scgrn_home / "demo_geo")
    instance = dg.DagsterInstance.ephemeral()
    evaluations = []
    assets = list(build_definitions("demo", home=scgrn_home).assets)
    for group, partitioned in materialisation_plan(assets):
        for partition in (demo_files.catalog().accessions if partitioned else [None]):
            result = materialise(scgrn_home, "demo", instance, partition=partition,
                                 selection=dg.AssetSelection.assets(*group))
            assert result.success, [k.to_user_string() for a in group for k in a.keys]
            evaluations += result.get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} >= {"counts_are_non_negative_integers",
                                                   "genes_are_the_union_of_studies", "every_cell_has_a_study"}
    assert all(e.passed for e in evaluations), [e.check_name for e in evaluations if not e.passed]
    materialised = {key.to_user_string() for a in assets for key in a.keys
                    if instance.get_latest_materialization_event(key) is not None}
    assert materialised == {key.to_user_string() for a in assets for key in a.keys}

    corpus = read_corpus(scgrn_home / "assets" / "combined_corpus" / "combined_corpus.zarr")
    truth = demo_files.truth
    assert set(corpus.obs["study"].unique()) == set(demo_files.catalog().accessions)
    assert set(corpus.var_names) <= set(truth.genes["gene_symbol"])
    assert corpus.var["gene_length_bp"].notna().all()
    lengths = truth.genes.set_index("gene_symbol").loc[corpus.var_names, "gene_length_bp"].to_numpy()
    np.testing.assert_array_equal(corpus.var["gene_length_bp"].to_numpy(), lengths)
    assert corpus.obs.loc[corpus.obs["study"] == "GSE900003", "condition"].isna().all()
    assert corpus.obs.loc[corpus.obs["study"] != "GSE900003", "condition"].notna().all()
    with duckdb.connect(str(scgrn_home / "scgrn.duckdb"), read_only=True) as connection:
        n_cells = connection.execute("SELECT sum(n_cells) FROM corpus_studies").fetchone()[0]
    assert n_cells == corpus.n_obs


def _one_study_catalog(demo_files, home: Path, accession: str, counts_bytes: bytes | None = None,
                       sha256: str | None = None) -> Path:
    """A user catalog with one demo study whose count file may be replaced (e.g. by a corrupt one)."""
    raw = yaml.safe_load(builtin_catalog_path("demo").read_text())
    raw["studies"] = [s for s in raw["studies"] if s["accession"] == accession]
    study_dir = home / "demo_geo" / accession
    shutil.copytree(demo_files.study_dir(accession), study_dir)
    counts = raw["studies"][0]["files"][0]
    if counts_bytes is not None:
        (study_dir / counts["name"]).write_bytes(counts_bytes)
        counts["sha256"] = hashlib.sha256(counts_bytes).hexdigest()
    if sha256 is not None:
        counts["sha256"] = sha256
    path = home / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _failure_message(result) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "the run should have failed"
    error = failures[0].step_failure_data.error
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def test_checksum_mismatch_fails_the_download_and_leaves_no_file(demo_files, scgrn_home):
    catalog = _one_study_catalog(demo_files, scgrn_home, "GSE900001", sha256="0" * 64)
    result = materialise(scgrn_home, str(catalog), dg.DagsterInstance.ephemeral(), partition="GSE900001")
    assert not result.success
    message = _failure_message(result)
    assert "GSE900001" in message and "sha256 mismatch" in message and "GSE900001_RAW.tar" in message
    raw_dir = scgrn_home / "assets" / "geo_raw_archive" / "GSE900001"
    assert not (raw_dir / "GSE900001_RAW.tar").exists()
    assert not any(p.name.endswith(".part") for p in raw_dir.glob("*"))


@pytest.mark.parametrize("case, members, expected", [
    ("truncated gzip", {"GSM9000011_AD_rep1.txt.gz": gzip.compress(b"\tc1\nApoe\t1\n" * 200)[:-40]},
     "truncated or corrupt"),
    ("path traversal", {"../x.txt.gz": b"x"}, ".."),
    ("absolute path", {"/etc/GSM1_a.txt.gz": b"x"}, "absolute"),
    ("malformed row", {"GSM9000011_AD_rep1.txt.gz": gzip.compress(b"\tc1\tc2\nApoe\t1\t2\nCd74\t1\n")},
     "line 3 has 2 fields"),
])
def test_bad_archives_fail_with_a_clear_error_and_no_study_file(demo_files, scgrn_home, case, members, expected):
    catalog = _one_study_catalog(demo_files, scgrn_home, "GSE900001", counts_bytes=tar_bytes(members))
    result = materialise(scgrn_home, str(catalog), dg.DagsterInstance.ephemeral(), partition="GSE900001")
    assert not result.success
    message = _failure_message(result)
    assert "GSE900001" in message and expected in message
    study_dir = scgrn_home / "assets" / "study_anndata" / "GSE900001"
    assert not study_dir.exists() or not any(study_dir.iterdir())


def test_symlink_member_is_refused(demo_files, scgrn_home):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("GSM9000011_AD_rep1.txt.gz")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    catalog = _one_study_catalog(demo_files, scgrn_home, "GSE900001", counts_bytes=buffer.getvalue())
    result = materialise(scgrn_home, str(catalog), dg.DagsterInstance.ephemeral(), partition="GSE900001")
    assert not result.success
    assert "link" in _failure_message(result)
    assert not (scgrn_home / "assets" / "study_anndata" / "GSE900001" / "GSE900001.h5ad").exists()
