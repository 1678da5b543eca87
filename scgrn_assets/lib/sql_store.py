"""SCGRN_HOME/scgrn.duckdb: SQL views over the Parquet tables the assets write.

Views (not copies) keep one source of truth: the Parquet file, which is replaced
atomically. Writers take an exclusive file lock, so parallel runs serialise their
schema changes instead of failing on DuckDB's single-writer lock; readers open the
database read-only.
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
def _writer_lock(db_path: Path) -> Iterator[None]:
    lock_path = db_path.with_name(db_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_parquet(table: pd.DataFrame, path: Path) -> Path:
    """Write a DataFrame to Parquet atomically (temp name, then rename)."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def register_view(db_path: Path, name: str, parquet_path: Path) -> None:
    """Create or replace view ``name`` over ``parquet_path`` in the project database."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"invalid table name {name!r}")
    with _writer_lock(db_path):
        for attempt in range(50):
            try:
                with duckdb.connect(str(db_path)) as connection:
                    # DDL cannot take parameters; the path is ours (quoted) and the name is validated above.
                    quoted = str(parquet_path).replace("'", "''")
                    connection.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{quoted}')")
                return
            except duckdb.IOException:
                # A read-only reader in another process holds the file: wait briefly.
                time.sleep(0.1 * (attempt + 1))
        raise ScgrnInputError(f"could not open {db_path} for writing", fix="close other programs using it")


def ensure_database(db_path: Path) -> None:
    """Create the database file if it does not exist yet."""
    if db_path.exists():
        return
    with _writer_lock(db_path):
        with duckdb.connect(str(db_path)):
            pass


def query(db_path: Path, sql: str, parameters: list[Any] | None = None) -> pd.DataFrame:
    """Run ``sql`` read-only; values go in ``parameters`` (``?`` placeholders), never into the text."""
    if not db_path.exists():
        raise ScgrnInputError(f"{db_path} does not exist", fix="run `scgrn demo` (or materialise the assets) first")
    with duckdb.connect(str(db_path), read_only=True) as connection:
        try:
            return connection.execute(sql, parameters or []).df()
        except duckdb.Error as exc:
            raise ScgrnInputError(f"query failed: {exc}", file=str(db_path),
                                  fix="check the SQL; list tables with: SHOW TABLES") from None


def list_tables(db_path: Path) -> list[str]:
    return query(db_path, "SELECT table_name FROM information_schema.tables ORDER BY 1")["table_name"].tolist()
