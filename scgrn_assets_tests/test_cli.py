"""The `scgrn` command as a user runs it: a real process, a real SCGRN_HOME, a user's own catalog."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scgrn_assets.lib.catalog import builtin_catalog_path


def run_scgrn(*args: str, home: Path, catalog: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCGRN_HOME": str(home), "TQDM_DISABLE": "1"}
    env.pop("DAGSTER_HOME", None)
    if catalog:
        env["SCGRN_CATALOG"] = catalog
    result = subprocess.run([sys.executable, "-m", "scgrn_assets.cli", *args], env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"scgrn {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.slow
def test_demo_on_a_users_two_study_catalog_then_status_and_sql(demo_files, tmp_path):
    home = tmp_path / "home"
    raw = yaml.safe_load(builtin_catalog_path("demo").read_text())
    raw["name"] = "mine"
    raw["studies"] = [s for s in raw["studies"] if s["accession"] in ("GSE900001", "GSE900004")]
    catalog = tmp_path / "mine.yaml"
    catalog.write_text(yaml.safe_dump(raw))
    shutil.copytree(demo_files.home / "demo_geo", home / "demo_geo")

    result = run_scgrn("demo", "--quick", home=home, catalog=str(catalog))
    assert f"SCGRN_HOME: {home}" in result.stdout
    assert "scgrn ui" in result.stdout
    assert (home / "scgrn.duckdb").exists()
    assert (home / "dagster" / "dagster.yaml").exists()

    status = run_scgrn("status", home=home, catalog=str(catalog)).stdout
    assert "study_anndata          2/2 partitions  GSE900001, GSE900004" in status
    assert "combined_corpus        materialised" in status

    sql = run_scgrn("sql", "SELECT study, sum(n_cells) AS n FROM corpus_studies WHERE study = ? GROUP BY study",
                    "--param", "GSE900004", home=home, catalog=str(catalog)).stdout
    assert "GSE900004" in sql and "GSE900001" not in sql
    edges = run_scgrn("edges", "SELECT count(*) AS n FROM edges WHERE n_cells >= ?", "--param", "1",
                      home=home, catalog=str(catalog)).stdout
    assert int(edges.split()[-1]) > 0
    # A value that looks like SQL is only ever a value.
    injected = run_scgrn("sql", "SELECT count(*) AS n FROM corpus_studies WHERE study = ?", "--param",
                         "x' OR '1'='1", home=home).stdout
    assert injected.split()[-1] == "0"


def test_sql_without_a_database_says_what_to_run(tmp_path):
    result = run_scgrn("sql", "SELECT 1", home=tmp_path, check=False)
    assert result.returncode == 2
    assert "scgrn demo" in result.stderr


def test_status_on_a_fresh_home_shows_nothing_materialised(demo_files, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(demo_files.home / "demo_geo", home / "demo_geo")
    result = run_scgrn("status", home=home)
    assert "geo_raw_archive        0/4 partitions" in result.stdout
