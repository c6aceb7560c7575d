"""The registry of every Lance table: its name, its Arrow schema and its key columns.

Each stage module in ``schemas/`` declares its own tables once; this module only collects them,
so ``storage`` can create, merge and describe any table by name. Nothing else spells a column list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

# Table metadata key holding the version of a table's declared schema. A table whose stored schema
# is older is upgraded in place on first open (``storage.lance.open_table``) by its spec's ``upgrade``.
SCHEMA_VERSION_KEY = b"mmem.schema_version"


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    doc: str = ""
    upgrade: Callable[[pa.Table], pa.Table] | None = None  # rows of the previous schema -> this one

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    @property
    def schema_version(self) -> int:
        return int((self.schema.metadata or {}).get(SCHEMA_VERSION_KEY, b"1"))


TABLES: dict[str, TableSpec] = {}


def register(name: str, schema: pa.Schema, key: tuple[str, ...], doc: str = "", *, version: int = 1,
             upgrade: Callable[[pa.Table], pa.Table] | None = None) -> TableSpec:
    """Declare a table; ``version`` > 1 with ``upgrade`` (rows of the older schema -> rows of this one)
    makes tables written by an earlier release upgrade in place when first opened."""
    if version > 1:
        schema = schema.with_metadata({**(schema.metadata or {}), SCHEMA_VERSION_KEY: str(version).encode()})
    spec = TableSpec(name, schema, key, doc, upgrade)
    TABLES[name] = spec
    return spec


def spec(name: str) -> TableSpec:
    _load_all()
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}") from None


def all_specs() -> dict[str, TableSpec]:
    _load_all()
    return dict(TABLES)


def _load_all() -> None:
    # Importing a stage module registers its tables.
    from schemas import embed, evaluate, ingest, memory, quarantine, reminders  # noqa: F401
