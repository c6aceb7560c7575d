"""What is in the database: table descriptions and SQL (DuckDB over the Lance datasets)."""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from storage.lance import connect


class CatalogError(ValueError):
    """A query or a version pin that cannot be answered, said in the user's terms."""


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
    """Run DuckDB SQL with every Lance table the query names registered under its name (scanned
    lazily), each at its latest version or at the version (number or tag) pinned in ``versions``."""
    db = connect(lance_uri)
    names = sorted(db.list_tables().tables)
    unknown = sorted(set(versions or {}) - set(names))
    if unknown:
        raise CatalogError(f"--version names no such table: {', '.join(unknown)} "
                           f"(tables: {', '.join(names) or 'none'})")
    con = duckdb.connect()
    for name in names:
        if not re.search(rf"\b{re.escape(name)}\b", query, re.IGNORECASE):
            continue  # opening every table would cost a manifest read each
        tbl = db.open_table(name)
        if versions and name in versions:
            _checkout(tbl, name, versions[name])
        con.register(name, tbl.to_lance())
    try:
        return con.sql(query).to_arrow_table()
    except duckdb.CatalogException as exc:
        raise CatalogError(f"{exc}\nLance tables: {', '.join(names) or 'none'}") from exc


def _checkout(tbl, name: str, version: int | str) -> None:
    """Pin ``tbl`` to a past version; an unknown number or tag names what exists instead."""
    numbers = [v["version"] for v in tbl.list_versions()]
    tags = tbl.tags.list()
    if version not in (numbers if isinstance(version, int) else tags):
        span = ", ".join(map(str, numbers)) if len(numbers) <= 12 else f"{numbers[0]}..{numbers[-1]}"
        raise CatalogError(f"{name} has no version {version!r}; versions: {span}; "
                           f"tags: {', '.join(sorted(tags)) or 'none'}")
    tbl.checkout(version)
