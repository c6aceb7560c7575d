"""Upkeep of ``memories``: forgetting for good, purging expired memories, folding small fragments,
keeping the indexes current; off the callers' write path and one process at a time.

Forgetting is physical. A Lance delete only writes a deletion file, so :func:`purge` then rewrites
the fragments that held the rows (only those: fragments are bounded in size, so a forget rewrites a
fragment, not the table), rebuilds the indexes that still hold rows of fragments deleted whole (a
compaction remaps the indexes of the fragments it rewrites; a fragment deleted whole is not
rewritten, and scalar and full-text indexes keep its values), drops the tags that pin versions
holding the rows, and removes every other old version. It runs in the writers' turn, so no writer
of this project has uncommitted files while it cleans up, and it never deletes files that no
version references (``delete_unverified`` stays off): a writer outside the project keeps its
in-flight files.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pyarrow.compute as pc
from lancedb.index import FTS, Bitmap, BTree, IvfFlat, IvfHnswSq, IvfPq

from memory import visibility as vis
from memory.table import MemoryTable
from memory.writes import FRAGMENT_ROWS
from schemas.embed import EMBED_DIM
from schemas.memory import MemoryConfig
from storage.index import index_new_rows, partitions_for

log = logging.getLogger(__name__)
# the columns reads filter on (bitmaps for the few-valued ones)
SCALAR_INDICES = {"owner": "BTREE", "memory_id": "BTREE", "superseded_by": "BTREE", "session_id": "BTREE",
                  "created_at": "BTREE", "subject_key": "BTREE", "kind": "BITMAP", "model": "BITMAP"}


@dataclass
class ForgetReport:
    deleted: int = 0
    memory_ids: list[str] = field(default_factory=list)
    tags_dropped: list[str] = field(default_factory=list)
    versions_removed: int = 0
    bytes_removed: int = 0
    fragments_rewritten: int = 0
    indexes_rebuilt: list[str] = field(default_factory=list)
    dry_run: bool = False


def purge(mt: MemoryTable, where: pc.Expression, *, dry_run: bool = False) -> ForgetReport:
    """Remove the rows ``where`` selects from every file of the table (see the module doc)."""
    with mt.upkeep_turn(), mt.writing() as tbl:
        ds = mt.own()
        hit = ds.to_table(columns=["memory_id"], filter=where, with_row_address=True)
        ids = hit.column("memory_id").to_pylist()
        report = ForgetReport(deleted=len(ids), memory_ids=ids, dry_run=dry_run)
        if not ids:
            return report
        frags = {int(a) >> 32 for a in hit.column("_rowaddr").to_pylist()}
        report.tags_dropped = _pinning_tags(tbl, ds, ids)
        if dry_run:  # reading every manifest: only to say what a real run would remove
            report.versions_removed = sum(1 for v in ds.versions() if v["version"] != ds.version)
            return report
        ds.delete(where)
        ds = mt.own()
        live = {f.fragment_id for f in ds.get_fragments()}
        rewrite = frags & live  # fragments deleted whole are gone already
        if rewrite:
            ds.optimize.compact_files(materialize_deletions=True, materialize_deletions_threshold=0.0,
                                      excluded_fragment_ids=sorted(live - rewrite),
                                      target_rows_per_fragment=FRAGMENT_ROWS)
            report.fragments_rewritten = len(rewrite)
            ds = mt.own()
        report.indexes_rebuilt = drop_stale_index_rows(tbl, ds, frags - live)
        for name in report.tags_dropped:
            tbl.tags.delete(name)
        ds = mt.own()
        stats = ds.cleanup_old_versions(older_than=timedelta(0), error_if_tagged_old_versions=False)
        report.bytes_removed, report.versions_removed = stats.bytes_removed, stats.old_versions
        mt.changed()
    log.info("memories: removed %d rows, rewrote %d fragments, rebuilt %s, dropped tags %s, %d versions",
             len(ids), report.fragments_rewritten, report.indexes_rebuilt or "no index", report.tags_dropped,
             report.versions_removed)
    return report


def _pinning_tags(tbl, ds, ids: list[str]) -> list[str]:
    """Tags whose version still holds any of ``ids`` (deleted rows not yet rewritten count: their
    bytes are in that version's files)."""
    out = []
    for name, info in tbl.tags.list().items():
        old = ds.checkout_version(info["version"])
        held = old.to_table(
            columns=["memory_id"], filter=vis.ids(ids), with_row_id=True, include_deleted_rows=True
        )
        if len(held):
            out.append(name)
    return sorted(out)


def drop_stale_index_rows(tbl, ds, gone: set[int] | None = None) -> list[str]:
    """Indexes still covering fragments deleted whole (``gone``; None: any fragment that no longer
    exists) hold the deleted rows' values: the vector index drops them when its segments are
    merged; scalar and full-text indexes are rebuilt (with the configs :func:`maintain` uses)."""
    live = {f.fragment_id for f in ds.get_fragments()}
    rebuilt = []
    for idx in ds.describe_indices():
        covered = {f for seg in idx.segments for f in (seg.fragment_ids or ())}
        stale = covered - live if gone is None else covered & gone
        if not stale:
            continue
        column = idx.field_names[0]
        if idx.index_type.startswith("IVF"):
            ds.optimize.optimize_indices(index_names=[idx.name], num_indices_to_merge=len(idx.segments))
            ds = ds.checkout_version(ds.latest_version)
        else:
            tbl.checkout_latest()
            kind = {"Inverted": FTS(), "Bitmap": Bitmap()}.get(idx.index_type, BTree())
            tbl.create_index(column, config=kind, replace=True, name=idx.name)
            ds = tbl.to_lance()
        rebuilt.append(idx.name)
    return rebuilt


def fold_small_fragments(mt: MemoryTable, rows: int) -> int:
    """Merge fragments under ``rows`` (every single write leaves one) into each other; bigger
    fragments are left alone. Returns how many small fragments there were."""
    with mt.writing(rows=False):  # what recall reads is unchanged
        ds = mt.own()
        small = [f.fragment_id for f in ds.get_fragments() if f.metadata.physical_rows < rows]
        if len(small) >= 2:
            ds.optimize.compact_files(target_rows_per_fragment=rows)
    return len(small)


def unindexed_rows(ds) -> int:
    """Rows in fragments the vector index does not cover (0 without an index)."""
    vector = [i for i in ds.describe_indices() if i.field_names == ["vector"]]
    if not vector:
        return 0
    covered = {f for seg in vector[0].segments for f in (seg.fragment_ids or ())}
    return sum(f.metadata.physical_rows for f in ds.get_fragments() if f.fragment_id not in covered)


def index_new_rows_delta(mt: MemoryTable) -> None:
    """Index the rows outside the indexes as delta segments (no merge: that rewrites the whole
    vector index, which :func:`maintain` does), in the writers' turn."""
    with mt.writing(rows=False):  # what recall reads is unchanged
        ds = mt.own()
        ds.optimize.optimize_indices(num_indices_to_merge=0)


def maintain(mt: MemoryTable, config: MemoryConfig) -> dict[str, Any]:
    """Everything upkeep does, now: purge expired transient memories, build the indexes once the
    table is big enough, fold small fragments, index new rows (the vector index keeps its trained
    partitions), remove versions older than ``keep_versions_seconds`` (tagged ones stay)."""
    from datetime import UTC, datetime

    done: dict[str, Any] = {}
    with mt.upkeep_turn():
        expired = purge_expired(mt, config, datetime.now(UTC))
        if expired:
            done["expired_purged"] = expired
        tbl = mt.table
        with mt.writing():
            rows = tbl.count_rows()
            names = {tuple(i.columns) for i in tbl.list_indices()}
            if rows >= config.index_min_rows and ("vector",) not in names:
                tbl.create_index("vector", config=vector_index_config(config, rows))
                done["vector_index"] = config.index_type
            if rows >= config.index_min_rows:
                for col, kind in SCALAR_INDICES.items():
                    if (col,) not in names:
                        tbl.create_index(col, config=BTree() if kind == "BTREE" else Bitmap())
                        done[f"{col}_index"] = kind
            if config.hybrid:
                ensure_fts(tbl)
        done["rows"] = rows
        done["small_fragments_folded"] = fold_small_fragments(mt, config.compact_rows)
        with mt.writing() as tbl:  # e.g. a forget killed before its indexes were rewritten
            done["indexes_rebuilt"] = drop_stale_index_rows(tbl, mt.own())
        if names:
            with mt.writing():
                done["index_segments_merged"] = index_new_rows(tbl)
        done["old_versions_removed"] = remove_old_versions(mt, config)
    return done


def remove_old_versions(mt: MemoryTable, config: MemoryConfig) -> int:
    """Untagged versions older than ``keep_versions_seconds``: every write makes one, and a forget
    (which removes them all) reads each. Files no version references are never deleted."""
    stats = mt.own().cleanup_old_versions(older_than=timedelta(seconds=config.keep_versions_seconds),
                                          error_if_tagged_old_versions=False)
    return stats.old_versions


def purge_expired(mt: MemoryTable, config: MemoryConfig, now) -> int:
    where = vis.expired(now, config.transient_ttl_hours)
    if mt.dataset(fresh=True).count_rows(filter=where) == 0:
        return 0
    return purge(mt, where).deleted


def vector_index_config(config: MemoryConfig, rows: int):
    parts = config.index_partitions or partitions_for(rows)
    if config.index_type == "IVF_PQ":
        return IvfPq(distance_type="cosine", num_partitions=parts, num_sub_vectors=EMBED_DIM // 16)
    if config.index_type == "IVF_FLAT":
        return IvfFlat(distance_type="cosine", num_partitions=parts)
    return IvfHnswSq(distance_type="cosine", num_partitions=parts, m=config.index_m,
                     ef_construction=config.index_ef_construction)


def ensure_fts(tbl) -> None:
    if not any(i.columns == ["text"] for i in tbl.list_indices()):
        tbl.create_index("text", config=FTS())


class Background:
    """One daemon thread per store for work that must not hold up a caller: access-stat writes, and
    upkeep when the table needs it (many small fragments), skipped when another process has the
    upkeep turn. A job never raises into a caller: a failure is logged and tried again at the next
    trigger."""

    def __init__(self, mt: MemoryTable, config: MemoryConfig) -> None:
        self.mt, self.config = mt, config
        self._jobs: dict[str, Callable[[], object]] = {}  # at most one pending job of each kind
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._poked = 0.0
        self._cleaned: int | None = None  # the version at the last cleanup this store started
        self.runs = 0  # upkeep runs done
        self.errors = 0

    def submit(self, name: str, job: Callable[[], object]) -> None:
        with self._lock:
            self._jobs.setdefault(name, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="mmem-memory-background", daemon=True)
                self._thread.start()

    def poke(self) -> None:
        """After a write: start upkeep if the table needs it (looked at once per ``refresh_seconds``)."""
        now = time.monotonic()
        if now - self._poked < self.config.refresh_seconds:
            return
        self._poked = now
        try:
            ds = self.mt.dataset()
            small = sum(f.metadata.physical_rows < self.config.fold_rows for f in ds.get_fragments())
        except Exception as exc:  # noqa: BLE001 -- a read racing a cleanup: next time
            log.debug("memories upkeep check skipped: %s", exc)
            return
        if small >= self.config.upkeep_small_fragments:
            self.submit("fold", self._fold)
        if unindexed_rows(ds) >= self.config.upkeep_unindexed_rows:
            self.submit("index", self._index)
        if self._cleaned is None:
            self._cleaned = ds.version
        elif ds.version - self._cleaned >= self.config.upkeep_commits:
            self._cleaned = ds.version
            self.submit("cleanup", self._cleanup)

    def join(self) -> None:
        """Wait until every submitted job is done."""
        while (thread := self._thread) is not None:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    return
                name, job = self._jobs.popitem()
            try:
                job()
            except Exception as exc:  # noqa: BLE001 -- logged, tried again at the next trigger
                self.errors += 1
                log.warning("memories %s failed (tried again later): %s", name, exc)

    def _fold(self) -> None:
        with self.mt.upkeep_turn(blocking=False) as mine:
            if mine:
                fold_small_fragments(self.mt, self.config.fold_rows)
                self.runs += 1

    def _cleanup(self) -> None:
        with self.mt.upkeep_turn(blocking=False) as mine:
            if mine:
                remove_old_versions(self.mt, self.config)
                self.runs += 1

    def _index(self) -> None:
        with self.mt.upkeep_turn(blocking=False) as mine:
            if mine:
                index_new_rows_delta(self.mt)
                self.runs += 1
