"""SCGRN_HOME/scgrn.duckdb: SQL views over the Parquet tables the assets write.

Views (not copies) keep one source of truth: the Parquet file, which is replaced
atomically. DuckDB lets one process write or several read, never both at once, so
every access goes through a lock file beside the database: writers hold it exclusively
(parallel runs serialise their schema changes), readers share it and open the database
read-only. A lock held by a program outside this package is waited out briefly. The wait for
the lock file is bounded (``SCGRN_LOCK_WAIT_S``, :func:`~scgrn_assets.lib.storage.lock_wait_seconds`)
and names the holder when it gives up; a query is bounded in time and memory (:func:`query`),
so one runaway ``scgrn sql`` cannot stall the writers for long.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path, held_file_lock, lock_wait_seconds

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


#: What ``scgrn sql`` allows one query by default: seconds of run time and DuckDB's memory (no spilling to disk).
DEFAULT_QUERY_TIMEOUT_S = 60.0
DEFAULT_QUERY_MEMORY_LIMIT = "2GB"


def database_lock_path(db_path: Path) -> Path:
    """``<db>.lock``, held (:func:`held_file_lock`) exclusively to write and shared to read."""
    return db_path.with_name(db_path.name + ".lock")


def _database_lock(db_path: Path, *, exclusive: bool):
    """The database's lock file, with the bounded wait that names the holder (``SCGRN_LOCK_WAIT_S``)."""
    return held_file_lock(database_lock_path(db_path), exclusive=exclusive, wait_s=lock_wait_seconds(),
                          what=f"the SQL database {db_path}")


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
    with _database_lock(db_path, exclusive=True), _connect(db_path, read_only=False):
        pass


# The only statements `scgrn sql` runs: a SELECT (also SHOW, DESCRIBE, SUMMARIZE, VALUES, FROM-first)
# reads; COPY, EXPORT, ATTACH, PRAGMA, SET, CALL and EXPLAIN ANALYZE (which runs what it wraps) can write.
# A PIVOT that finds its columns in the data parses as MULTI (DuckDB creates an enum type first); so does a
# COPY, CREATE, INSERT or EXPLAIN wrapping one, so a MULTI runs only when it is a query (see _is_a_query).
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


def _is_a_query(connection: duckdb.DuckDBPyConnection, statement_sql: str) -> bool:
    """Whether ``statement_sql`` (one statement) parses as a subquery, i.e. is a query and nothing else.

    DuckDB's grammar admits only a SELECT (PIVOT, UNPIVOT, VALUES, FROM-first, DESCRIBE, ...) between the
    parentheses of ``FROM ( ... )``: a COPY, CREATE, INSERT, SET or EXPLAIN there is a syntax error.
    The newlines keep a trailing ``--`` comment from swallowing the closing parenthesis.
    """
    text = statement_sql.strip()
    text = text[:-1] if text.endswith(";") else text
    try:
        return len(connection.extract_statements(f"SELECT * FROM (\n{text}\n)")) == 1
    except duckdb.Error:
        return False


def refuse_statements_that_write(connection: duckdb.DuckDBPyConnection, sql: str, db_path: Path) -> None:
    """Raise unless every statement in ``sql`` is a read (see :data:`READ_ONLY_STATEMENT_TYPES`)."""
    try:
        statements = connection.extract_statements(sql)
    except duckdb.Error as exc:
        raise ScgrnInputError(f"query failed: {exc}", file=str(db_path), fix="check the SQL") from None
    for statement in statements:
        kind = statement.type.name
        if kind == "MULTI" and _is_a_query(connection, statement.query):
            continue  # a PIVOT (or a query using one): reads only
        if kind not in READ_ONLY_STATEMENT_TYPES:
            described = "MULTI (a PIVOT inside a statement that is not a query)" if kind == "MULTI" else kind
            raise ScgrnInputError(
                f"refused a {described} statement: scgrn sql is read-only and runs SELECT queries only (also "
                "PIVOT/UNPIVOT; COPY, EXPORT, ATTACH, SET, PRAGMA, CALL, EXPLAIN, INSTALL/LOAD and writes are refused)",
                file=str(db_path), fix="query the tables with SELECT; list them with: SHOW TABLES")


def query(db_path: Path, sql: str, parameters: list[Any] | None = None, *,
          timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S,
          memory_limit: str | None = DEFAULT_QUERY_MEMORY_LIMIT) -> pd.DataFrame:
    """Run ``sql`` read-only; values go in ``parameters`` (``?`` placeholders), never into the text.

    Three fences, since each alone has a gap: only SELECT statements run (a COPY or EXPORT to an
    allowed path would write it); the database is opened read-only; and the only files DuckDB may
    touch are the Parquet files behind the registered views inside the database's folder
    (SCGRN_HOME), with the configuration locked so a query cannot widen that. Nothing else in
    SCGRN_HOME (downloaded archives, the Dagster instance) can be read, and nothing can be written
    (not even DuckDB's spill files: a query that outgrows ``memory_limit`` fails instead).

    A query runs at most ``timeout_s`` seconds (``None``: no limit) in at most ``memory_limit``
    (DuckDB's syntax, e.g. ``'2GB'``; ``None``: DuckDB's default, most of the RAM): it holds the shared
    lock the writers wait for, so a runaway one (a cross join, an endless recursive CTE) must end.
    """
    if not db_path.exists():
        raise ScgrnInputError(f"{db_path} does not exist", fix="run `scgrn demo` (or materialise the assets) first")
    if timeout_s is not None and not timeout_s > 0:
        raise ScgrnInputError(f"a query timeout of {timeout_s} s is not a positive number of seconds",
                              fix="give the timeout in seconds, e.g. --timeout 60")
    with _database_lock(db_path, exclusive=False), _connect(db_path, read_only=True) as connection:
        refuse_statements_that_write(connection, sql, db_path)
        _set_limits(connection, memory_limit)
        # Order matters: the allowed files must be set while external access is still on.
        connection.execute("SET allowed_paths = ?", [registered_parquet_files(connection, db_path.parent)])
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            connection.interrupt()

        timer = threading.Timer(timeout_s, stop) if timeout_s is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            return connection.execute(sql, parameters or []).df()
        except duckdb.Error as exc:
            if stopped.is_set() or isinstance(exc, duckdb.InterruptException):
                raise ScgrnInputError(f"query stopped after {timeout_s:g} s (its time limit)", file=str(db_path),
                                      fix="raise --timeout (seconds), or narrow the query "
                                          "(a WHERE, a LIMIT, fewer joined rows)") from None
            if isinstance(exc, duckdb.OutOfMemoryException):
                raise ScgrnInputError(f"query stopped: it needed more than its memory limit of {memory_limit}",
                                      file=str(db_path),
                                      fix="raise --memory-limit (e.g. --memory-limit 8GB), or narrow the query "
                                          "(a WHERE, fewer columns, a LIMIT)") from None
            raise ScgrnInputError(f"query failed: {exc}", file=str(db_path),
                                  fix="check the SQL; list tables with: SHOW TABLES") from None
        finally:
            if timer is not None:
                timer.cancel()


def _set_limits(connection: duckdb.DuckDBPyConnection, memory_limit: str | None) -> None:
    """The memory limit, with no spilling to disk (``scgrn sql`` writes nothing); set before the lock."""
    connection.execute("SET temp_directory = ''")
    if memory_limit is None:
        return
    try:
        connection.execute("SET memory_limit = ?", [str(memory_limit)])
    except duckdb.Error as exc:
        raise ScgrnInputError(f"memory limit {memory_limit!r} is not a size DuckDB understands ({exc})",
                              fix="give it as e.g. --memory-limit 2GB or 500MB") from None


def list_tables(db_path: Path) -> list[str]:
    return query(db_path, "SELECT table_name FROM information_schema.tables ORDER BY 1")["table_name"].tolist()
