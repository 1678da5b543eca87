"""Concurrency: parallel runs over one SCGRN_HOME lose nothing and show users no lock error.

* Several study partitions materialised at once, each in its own process, over one Dagster
  instance, as a multiprocess executor or several `scgrn` invocations would.
* DuckDB: writers in several processes go through ``sql_store`` (serialised by its lock
  file), readers query read-only at the same time, and ``scgrn sql`` waits out a writer (ours
  or a foreign program holding DuckDB's own lock) instead of failing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

from scgrn_assets.lib.sql_store import list_tables, query, register_view, write_parquet
from scgrn_assets_tests.reliability import ledger, scenarios

LOCK_WORDS = ("lock", "Conflicting", "database is locked")


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def _finish(process: subprocess.Popen, timeout_seconds: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout_seconds)
    assert process.returncode == 0, output
    return output


# --- DuckDB: serialised writers, read-only readers -------------------------------------------------

WRITER = """
    import sys
    from pathlib import Path
    import pandas as pd
    from scgrn_assets.lib.sql_store import register_view, write_parquet

    home, writer, n_views = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for view in range(n_views):
        table = pd.DataFrame({"writer": [writer] * 50, "view": [view] * 50, "value": range(50)})
        parquet = write_parquet(table, home / "tables" / f"w{writer}_v{view}.parquet")
        register_view(home / "scgrn.duckdb", f"w{writer}_v{view}", parquet)
        # Every writer also replaces one shared view: the last write must win whole.
        register_view(home / "scgrn.duckdb", "shared", parquet)
    print("done", flush=True)
"""

READER = """
    import sys, time
    from pathlib import Path
    from scgrn_assets.lib.errors import ScgrnInputError
    from scgrn_assets.lib.sql_store import query

    home, seconds = Path(sys.argv[1]), float(sys.argv[2])
    deadline, n_queries = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        try:
            rows = query(home / "scgrn.duckdb", "SELECT count(*) AS n, count(DISTINCT writer) AS w FROM shared")
        except ScgrnInputError as error:
            if "shared" not in str(error):  # before the first write the view is simply not there yet
                raise
            continue
        # A view always shows one whole table: 50 rows of one writer, never a mixture.
        assert rows["n"].iloc[0] == 50 and rows["w"].iloc[0] == 1, rows
        n_queries += 1
    print("queries", n_queries, flush=True)
"""


def test_parallel_writers_and_readers_lose_nothing_and_see_no_lock_error(tmp_path):
    n_writers, n_views = 2, 4
    register_view(tmp_path / "scgrn.duckdb", "seed", write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "seed.parquet"))
    readers = [_python(READER, str(tmp_path), "4")]
    writers = [_python(WRITER, str(tmp_path), str(writer), str(n_views)) for writer in range(n_writers)]
    outputs = [_finish(process) for process in writers + readers]
    ledger.record("fault", n_writers + len(readers))
    assert not any(word in output for output in outputs for word in LOCK_WORDS), outputs
    assert sum(int(output.split()[-1]) for output in outputs[n_writers:]) > 0, "the readers never got to read"
    # Nothing lost: every view every writer registered is there, over its own table.
    tables = set(list_tables(tmp_path / "scgrn.duckdb"))
    expected = {f"w{w}_v{v}" for w in range(n_writers) for v in range(n_views)}
    assert expected | {"shared", "seed"} == tables
    for name in expected:
        writer, view = (int(part[1:]) for part in name.split("_"))
        rows = query(tmp_path / "scgrn.duckdb", f"SELECT writer, view, sum(value) AS total FROM {name} "
                                                "GROUP BY writer, view")
        assert rows.to_dict("records") == [{"writer": writer, "view": view, "total": sum(range(50))}]


HOLD_DUCKDB = """
    import sys, time
    import duckdb
    from pathlib import Path
    from scgrn_assets.lib import sql_store
    from scgrn_assets.lib.storage import held_file_lock

    db, seconds, cooperative = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "ours"
    if cooperative:  # a writer of this package: its lock file, then DuckDB's own write lock
        with held_file_lock(sql_store.database_lock_path(db)), duckdb.connect(str(db)) as connection:
            print("holding", flush=True)
            time.sleep(seconds)
            connection.execute("CREATE OR REPLACE VIEW late AS SELECT 42 AS answer")
    else:  # a foreign program (e.g. a duckdb shell) holding the database open for writing
        with duckdb.connect(str(db)) as connection:
            print("holding", flush=True)
            time.sleep(seconds)
    print("released", time.time(), flush=True)
"""


@pytest.mark.parametrize("holder", ["ours", pytest.param("foreign", marks=pytest.mark.slow)])
def test_scgrn_sql_waits_out_a_writer_instead_of_failing(tmp_path, holder):
    db = tmp_path / "scgrn.duckdb"
    register_view(db, "corpus_studies", write_parquet(pd.DataFrame({"study": ["GSE1"], "n_cells": [7]}),
                                                      tmp_path / "corpus_studies.parquet"))
    writer = _python(HOLD_DUCKDB, str(db), "3", holder)
    assert writer.stdout.readline().strip() == "holding"
    result = subprocess.run([sys.executable, "-m", "scgrn_assets.cli", "sql", "SELECT n_cells FROM corpus_studies"],
                            env={**os.environ, "SCGRN_HOME": str(tmp_path)}, capture_output=True, text=True,
                            timeout=300)
    finished_at = time.time()
    released_at = float(_finish(writer).split()[-1])
    ledger.record("fault")
    assert result.returncode == 0, result.stderr
    assert not any(word in result.stderr for word in LOCK_WORDS), result.stderr
    assert result.stdout.split()[-1] == "7"
    if holder == "ours":  # the reader ran after the write, so it saw the writer's work
        assert query(db, "SELECT answer FROM late")["answer"].tolist() == [42]
    assert finished_at >= released_at  # started while the writer held the database, so it waited


# --- several study partitions materialised in parallel processes ------------------------------------

MATERIALISE_PARTITION = """
    import sys
    from pathlib import Path
    import dagster as dg
    from scgrn_assets import cli, definitions
    from scgrn_assets.lib.storage import StorageLayout

    home, accession = Path(sys.argv[1]), sys.argv[2]
    layout = StorageLayout(home)
    instance = cli._prepare_instance(layout)  # the instance the CLI uses: SCGRN_HOME/dagster
    resources = definitions.build_resources(home=str(home))
    built = definitions.build_definitions(definitions.catalog_name(), home=str(home))
    result = dg.materialize([*built.assets, *built.asset_checks],
                            selection=dg.AssetSelection.groups("ingest"), partition_key=accession,
                            instance=instance, resources=resources, raise_on_error=False)
    cli._raise_on_failure(result, f"study {accession}")
    print("materialised", accession, flush=True)
"""


@pytest.mark.slow
def test_study_partitions_materialised_in_parallel_processes(demo_files, tmp_path):
    from scgrn_assets.lib.ingest.study_anndata import build_study_anndata

    home = tmp_path / "home"
    catalog_path = scenarios.prepare_home(home, demo_files.home / "demo_geo", demo_files.catalog_path)
    accessions = demo_files.catalog().accessions
    env = {"SCGRN_HOME": str(home), "SCGRN_CATALOG": str(catalog_path), "TQDM_DISABLE": "1"}
    # The instance is created once first, as `scgrn demo` would before a parallel backfill.
    _finish(_python("from pathlib import Path; from scgrn_assets import cli; from scgrn_assets.lib.storage "
                    "import StorageLayout; cli._prepare_instance(StorageLayout(Path(r'%s')))" % home, env=env))
    processes = [_python(MATERIALISE_PARTITION, str(home), accession, env=env) for accession in accessions]
    outputs = [_finish(process, timeout_seconds=600) for process in processes]
    ledger.record("fault", len(processes))
    assert not any(word in output for output in outputs for word in LOCK_WORDS), outputs

    import anndata as ad
    import dagster as dg

    catalog = demo_files.catalog()
    for accession in accessions:
        written = ad.read_h5ad(home / "assets" / "study_anndata" / accession / f"{accession}.h5ad")
        expected = build_study_anndata(catalog.study(accession), demo_files.study_dir(accession),
                                       condition_levels=catalog.condition_levels)
        np.testing.assert_array_equal(written.X.toarray(), expected.X.toarray())
        pd.testing.assert_frame_equal(written.obs, expected.obs, check_categorical=False)
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    materialised = instance.get_materialized_partitions(dg.AssetKey("study_anndata"))
    assert materialised == set(accessions), "the instance lost a parallel run's materialisation"


# --- the Dagster instance: first use by several processes at once ----------------------------------

FIRST_USE = """
    import sys, time
    from pathlib import Path
    import dagster  # imported before the start line, so every process reaches the instance together
    from scgrn_assets.cli import _prepare_instance
    from scgrn_assets.lib.storage import StorageLayout

    home, start = Path(sys.argv[1]), Path(sys.argv[2])
    while not start.exists():
        time.sleep(0.005)
    instance = _prepare_instance(StorageLayout(home))
    print("runs", len(instance.get_runs()), flush=True)
"""


@pytest.mark.slow
def test_parallel_first_runs_on_a_fresh_home_initialise_the_instance_once(tmp_path):
    """Two `scgrn demo` on a fresh SCGRN_HOME used to race in Dagster's SQLite schema creation."""
    for attempt in range(2):
        home, start = tmp_path / f"home{attempt}", tmp_path / f"start{attempt}"
        processes = [_python(FIRST_USE, str(home), str(start)) for _ in range(4)]
        ledger.record("fault", len(processes) - 1)
        time.sleep(8)  # every process has imported dagster and waits on the start line
        start.touch()
        for process in processes:
            assert _finish(process, 120).strip().endswith("runs 0")


# --- bounded waits: a runaway reader cannot stall writers, and a stalled writer names who holds it ----

RUNAWAY = "SELECT count(*) AS n FROM range(1000000) a, range(1000000) b WHERE a.range + b.range = 7"


def _wait_for_holder(lock_path, process: subprocess.Popen, seconds: float = 60) -> list[str]:
    from scgrn_assets.lib.storage import lock_holders

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        holders = [line for line in lock_holders(lock_path) if f"pid {process.pid} " in line]
        if holders:
            return holders
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"process {process.pid} never took {lock_path}")


def test_runaway_scgrn_sql_stops_at_its_timeout_and_a_writer_waiting_on_it_names_it(tmp_path, monkeypatch, caplog):
    from scgrn_assets.lib import storage
    from scgrn_assets.lib.errors import ScgrnInputError
    from scgrn_assets.lib.sql_store import database_lock_path

    db = tmp_path / "scgrn.duckdb"
    register_view(db, "corpus_studies", write_parquet(pd.DataFrame({"study": ["GSE1"], "n_cells": [7]}),
                                                      tmp_path / "corpus_studies.parquet"))
    runaway = subprocess.Popen([sys.executable, "-m", "scgrn_assets.cli", "sql", RUNAWAY, "--timeout", "8"],
                               env={**os.environ, "SCGRN_HOME": str(tmp_path)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        holders = _wait_for_holder(database_lock_path(db), runaway)
        assert "shared" in holders[0] and "sql" in holders[0] and "range(1000000)" in holders[0], holders
        # A writer gives up after SCGRN_LOCK_WAIT_S, saying who holds the lock and what to do,
        # and says so in the log while it waits.
        monkeypatch.setenv("SCGRN_LOCK_WAIT_S", "1.5")
        monkeypatch.setattr(storage, "LOCK_WAIT_REPORT_EVERY_S", 0.5)
        table = write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "late.parquet")
        started = time.monotonic()
        with caplog.at_level("WARNING", logger=storage.__name__), pytest.raises(ScgrnInputError) as refused:
            register_view(db, "late", table)
        assert time.monotonic() - started < 10
        message = str(refused.value)
        assert f"pid {runaway.pid} " in message and "scgrn_assets.cli sql" in message, message
        assert "gave up waiting 1.5 s to write" in message and "kill" in message and "SCGRN_LOCK_WAIT_S" in message
        waiting = [record.getMessage() for record in caplog.records if "waiting" in record.getMessage()]
        assert len(waiting) >= 2 and all(f"pid {runaway.pid} " in line for line in waiting), waiting
        # The runaway query ends at its own timeout, with a message, and releases the lock.
        _, err = runaway.communicate(timeout=120)
        assert runaway.returncode == 2 and "stopped after 8 s" in err and "raise --timeout" in err, err
    finally:
        if runaway.poll() is None:
            runaway.kill()
            runaway.wait()
    ledger.record("fault", 2)
    monkeypatch.setenv("SCGRN_LOCK_WAIT_S", "60")
    register_view(db, "late", table)  # the writer now gets through
    assert query(db, "SELECT x FROM late")["x"].tolist() == [1]
    assert storage.lock_holders(database_lock_path(db)) == []  # every record left with its holder


def test_a_waiting_writer_goes_before_readers_that_come_after_it(tmp_path):
    """A stream of overlapping readers must not starve a writer: readers arriving after it wait their turn."""
    import threading

    from scgrn_assets.lib.storage import held_file_lock

    lock, order = tmp_path / "db.lock", []
    first_reader_in, release_first_reader = threading.Event(), threading.Event()

    def hold(name: str, exclusive: bool, until: threading.Event | None = None, entered=None) -> None:
        with held_file_lock(lock, exclusive=exclusive, wait_s=30):
            order.append(name)
            if entered is not None:
                entered.set()
            if until is not None:
                until.wait(30)

    threads = [threading.Thread(target=hold, args=("reader 1", False, release_first_reader, first_reader_in))]
    threads[0].start()
    assert first_reader_in.wait(30)
    threads.append(threading.Thread(target=hold, args=("writer", True)))
    threads[1].start()
    time.sleep(0.5)  # the writer is waiting for reader 1
    threads.append(threading.Thread(target=hold, args=("reader 2", False)))
    threads[2].start()
    time.sleep(0.5)  # reader 2 could share with reader 1 at once, but the writer came first
    assert order == ["reader 1"]
    release_first_reader.set()
    for thread in threads:
        thread.join(30)
    ledger.record("fault")
    assert order == ["reader 1", "writer", "reader 2"]


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_lock_wait_setting_must_be_seconds(tmp_path, monkeypatch, value):
    from scgrn_assets.lib.errors import ScgrnInputError

    ledger.record("bad_input")
    monkeypatch.setenv("SCGRN_LOCK_WAIT_S", value)
    with pytest.raises(ScgrnInputError, match="SCGRN_LOCK_WAIT_S=.* is not a number of seconds"):
        register_view(tmp_path / "scgrn.duckdb", "t", write_parquet(pd.DataFrame({"x": [1]}), tmp_path / "t.parquet"))
