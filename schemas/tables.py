"""The registry of every Lance table: its name, its Arrow schema and its key columns.

Each stage module in ``schemas/`` declares its own tables once; this module only collects them,
so ``storage`` can create, merge and describe any table by name. Nothing else spells a column list.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    doc: str = ""

    @property
    def columns(self) -> list[str]:
        return self.schema.names


TABLES: dict[str, TableSpec] = {}


def register(name: str, schema: pa.Schema, key: tuple[str, ...], doc: str = "") -> TableSpec:
    spec = TableSpec(name, schema, key, doc)
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
