"""SCGRN_HOME/scgrn.duckdb: SQL views over the Parquet tables the assets write.

Views (not copies) keep one source of truth: the Parquet file, which is replaced
atomically. DuckDB lets one process write or several read, never both at once, so
every access goes through a lock file beside the database: writers hold it exclusively
(parallel runs serialise their schema changes), readers share it and open the database
read-only. A lock held by a program outside this package is waited out briefly.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import time
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


@contextlib.contextmanager
def _database_lock(db_path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``<db>.lock``: exclusively to write, shared to read (released when the process dies)."""
    lock_path = db_path.with_name(db_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _connect(db_path: Path, *, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting out a conflicting lock held by another program (up to ~2 minutes)."""
    for attempt in range(50):
        try:
            return duckdb.connect(str(db_path), read_only=read_only)
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise
            time.sleep(0.1 * (attempt + 1))
    raise ScgrnInputError(f"{db_path} stayed locked by another program", file=str(db_path),
                          fix="close other programs using it (e.g. a duckdb shell) and run again")


def write_parquet(table: pd.DataFrame, path: Path) -> Path:
    """Write a DataFrame to Parquet atomically (temp name, then rename)."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def register_view(db_path: Path, name: str, parquet_path: Path) -> None:
    """Create or replace view ``name`` over ``parquet_path`` in the project database."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"invalid table name {name!r}")
    with _database_lock(db_path, exclusive=True), _connect(db_path, read_only=False) as connection:
        # DDL cannot take parameters; the path is ours (quoted) and the name is validated above.
        quoted = str(parquet_path).replace("'", "''")
        connection.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{quoted}')")


def ensure_database(db_path: Path) -> None:
    """Create the database file if it does not exist yet."""
    if db_path.exists():
        return
    with _database_lock(db_path, exclusive=True), _connect(db_path, read_only=False):
        pass


def query(db_path: Path, sql: str, parameters: list[Any] | None = None) -> pd.DataFrame:
    """Run ``sql`` read-only; values go in ``parameters`` (``?`` placeholders), never into the text.

    Files outside the database's folder (SCGRN_HOME) can be neither read nor written, and no
    extension can be installed: the views' Parquet files are all a query needs.
    """
    if not db_path.exists():
        raise ScgrnInputError(f"{db_path} does not exist", fix="run `scgrn demo` (or materialise the assets) first")
    with _database_lock(db_path, exclusive=False), _connect(db_path, read_only=True) as connection:
        # Order matters: the allowed folder must be set while external access is still on.
        home_spellings = {str(db_path.absolute().parent) + "/", str(db_path.resolve().parent) + "/"}  # symlinks
        connection.execute("SET allowed_directories = ?", [sorted(home_spellings)])
        connection.execute("SET enable_external_access = false")
        try:
            return connection.execute(sql, parameters or []).df()
        except duckdb.Error as exc:
            raise ScgrnInputError(f"query failed: {exc}", file=str(db_path),
                                  fix="check the SQL; list tables with: SHOW TABLES") from None


def list_tables(db_path: Path) -> list[str]:
    return query(db_path, "SELECT table_name FROM information_schema.tables ORDER BY 1")["table_name"].tolist()
