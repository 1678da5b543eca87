"""SCGRN_HOME/scgrn.duckdb: SQL views over the Parquet tables the assets write.

Views (not copies) keep one source of truth: the Parquet file, which is replaced
atomically. DuckDB lets one process write or several read, never both at once, so
every access goes through a lock file beside the database: writers hold it exclusively
(parallel runs serialise their schema changes), readers share it and open the database
read-only. A lock held by a program outside this package is waited out briefly.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path, held_file_lock

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


def database_lock_path(db_path: Path) -> Path:
    """``<db>.lock``, held (:func:`held_file_lock`) exclusively to write and shared to read."""
    return db_path.with_name(db_path.name + ".lock")


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
    with held_file_lock(database_lock_path(db_path), exclusive=True), _connect(db_path, read_only=False) as connection:
        # DDL cannot take parameters; the path is ours (quoted) and the name is validated above.
        quoted = str(parquet_path).replace("'", "''")
        connection.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{quoted}')")


def write_table(db_path: Path, table: pd.DataFrame, path: Path, view: str | None) -> Path:
    """Write ``table`` to ``path`` as Parquet (atomically) and, when ``view`` is given, (re)create
    that DuckDB view over it."""
    write_parquet(table, path)
    if view:
        register_view(db_path, view, path)
    return path


def ensure_database(db_path: Path) -> None:
    """Create the database file if it does not exist yet."""
    if db_path.exists():
        return
    with held_file_lock(database_lock_path(db_path), exclusive=True), _connect(db_path, read_only=False):
        pass


# The only statements `scgrn sql` runs: a SELECT (also SHOW, DESCRIBE, SUMMARIZE, VALUES, FROM-first)
# reads; COPY, EXPORT, ATTACH, PRAGMA, SET, CALL and EXPLAIN ANALYZE (which runs what it wraps) can write.
READ_ONLY_STATEMENT_TYPES = ("SELECT",)
_VIEW_SOURCE = re.compile(r"read_parquet\('((?:[^']|'')*)'\)")


def registered_parquet_files(connection: duckdb.DuckDBPyConnection, home: Path) -> list[str]:
    """The Parquet files the views read, as the views spell them, that lie inside ``home`` (symlinks resolved)."""
    home = home.resolve()
    files = []
    for (view_sql,) in connection.execute("SELECT sql FROM duckdb_views() WHERE NOT internal").fetchall():
        for quoted in _VIEW_SOURCE.findall(view_sql or ""):
            path = quoted.replace("''", "'")
            if Path(path).resolve().is_relative_to(home):
                files.append(path)
    return sorted(set(files))


def refuse_statements_that_write(connection: duckdb.DuckDBPyConnection, sql: str, db_path: Path) -> None:
    """Raise unless every statement in ``sql`` is a read (see :data:`READ_ONLY_STATEMENT_TYPES`)."""
    try:
        statements = connection.extract_statements(sql)
    except duckdb.Error as exc:
        raise ScgrnInputError(f"query failed: {exc}", file=str(db_path), fix="check the SQL") from None
    for statement in statements:
        kind = statement.type.name
        if kind not in READ_ONLY_STATEMENT_TYPES:
            raise ScgrnInputError(
                f"refused a {kind} statement: scgrn sql is read-only and runs SELECT queries only "
                "(COPY, EXPORT, ATTACH, SET, PRAGMA, CALL, EXPLAIN, INSTALL/LOAD and writes are refused)",
                file=str(db_path), fix="query the tables with SELECT; list them with: SHOW TABLES")


def query(db_path: Path, sql: str, parameters: list[Any] | None = None) -> pd.DataFrame:
    """Run ``sql`` read-only; values go in ``parameters`` (``?`` placeholders), never into the text.

    Three fences, since each alone has a gap: only SELECT statements run (a COPY or EXPORT to an
    allowed path would write it); the database is opened read-only; and the only files DuckDB may
    touch are the Parquet files behind the registered views inside the database's folder
    (SCGRN_HOME), with the configuration locked so a query cannot widen that. Nothing else in
    SCGRN_HOME (downloaded archives, the Dagster instance) can be read, and nothing can be written.
    """
    if not db_path.exists():
        raise ScgrnInputError(f"{db_path} does not exist", fix="run `scgrn demo` (or materialise the assets) first")
    with held_file_lock(database_lock_path(db_path), exclusive=False), _connect(db_path, read_only=True) as connection:
        refuse_statements_that_write(connection, sql, db_path)
        # Order matters: the allowed files must be set while external access is still on.
        connection.execute("SET allowed_paths = ?", [registered_parquet_files(connection, db_path.parent)])
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
        try:
            return connection.execute(sql, parameters or []).df()
        except duckdb.Error as exc:
            raise ScgrnInputError(f"query failed: {exc}", file=str(db_path),
                                  fix="check the SQL; list tables with: SHOW TABLES") from None


def list_tables(db_path: Path) -> list[str]:
    return query(db_path, "SELECT table_name FROM information_schema.tables ORDER BY 1")["table_name"].tolist()
