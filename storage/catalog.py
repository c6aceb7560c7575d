"""What is in the database: table descriptions and SQL (DuckDB over the Lance datasets)."""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from storage.lance import connect


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
    """Run DuckDB SQL with every Lance table registered under its name (scanned lazily)."""
    db = connect(lance_uri)
    con = duckdb.connect()
    names = db.list_tables().tables
    for name in names:
        if not re.search(rf"\b{re.escape(name)}\b", query):
            continue
        tbl = db.open_table(name)
        if versions and name in versions:
            tbl.checkout(versions[name])
        con.register(name, tbl.to_lance())
    unknown = set(versions or {}) - set(names)
    if unknown:
        raise KeyError(f"no such table(s): {sorted(unknown)}")
    return con.sql(query).to_arrow_table()
