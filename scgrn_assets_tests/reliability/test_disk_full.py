"""A full disk: every write is refused up front when the disk lacks a reserve, and a disk that fills
up during a write is a named error with nothing under the final name (not a raw OSError, and not
the SIGSEGV HDF5 and SQLite give on an all-but-full disk).

The disk is a real 16 MiB tmpfs mounted for the test (root only; skipped, saying so, elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets_tests.reliability import ledger

DISK_MIB = 16


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {DISK_MIB} MiB tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _everything_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_write_on_a_disk_without_the_reserve_is_refused_before_it_starts(small_disk, monkeypatch):
    from scgrn_assets.lib.sql_store import write_parquet

    ledger.record("fault")
    monkeypatch.delenv("SCGRN_MIN_FREE_BYTES", raising=False)  # default reserve: 64 MiB > the 16 MiB disk
    with pytest.raises(ScgrnInputError, match=r"writing corpus_studies.parquet needs 64.0 MiB free .* only "
                                              r"1\d.\d MiB is free.*SCGRN_MIN_FREE_BYTES"):
        write_parquet(pd.DataFrame({"study": ["GSE1"]}), small_disk / "assets" / "corpus_studies.parquet")
    assert [p for p in _everything_under(small_disk) if not p.startswith("assets")] == []
    assert not (small_disk / "assets" / "corpus_studies.parquet").exists()


@pytest.mark.parametrize("writer", ["parquet", "hdf5"])
def test_a_disk_that_fills_up_during_a_write_is_a_named_error_leaving_nothing(small_disk, monkeypatch, writer):
    import h5py

    from scgrn_assets.lib.sql_store import write_parquet
    from scgrn_assets.lib.storage import atomic_path

    ledger.record("fault")
    monkeypatch.setenv("SCGRN_MIN_FREE_BYTES", "0")  # let the write start, so that it meets ENOSPC
    values = np.random.default_rng(0).random(3_000_000)  # 24 MB of incompressible doubles > 16 MiB
    final = small_disk / f"table.{writer}"
    with pytest.raises(ScgrnInputError, match=f"ran out of space while writing table.{writer}; nothing was "
                                              "written under the final name"):
        if writer == "parquet":
            write_parquet(pd.DataFrame({"value": values}), final)
        else:
            with atomic_path(final) as tmp, h5py.File(tmp, "w") as handle:
                handle.create_dataset("value", data=values)
    assert _everything_under(small_disk) == []


def test_a_download_larger_than_the_free_space_is_refused_before_any_byte(small_disk, tmp_path, monkeypatch):
    from scgrn_assets.lib.ingest.download import fetch_file

    ledger.record("fault")
    monkeypatch.setenv("SCGRN_MIN_FREE_BYTES", "0")
    source = tmp_path / "GSE1_RAW.tar"
    source.write_bytes(os.urandom(20 << 20))
    with pytest.raises(ScgrnInputError, match=r"downloading GSE1_RAW.tar needs 20.0 MiB free"):
        fetch_file(source.as_uri(), small_disk / "GSE1_RAW.tar", sha256=None, study="GSE1")
    assert _everything_under(small_disk) == []


def test_a_cli_command_on_a_disk_without_the_reserve_stops_before_the_instance_is_touched(small_disk):
    import sys

    ledger.record("fault")
    env = {**os.environ, "SCGRN_HOME": str(small_disk / "home"), "TQDM_DISABLE": "1"}
    env.pop("DAGSTER_HOME", None)
    env.pop("SCGRN_MIN_FREE_BYTES", None)
    result = subprocess.run([sys.executable, "-m", "scgrn_assets.cli", "status"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "the Dagster instance (SQLite run and event logs) needs 64.0 MiB free" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (small_disk / "home" / "dagster" / "dagster.yaml").exists()
