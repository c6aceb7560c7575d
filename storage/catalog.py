"""What is in the database: table descriptions and SQL (DuckDB over the Lance datasets).

SQL is read-only: the Lance datasets are registered first, then the DuckDB connection is locked
down (no file system, no network, no extensions, configuration frozen), so a query can read the
tables it names and nothing else, and can write nowhere. Statements other than queries are refused
before any table is opened, which also gives them a clear message.
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from storage.lance import connect


class CatalogError(ValueError):
    """A query or a version pin that cannot be answered, said in the user's terms."""


class ReadOnlyError(CatalogError):
    """A statement that would write, reach outside the tables or change the engine: refused."""


# Queries only. MULTI is what DuckDB makes of a PIVOT; CALL runs table functions (the lockdown below
# keeps the ones that touch files, extensions or settings out).
_READ_STATEMENTS = frozenset({"SELECT", "EXPLAIN", "CALL", "MULTI"})

# Applied after the tables are registered; the last one freezes them all for the connection.
_LOCKDOWN = (
    "SET enable_external_access = false",  # files, network, ATTACH, COPY, INSTALL/LOAD
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET python_enable_replacements = false",  # no scanning of this process's Python variables
    "SET lock_configuration = true",
)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_VERB = re.compile(r"([A-Za-z]+)")


def describe_tables(lance_uri: str) -> list[dict]:
    db = connect(lance_uri)
    out = []
    for name in sorted(db.list_tables().tables):
        tbl = db.open_table(name)
        out.append(
            {
                "table": name,
                "rows": tbl.count_rows(),
                "version": tbl.version,
                "tags": sorted(tbl.tags.list()),
                "columns": tbl.schema.names,
            }
        )
    return out


def run_sql(lance_uri: str, query: str, versions: dict[str, int | str] | None = None) -> pa.Table:
    """Run read-only DuckDB SQL with every Lance table the query names registered under its name
    (scanned lazily), each at its latest version or at the version (number or tag) pinned in
    ``versions``. A statement that is not a query, or a query that reaches past the registered
    tables (files, URLs, extensions, settings), raises :class:`ReadOnlyError`."""
    with duckdb.connect() as con:
        _refuse_non_queries(con, query)
        return _run_locked(con, lance_uri, query, versions or {})


def _run_locked(con: duckdb.DuckDBPyConnection, lance_uri: str, query: str,
                versions: dict[str, int | str]) -> pa.Table:
    db = connect(lance_uri)
    names = sorted(db.list_tables().tables)
    unknown = sorted(set(versions) - set(names))
    if unknown:
        raise CatalogError(f"--version names no such table: {', '.join(unknown)} "
                           f"(tables: {', '.join(names) or 'none'})")
    for name in names:
        if not re.search(rf"\b{re.escape(name)}\b", query, re.IGNORECASE):
            continue  # opening every table would cost a manifest read each
        tbl = db.open_table(name)
        if name in versions:
            _checkout(tbl, name, versions[name])
        con.register(name, tbl.to_lance())
    for setting in _LOCKDOWN:
        con.execute(setting)
    try:
        result = con.sql(query)
        return result.to_arrow_table() if result is not None else pa.table({})
    except duckdb.CatalogException as exc:
        raise CatalogError(f"{exc}\nLance tables: {', '.join(names) or 'none'}") from exc
    except duckdb.PermissionException as exc:
        raise ReadOnlyError(f"mmem sql is read-only: {_first_line(exc)}") from exc
    except duckdb.InvalidInputException as exc:
        if "configuration has been locked" not in str(exc):
            raise
        raise ReadOnlyError(f"mmem sql is read-only: {_first_line(exc)}") from exc


def _refuse_non_queries(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse COPY, ATTACH, INSTALL/LOAD, SET/PRAGMA, DDL and DML by statement type, by name."""
    statements = con.extract_statements(query)
    if not statements:
        raise CatalogError("no SQL statement given")
    for statement in statements:
        kind = statement.type.name
        if kind not in _READ_STATEMENTS:
            verb = _VERB.search(_COMMENTS.sub(" ", statement.query))
            what = verb.group(1).upper() if verb else kind
            raise ReadOnlyError(f"mmem sql is read-only: {what} statements are refused "
                                f"(queries only: SELECT, WITH, FROM, DESCRIBE, EXPLAIN)")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _checkout(tbl, name: str, version: int | str) -> None:
    """Pin ``tbl`` to a past version; an unknown number or tag names what exists instead."""
    numbers = [v["version"] for v in tbl.list_versions()]
    tags = tbl.tags.list()
    if version not in (numbers if isinstance(version, int) else tags):
        span = ", ".join(map(str, numbers)) if len(numbers) <= 12 else f"{numbers[0]}..{numbers[-1]}"
        raise CatalogError(f"{name} has no version {version!r}; versions: {span}; "
                           f"tags: {', '.join(sorted(tags)) or 'none'}")
    tbl.checkout(version)
