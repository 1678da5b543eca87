"""The `scgrn` command as a user runs it: a real process, a real SCGRN_HOME, a user's own catalog."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from scgrn_assets.lib.ingest.catalog import builtin_catalog_path


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
    # The condition-effect tables, with the columns the README promises (GSE900001 and GSE900004 both hold
    # AD and control animals, so both are contrast studies).
    described = run_scgrn("sql", "DESCRIBE condition_effects", home=home).stdout
    for column in ("gene", "base_mean", "log2fc_mean", "log2fc_sd", "log2fc_q05", "log2fc_q95", "lfsr", "svalue",
                   "called", "n_samples_control", "n_samples_case", "n_cells"):
        assert f" {column} " in f" {described} ".replace("\n", " "), column
    per_study = run_scgrn("sql", "SELECT DISTINCT study FROM condition_effects_by_study ORDER BY study", home=home)
    assert "GSE900001" in per_study.stdout and "GSE900004" in per_study.stdout
    peer = run_scgrn("sql", "SELECT count(*) AS n FROM condition_effects_pydeseq2 WHERE padj IS NOT NULL",
                     home=home).stdout
    assert int(peer.split()[-1]) > 0
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


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_ui_as_printed_without_an_activated_venv_serves_and_stops_everything(tmp_path, stop_signal):
    import signal
    import socket
    import time
    import urllib.request

    scgrn = Path(sys.executable).parent / "scgrn"
    if not scgrn.exists():
        pytest.skip(f"{scgrn} is not installed (the README's `.venv/bin/scgrn`)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "SCGRN_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"}
    env.pop("DAGSTER_HOME", None)
    env.pop("VIRTUAL_ENV", None)
    ui = subprocess.Popen([str(scgrn), "ui", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    started = set()
    try:
        deadline = time.monotonic() + 240
        while True:
            assert ui.poll() is None, f"scgrn ui exited with {ui.returncode}:\n{ui.stdout.read()}"
            started |= descendants(ui.pid)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the UI never answered"
            time.sleep(1)
        started |= descendants(ui.pid)
        assert len(started) >= 3  # dagster dev, its webserver and daemon (and code servers)
        ui.send_signal(getattr(signal, stop_signal))
        ui.wait(timeout=90)
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [pid for pid in started if alive(pid)] == []
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
    finally:
        for pid in started | {ui.pid}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        ui.wait()
    assert "FileNotFoundError" not in ui.stdout.read()


def write_tiny_catalog(tmp_path: Path, bodies: dict[str, bytes]) -> tuple[Path, Path]:
    """A catalog of one-sample dense studies (accession -> the sample's text) under a fresh home."""
    import gzip

    from scgrn_assets_tests.support.archives import write_tar

    home = tmp_path / "home"
    studies = []
    for accession, body in bodies.items():
        folder = home / "demo_geo" / accession
        folder.mkdir(parents=True)
        write_tar(folder / f"{accession}_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(body)})
        (folder / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\n")
        studies.append({"accession": accession, "title": "t", "species": "mouse", "format": "raw_tar_dense_tsv",
                        "gene_id_type": "symbol", "metadata": {"file": "meta.csv"},
                        "condition": {"column": "strain", "values": {"5XFAD": "AD"}},
                        "files": [{"name": f"{accession}_RAW.tar",
                                   "url": f"file://${{SCGRN_HOME}}/demo_geo/{accession}/{accession}_RAW.tar"},
                                  {"name": "meta.csv", "url": f"file://${{SCGRN_HOME}}/demo_geo/{accession}/meta.csv",
                                   "role": "metadata"}]})
    catalog = tmp_path / "tiny.yaml"
    catalog.write_text(yaml.safe_dump({"name": "tiny", "studies": studies}))
    return home, catalog


GOOD_SAMPLE = b"c1\tc2\tc3\nApoe\t1\t0\t3\nCd74\t0\t2\t1\n"
BAD_SAMPLE = b"c1\tc2\nApoe\t1\t0\nCd74\t0\n"


@pytest.mark.slow
def test_every_study_is_tried_and_each_error_shown_once_without_stack_traces(tmp_path):
    home, catalog = write_tiny_catalog(tmp_path, {"GSE1": BAD_SAMPLE, "GSE2": GOOD_SAMPLE, "GSE3": BAD_SAMPLE})
    result = run_scgrn("materialize", "--quick", home=home, catalog=str(catalog), check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "error: 2 run(s) failed:" in result.stderr
    for accession in ("GSE1", "GSE3"):
        assert output.count(f"{accession}: {accession}_RAW.tar:GSM1_a.txt.gz: line 3 has 2 fields") == 1, output
    assert "add exclude_samples: [GSM1] to GSE1's catalog entry, or skip_bad_samples: true" in result.stderr
    assert "Traceback" not in output and "Stack Trace" not in output and "dagster - ERROR" not in output
    assert output.count("warning: gene_annotation: the catalog names no gene_annotation file") == 1
    assert (home / "assets" / "study_anndata" / "GSE2" / "GSE2.h5ad").exists()  # tried although GSE1 failed
    assert not (home / "assets" / "combined_corpus").exists()


@pytest.mark.slow
def test_materialize_select_runs_part_of_the_graph(tmp_path):
    home, catalog = write_tiny_catalog(tmp_path, {"GSE1": GOOD_SAMPLE})
    result = run_scgrn("materialize", "--select", "group:ingest", home=home, catalog=str(catalog))
    assert (home / "assets" / "study_anndata" / "GSE1" / "GSE1.h5ad").exists()
    assert not (home / "assets" / "combined_corpus").exists()
    status = run_scgrn("status", home=home, catalog=str(catalog)).stdout
    assert "study_anndata          1/1 partitions  GSE1" in status and "combined_corpus        not materialised" in status
    bad = run_scgrn("materialize", "--select", "group:no_such_group or (", home=home, catalog=str(catalog), check=False)
    assert bad.returncode == 2 and "is not a Dagster asset selection" in bad.stderr and "ingest" in bad.stderr
    assert "Done." in result.stdout


@pytest.mark.slow
def test_a_second_run_with_nothing_changed_skips_every_asset_and_prints_where_the_time_went(tmp_path):
    home, catalog = write_tiny_catalog(tmp_path, {"GSE1": GOOD_SAMPLE, "GSE2": GOOD_SAMPLE})
    selection = ("--select", "group:ingest")
    first = run_scgrn("materialize", *selection, home=home, catalog=str(catalog))
    log = first.stdout + first.stderr
    # One line per step start and end, with the duration, in a log (no terminal here); the whole log is
    # shown when a line is missing.
    assert "started  study_anndata [GSE2]" in log and "finished study_anndata [GSE2] in " in log, log
    assert "started  geo_raw_archive [" in log and "finished geo_raw_archive [" in log, log
    assert "Wall time per asset" in first.stdout and "study_anndata" in first.stdout.split("Wall time per asset")[1]
    h5ad = home / "assets" / "study_anndata" / "GSE1" / "GSE1.h5ad"
    written = h5ad.stat().st_mtime_ns

    second = run_scgrn("materialize", *selection, home=home, catalog=str(catalog))
    assert "started " not in second.stdout + second.stderr
    summary = second.stdout.split("Wall time per asset")[1]
    assert summary.count("up to date, skipped") == 2, summary  # geo_raw_archive, study_anndata
    assert h5ad.stat().st_mtime_ns == written

    # An output gone from disk is recomputed, and only that one.
    (home / "assets" / "study_anndata" / "GSE2" / "GSE2.h5ad").unlink()
    repaired = run_scgrn("materialize", *selection, home=home, catalog=str(catalog))
    log = repaired.stdout + repaired.stderr
    assert "started  study_anndata [GSE2]" in log and "started  study_anndata [GSE1]" not in log
    assert (home / "assets" / "study_anndata" / "GSE2" / "GSE2.h5ad").exists()

    # A changed catalog is a changed input: everything it feeds runs again. --force runs even what is fresh.
    catalog.write_text(catalog.read_text().replace("title: t", "title: t2", 1))
    third = run_scgrn("materialize", *selection, home=home, catalog=str(catalog))
    assert "started  study_anndata [GSE1]" in third.stdout + third.stderr
    forced = run_scgrn("materialize", *selection, "--force", home=home, catalog=str(catalog))
    assert "started  study_anndata [GSE2]" in forced.stdout + forced.stderr
    assert h5ad.stat().st_mtime_ns > written


def test_every_cli_option_has_help_text():
    from scgrn_assets.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {action.dest}" for name, sub in commands.choices.items() if name != "benchmark"
               for action in sub._actions if not action.help]
    assert missing == []


def test_readme_quick_start_commands_work_as_printed_without_an_activated_venv(tmp_path):
    """The README's `.venv/bin/scgrn ...` lines (all but `ui`, which has its own slow test), with PATH
    lacking the venv and values bound as the user typed them."""
    import re
    import shlex

    from scgrn_assets.lib.sql_store import register_view, write_parquet

    root = Path(__file__).resolve().parents[1]
    if not (root / ".venv" / "bin" / "scgrn").exists():
        pytest.skip(f"{root / '.venv/bin/scgrn'} is absent (make demo creates it)")
    readme = (root / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):readme.index("## What is built so far")]
    commands = [line.split("  #")[0].strip() for line in quick_start.splitlines()
                if line.startswith(".venv/bin/scgrn ") and not line.startswith(".venv/bin/scgrn ui")]
    assert len(commands) == 2, commands
    home = tmp_path / "home"
    table = pd.DataFrame({"study": ["GSE1", "GSE2"], "n_cells": [90, 600]})
    register_view(home / "scgrn.duckdb", "corpus_studies",
                  write_parquet(table, home / "assets" / "combined_corpus" / "corpus_studies.parquet"))
    env = {**os.environ, "SCGRN_HOME": str(home), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"}
    env.pop("DAGSTER_HOME", None)
    outputs = {}
    for command in commands:
        result = subprocess.run(shlex.split(command), cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
        outputs[command.split()[1]] = result.stdout
    assert "study_anndata" in outputs["status"]
    assert re.search(r"GSE2\s+600", outputs["sql"]) and "GSE1" not in outputs["sql"]  # 500 bound as a number


def test_sql_help_names_the_librarys_limits_and_the_lock_wait(tmp_path):
    from scgrn_assets.lib.sql_store import DEFAULT_QUERY_MEMORY_LIMIT, DEFAULT_QUERY_TIMEOUT_S
    from scgrn_assets.lib.storage import DEFAULT_LOCK_WAIT_S, LOCK_WAIT_VARIABLE

    text = " ".join(run_scgrn("sql", "--help", home=tmp_path).stdout.split())
    assert f"--timeout SECONDS stop the query after this many seconds (default {DEFAULT_QUERY_TIMEOUT_S:g};" in text
    assert f"(default {DEFAULT_QUERY_MEMORY_LIMIT})" in text
    assert f"${LOCK_WAIT_VARIABLE} seconds (default {DEFAULT_LOCK_WAIT_S:g})" in text
