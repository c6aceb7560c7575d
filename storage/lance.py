"""LanceDB access: open/create tables by their registered schema, merge rows on their key,
read (at a version), tag versions.

Writers are the flows, one per table; workers return Arrow tables. ``merge`` writes only rows
that are new or changed, so a re-run on the same input leaves the table's version unchanged
(LanceDB's ``merge_insert`` would commit an empty version otherwise).
"""

from __future__ import annotations

import fcntl
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lancedb
import pyarrow as pa
import pyarrow.compute as pc

from schemas.tables import SCHEMA_VERSION_KEY, TableSpec, spec

# The Lance file format tables are created in, named rather than left to the library's default (a
# newer lancedb would otherwise change it silently). 2.2 is what pyproject's pylance floor reads.
STORAGE_VERSION = "2.2"


def connect(uri: str | Path) -> lancedb.DBConnection:
    return lancedb.connect(str(uri))


def table_exists(db: lancedb.DBConnection, name: str) -> bool:
    return name in db.list_tables().tables


def open_table(db: lancedb.DBConnection, name: str) -> lancedb.table.Table:
    """Open a registered table, creating it empty with its declared schema the first time.

    Creation is serialised by a file lock. Without it two processes that both find the table
    missing both write version 1; Lance rebases the loser's create as an *Overwrite* on top of
    the winner's commits, which fails the winner's next merge at best and drops its rows at
    worst (found by ``test_readers_see_whole_commits_only`` on CI).
    """
    try:
        return upgraded(db, name, db.open_table(name))
    except (ValueError, FileNotFoundError):
        pass
    with table_lock(db, name):
        options = {"new_table_data_storage_version": STORAGE_VERSION}  # lancedb's way to name it
        return db.create_table(name, schema=spec(name).schema, exist_ok=True, storage_options=options)


def stored_schema_version(tbl: lancedb.table.Table) -> int:
    return int((tbl.schema.metadata or {}).get(SCHEMA_VERSION_KEY, b"1"))


def upgraded(db: lancedb.DBConnection, name: str, tbl: lancedb.table.Table) -> lancedb.table.Table:
    """``tbl``, first rewritten in its declared schema when it was written with an older one (its
    spec's ``upgrade``). The rewrite is a new version of the same table: older versions, and the
    tags that pin them, stay readable in the schema they were written in."""
    try:
        table_spec = spec(name)
    except KeyError:
        return tbl
    if table_spec.upgrade is None or stored_schema_version(tbl) >= table_spec.schema_version:
        return tbl
    import lance

    with table_lock(db, name):
        tbl.checkout_latest()
        if stored_schema_version(tbl) < table_spec.schema_version:  # nobody upgraded it while we waited
            ds = tbl.to_lance()
            rows = conform(table_spec.upgrade(ds.to_table()), table_spec)
            lance.write_dataset(rows, ds.uri, mode="overwrite", data_storage_version=STORAGE_VERSION)
            tbl.checkout_latest()
    return tbl


@contextmanager
def table_lock(db: lancedb.DBConnection, name: str, *, blocking: bool = True):
    """An exclusive flock per table beside a local database; object stores go unlocked.
    Not re-entrant: a second acquisition in the same process waits for the first. With
    ``blocking=False`` it yields False at once when another holder has it (and True otherwise)."""
    root = Path(db.uri.removeprefix("file://"))
    if "://" in db.uri and not db.uri.startswith("file://"):
        yield True
        return
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sql_literal(value: str | int) -> str:
    """A value as a literal of Lance's SQL filters (a string's quotes doubled)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"no SQL literal for {type(value).__name__}")
    return str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"


def sql_in(column: str, values) -> str:
    """``column IN (...)`` with every value quoted (:func:`sql_literal`)."""
    return f"{column} IN ({', '.join(sql_literal(v) for v in values)})"


def conform(rows: pa.Table, table_spec: TableSpec) -> pa.Table:
    """Order and cast ``rows`` to the declared schema; a missing nullable column becomes nulls."""
    schema = table_spec.schema
    missing = [f.name for f in schema if f.name not in rows.column_names and not f.nullable]
    if missing:
        raise ValueError(f"rows for {table_spec.name!r} lack required columns {missing}")
    columns = [
        rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(len(rows), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def dedupe(rows: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """Keep the last row of each key: LanceDB does not check a batch for duplicate keys."""
    if len(rows) == 0:
        return rows
    idx = pa.array(range(len(rows)), pa.int64())
    grouped = rows.select(list(key)).append_column("__i", idx).group_by(list(key)).aggregate([("__i", "max")])
    keep = pc.sort_indices(grouped.column("__i_max"))
    return rows.take(pc.take(grouped.column("__i_max"), keep))


def _comparable(schema: pa.Schema, key: tuple[str, ...]) -> list[str]:
    return [
        f.name
        for f in schema
        if f.name not in key and not pa.types.is_list(f.type) and not pa.types.is_fixed_size_list(f.type)
        and not f.name.endswith("_at")
    ]


@dataclass(frozen=True)
class MergeResult:
    table: str
    inserted: int
    updated: int
    version: int


def split_new_changed(
    tbl: lancedb.table.Table, rows: pa.Table, table_spec: TableSpec, update: bool
) -> tuple[pa.Table, pa.Table]:
    """(rows whose key is new, rows whose scalar columns differ from the table's [if ``update``])."""
    key = list(table_spec.key)
    compare = _comparable(table_spec.schema, table_spec.key) if update else []
    if tbl.count_rows() == 0:
        return rows, rows.slice(0, 0)
    existing = tbl.to_lance().to_table(columns=key + compare)  # only these columns leave the disk
    probe = rows.select(key + compare).append_column("__i", pa.array(range(len(rows)), pa.int64()))
    renamed = existing.rename_columns(key + [f"__old_{c}" for c in compare]).append_column(
        "__hit", pa.array([True] * len(existing))
    )
    joined = probe.join(renamed, keys=key, join_type="left outer")
    is_new = pc.is_null(joined.column("__hit"))
    differs = pa.array([False] * len(joined), pa.bool_())
    for c in compare:
        new, old = joined.column(c), joined.column(f"__old_{c}")
        ne = pc.fill_null(pc.not_equal(new, old), True)
        both_null = pc.and_(pc.is_null(new), pc.is_null(old))
        differs = pc.or_(differs, pc.and_(ne, pc.invert(both_null)))
    differs = pc.and_(differs, pc.invert(is_new))

    def pick(mask: pa.ChunkedArray) -> pa.Table:
        idx = pc.filter(joined.column("__i"), mask)
        return rows.take(pc.take(idx, pc.sort_indices(idx)))

    return pick(is_new), pick(differs)


def merge(db: lancedb.DBConnection, name: str, rows: pa.Table, *, update: bool = True) -> MergeResult:
    """Upsert ``rows`` on the table's key; writes (and versions) only when something changed.

    Writers of one table take turns (``table_lock``): Lance's ``merge_insert`` does not stop two
    concurrent writers from both inserting the same new key (found by
    ``test_concurrent_ingest_runs_lose_and_duplicate_nothing`` once table creation stopped
    overwriting one of them). Readers never wait.
    """
    table_spec = spec(name)
    rows = dedupe(conform(rows, table_spec), table_spec.key)
    tbl = open_table(db, name)
    with table_lock(db, name):  # compare and write as one step for every process on this machine
        tbl.checkout_latest()
        new, changed = split_new_changed(tbl, rows, table_spec, update)
        if len(new) == 0 and len(changed) == 0:
            return MergeResult(name, 0, 0, tbl.version)
        if len(changed) == 0:  # only new keys (checked under the lock): an append, no join on the key
            tbl.add(new)
            return MergeResult(name, len(new), 0, tbl.version)
        todo = pa.concat_tables([new, changed]) if len(new) else changed
        builder = tbl.merge_insert(list(table_spec.key)).when_not_matched_insert_all()
        if update:
            builder = builder.when_matched_update_all()
        res = builder.execute(todo)
        return MergeResult(name, res.num_inserted_rows, res.num_updated_rows, tbl.version)


def read(
    db: lancedb.DBConnection,
    name: str,
    *,
    version: int | str | None = None,
    columns: list[str] | None = None,
    where: str | pc.Expression | None = None,
) -> pa.Table:
    """The table (or one of its versions, by number or tag) as Arrow."""
    tbl = open_table(db, name)
    if version is not None:
        tbl.checkout(version_ref(version))
    ds = tbl.to_lance()
    return ds.to_table(columns=columns, filter=where)


def version_ref(version: int | str | None) -> int | str | None:
    """A version as given (CLI, config, template): ``"3"`` -> 3; a tag name stays a tag."""
    return int(version) if isinstance(version, str) and version.isdigit() else version


class TablesMissing(FileNotFoundError):
    """Tables a step reads are not there; the message names them and the command that makes them."""


def require(db: lancedb.DBConnection, names: Iterable[str], hint: str) -> None:
    """Raise :class:`TablesMissing` naming every table of ``names`` that ``db`` lacks and ``hint``
    (what to run first): the one "run X first" error of every stage."""
    missing = [n for n in names if not table_exists(db, n)]
    if missing:
        what = f"table {missing[0]} is" if len(missing) == 1 else f"tables {', '.join(missing)} are"
        raise TablesMissing(f"{what} missing under {db.uri}: {hint}")


def resolve_versions(db: lancedb.DBConnection, names: Iterable[str],
                     pins: dict[str, int | str] | None = None, hint: str | None = None) -> dict[str, int]:
    """The version of each table a run reads: its pin (a number, or a tag resolved to its number),
    else the latest now, so that every read of one run sees the same commit of each input. With
    ``hint``, missing tables raise :class:`TablesMissing` (see :func:`require`) first."""
    names = list(names)
    if hint is not None:
        require(db, names, hint)
    out = {}
    for name in names:
        tbl = open_table(db, name)
        pin = (pins or {}).get(name)
        if pin is not None:
            tbl.checkout(version_ref(pin))
        out[name] = tbl.version
    return out


def versions_text(versions: dict[str, int]) -> str:
    """``name@vN, ...``: how logs and summaries name the table versions a stage read or wrote."""
    return ", ".join(f"{k}@v{v}" for k, v in sorted(versions.items())) or "-"


def tag(db: lancedb.DBConnection, name: str, label: str, version: int | None = None) -> str:
    """Tag a version (default: the latest) so it is kept by cleanup and reachable by name."""
    tbl = open_table(db, name)
    label = re.sub(r"[^A-Za-z0-9._-]", "-", label)
    existing = tbl.tags.list()
    if label not in existing:
        tbl.tags.create(label, version or tbl.version)
    return label


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def tag_run(db: lancedb.DBConnection, name: str, label: str, version: int | None = None) -> str:
    """Tag the version a run's last write left (default: the latest) with the run's label, moving
    the tag there when an earlier write of the same run holds it: the run's writes are lineage."""
    tbl = open_table(db, name)
    label = _label(label)
    with table_lock(db, name):  # parallel tasks of one run tag the same label: read and move as one step
        tbl.checkout_latest()
        target = version or tbl.version
        existing = tbl.tags.list()
        if label not in existing:
            tbl.tags.create(label, target)
        elif existing[label]["version"] < target:  # never back: the later write holds the earlier rows
            tbl.tags.update(label, target)
    return label


PIN_PREFIX = "pinned-v"


def pin(db: lancedb.DBConnection, name: str, version: int) -> str:
    """Keep ``version`` of ``name`` for as long as something names it (an artifact's manifest): a tag
    per version, shared by every manifest that names it, which cleanup never removes."""
    tbl = open_table(db, name)
    label = f"{PIN_PREFIX}{int(version)}"
    with table_lock(db, name):  # two runs that plan on the same version pin it once
        if label not in tbl.tags.list():
            tbl.tags.create(label, int(version))
    return label
