"""Upkeep of the pipeline's tables: fold small fragments together and remove old versions, while
every tagged version stays (a run's lineage tag, or a ``pinned-v<N>`` that an artifact's manifest
names). Lance's cleanup never removes a tagged version; untagged ones older than ``keep`` go,
bytes included. ``memories`` is left to the memory store's own upkeep (``mmem memory maintain``),
which knows which of its versions a reader holds.
"""

from __future__ import annotations

from datetime import timedelta

from storage.lance import connect, open_table, table_lock

SKIP = ("memories",)


def maintain_tables(lance_uri: str, keep: timedelta = timedelta(days=7), *, skip: tuple[str, ...] = SKIP,
                    only: list[str] | None = None) -> list[dict]:
    """Compact and clean up each table (one writer at a time per table); what each step did."""
    db = connect(lance_uri)
    out = []
    for name in sorted(db.list_tables().tables):
        if name in skip or (only and name not in only):
            continue
        tbl = open_table(db, name)
        with table_lock(db, name):
            tbl.checkout_latest()
            ds = tbl.to_lance()
            before = len(ds.get_fragments())
            compaction = ds.optimize.compact_files()
            stats = ds.cleanup_old_versions(older_than=keep, error_if_tagged_old_versions=False)
            tbl.checkout_latest()  # the handle's own version may be one cleanup just removed
            ds = tbl.to_lance()
        out.append(
            {
                "table": name,
                "version": ds.version,
                "fragments": f"{before} -> {len(ds.get_fragments())}",
                "fragments_removed": compaction.fragments_removed,
                "versions_removed": stats.old_versions,
                "bytes_removed": stats.bytes_removed,
                "tags": len(ds.tags.list()),
            }
        )
    return out
