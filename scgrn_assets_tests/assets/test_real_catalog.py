"""The real GEO catalog end to end, on miniature copies of its files served over HTTP with the host swapped.

The catalog is ``scgrn_assets/catalogs/real.yaml`` byte for byte (copied beside a temporary
lock file so the tests never pin into the package); only ``SCGRN_URL_MIRROR`` differs from a
run against GEO.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import anndata as ad
import pytest

from scgrn_assets.lib.ingest.catalog import builtin_catalog_path, load_catalog
from scgrn_assets.lib.ingest.checksum_lock import ChecksumLock
from scgrn_assets.lib.corpus.build import read_corpus
from scgrn_assets_tests.support.archives import tar_bytes
from scgrn_assets_tests.assets.materialise_catalog import materialise_catalog
from scgrn_assets_tests.support.real_geo_miniature import (BAD_MARS_SEQ_SAMPLE, mirror_rules, serve_miniature_geo,
                                                   write_miniature_geo)


def _materialise(home: Path, catalog: Path, mirror: str, *, partitions: list[str] | None = None,
                 corpus: bool = True) -> dict:
    """The catalog's ingest runs (and corpus), in this process, with downloads through ``mirror``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SCGRN_URL_MIRROR", mirror)
        runs = materialise_catalog(home, catalog, partitions=partitions, corpus=corpus)
    return json.loads(json.dumps(runs, default=str))  # plain values, as a report would hold them


@pytest.fixture
def real_catalog_copy(tmp_path) -> Path:
    path = tmp_path / "catalogs" / "real.yaml"
    path.parent.mkdir()
    path.write_bytes(builtin_catalog_path("real").read_bytes())
    return path


@pytest.mark.slow
def test_real_catalog_ingests_all_seven_studies_from_miniature_geo(http_server, tmp_path, real_catalog_copy):
    catalog = load_catalog(real_catalog_copy)
    miniature = write_miniature_geo(catalog)
    serve_miniature_geo(http_server, miniature)
    mirror = mirror_rules(http_server.base_url, catalog)
    home = tmp_path / "home"
    runs = _materialise(home, real_catalog_copy, mirror)

    assert all(run["success"] for run in runs.values()), {k: r["failures"][:2] for k, r in runs.items()}
    # GSE123030 (the SuperSeries) re-reads GSE123025's table, so the corpus holds those cells twice:
    # the non-blocking repeated-cells check is the one that must say so; every other check passes.
    failed = {check["check"] for run in runs.values() for check in run["checks"] if not check["passed"]}
    assert failed == {"cells_are_not_repeated_across_studies"}
    assert {check["check"] for check in runs["corpus"]["checks"]} >= {"genes_are_the_union_of_studies"}

    # Every catalog URL was fetched through the mirror and pinned beside the catalog, keyed by its GEO URL.
    pins = ChecksumLock(catalog.lock_path).pins()
    assert catalog.lock_path == real_catalog_copy.with_name("real.lock.yaml")
    assert {url: pin.sha256 for url, pin in pins.items()} == {
        url: hashlib.sha256(content).hexdigest() for url, content in miniature.files.items()}

    for accession, expected in miniature.studies.items():
        adata = ad.read_h5ad(home / "assets" / "study_anndata" / accession / f"{accession}.h5ad", backed="r")
        assert set(adata.var_names) == expected.genes, accession
        assert adata.n_obs == expected.n_cells, accession
        assert Counter(adata.obs["condition"].astype(object).fillna("NA")) == expected.conditions, accession
        metadata = runs[accession]["materialised"]["study_anndata"]
        assert metadata["n_genes"] == len(expected.genes) and metadata["n_cells"] == expected.n_cells
        assert metadata["n_cells_without_metadata"] == expected.n_cells_without_metadata
        skipped = metadata["skipped_samples"]
        assert (BAD_MARS_SEQ_SAMPLE in skipped) == bool(expected.skipped_samples), accession
        adata.file.close()
    assert runs["GSE98969"]["materialised"]["study_anndata"]["n_spike_ins_dropped"] == 2

    corpus = read_corpus(home / "assets" / "combined_corpus" / "combined_corpus.zarr")
    assert set(corpus.var_names) | set(corpus.uns["qc"]["genes_removed"]) == miniature.union
    assert len(miniature.union) == 54  # the README's union size for the miniature run
    for accession, expected in miniature.studies.items():
        cells = corpus.obs[corpus.obs["study"] == accession]
        assert Counter(cells["condition"].astype(object).fillna("NA")) == expected.conditions, accession
        measured = set(corpus.var_names[corpus.var[f"measured_in_{accession}"].to_numpy()])
        assert measured == expected.genes & set(corpus.var_names), accession


@pytest.mark.slow
def test_real_catalog_refuses_a_file_changed_after_its_pin(http_server, tmp_path, real_catalog_copy):
    catalog = load_catalog(real_catalog_copy)
    miniature = write_miniature_geo(catalog)
    serve_miniature_geo(http_server, miniature)
    mirror = mirror_rules(http_server.base_url, catalog)
    home = tmp_path / "home"
    first = _materialise(home, real_catalog_copy, mirror, partitions=["GSE121654"], corpus=False)
    assert first["GSE121654"]["success"], first["GSE121654"]["failures"][:2]
    pinned = catalog.lock_path.read_text()

    # The server's RAW tar changes (a count rewritten); the local copy is gone, so it is fetched again.
    raw_url = catalog.study("GSE121654").files_with_role("counts")[0].url
    archive = tarfile.open(fileobj=io.BytesIO(miniature.files[raw_url]))
    members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    name = next(iter(members))
    text = gzip.decompress(members[name])
    members[name] = gzip.compress(text[:-2] + (b"7" if text[-2:-1] != b"7" else b"8") + b"\n", mtime=0)
    miniature.files[raw_url] = tar_bytes(members)
    serve_miniature_geo(http_server, miniature)
    raw_file = home / "assets" / "geo_raw_archive" / "GSE121654" / "GSE121654_RAW.tar"
    raw_file.unlink()
    second = _materialise(home, real_catalog_copy, mirror, partitions=["GSE121654"], corpus=False)
    run = second["GSE121654"]
    assert not run["success"]
    message = "\n".join(run["failures"])
    assert "GSE121654" in message and "GSE121654_RAW.tar" in message and "sha256 mismatch" in message
    assert "real.lock.yaml" in message and "delete the entry" in message
    assert not raw_file.exists() and not raw_file.with_name(raw_file.name + ".part").exists()
    assert catalog.lock_path.read_text() == pinned


@pytest.mark.slow
def test_real_catalog_runs_through_the_condition_effects_with_scgrn_materialize(http_server, tmp_path,
                                                                                real_catalog_copy):
    """The shipped real.yaml has no gene annotation: the command a user runs must still reach the answer."""
    import yaml

    full = load_catalog(real_catalog_copy)
    serve_miniature_geo(http_server, write_miniature_geo(full))
    mirror = mirror_rules(http_server.base_url, full)
    # As the README advises, a copy without the two SuperSeries (their cells repeat their subseries'), and
    # with no QC: any QC would empty a corpus of miniature cells (the thresholds are not under test here).
    raw = yaml.safe_load(real_catalog_copy.read_text())
    raw["studies"] = [s for s in raw["studies"] if s["accession"] not in ("GSE98971", "GSE123030")]
    raw["qc"] = {"min_counts_per_cell": 1, "min_genes_per_cell": 1, "min_cells_per_gene": 1}
    real_catalog_copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    home = tmp_path / "home"
    env = {**os.environ, "SCGRN_HOME": str(home), "SCGRN_CATALOG": str(real_catalog_copy),
           "SCGRN_URL_MIRROR": mirror, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-m", "scgrn_assets.cli", "materialize", "--quick", "--select",
                                "group:ingest or group:corpus or group:condition_effects"], env=env, capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    import pandas as pd

    effects = pd.read_parquet(home / "assets" / "condition_effects" / "condition_effects.parquet")
    assert len(effects) > 0 and effects["log2fc_sd"].gt(0).all()
    # GSE98969 holds 2 AD and 2 control mice: the one contrast study.
    assert set(effects["n_samples_case"]) == {2} and set(effects["n_samples_control"]) == {2}
