"""Writing memories: a new memory is one append, a supersede one commit, access stats one partial
update; each in the writers' turn (:meth:`memory.table.MemoryTable.writing`) and nothing else on
the caller's path (compaction, index updates and purges are upkeep's, :mod:`memory.upkeep`).

New memories are committed in groups: a writer stages its row's data file, publishes it in the
table's spool and waits for the turn; whoever gets the turn commits every staged memory in one
``Append`` (:func:`commit_group`, :mod:`memory.spool`), so writers beside each other share commits.

Exactly once: a write returns after its commit and does nothing that can fail after it. A caller
that passes its own ``memory_id`` may retry after a crash or a timeout: a write whose id is already
in the table returns the stored row instead of storing it twice.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import write_fragments

from memory import visibility as vis
from memory.table import MemoryTable
from schemas.embed import EMBED_DIM
from schemas.memory import DURABLE, MEMORIES
from storage.lance import conform, dedupe, sql_in

PUBLIC_COLUMNS = [c for c in MEMORIES.columns if c != "vector"]
# a forget rewrites the fragments that held the rows: bounded fragments bound what it rewrites
# (65,536 rows of 1024-d vectors: ~270 MB, under a tenth of an 827,830-memory table)
FRAGMENT_ROWS = 65_536


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {c: [r.get(c) for r in rows] for c in MEMORIES.columns if c != "vector"}
    vecs = np.stack([np.asarray(r["vector"], np.float32) for r in rows]).reshape(-1)
    cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vecs, pa.float32()), EMBED_DIM)
    return conform(pa.table(cols), MEMORIES)


def public(row: dict[str, Any]) -> dict[str, Any]:
    return {c: row.get(c) for c in PUBLIC_COLUMNS}


def _stored(mt: MemoryTable, memory_id: str) -> dict[str, Any] | None:
    ds = mt.dataset(fresh=True)
    if not ds.count_rows(filter=vis.ids([memory_id])):
        return None
    return ds.to_table(columns=PUBLIC_COLUMNS, filter=vis.ids([memory_id])).to_pylist()[0]


def add(mt: MemoryTable, row: dict[str, Any], *, check_id: bool) -> dict[str, Any]:
    """Append one new memory (a durable one with a key supersedes the owner's current fact on it,
    in the same commit). With ``check_id`` (the caller chose the id) a stored id is returned as is."""
    # the row's data file is written before the turn (others wait only for the check and the
    # commit); a file whose commit does not happen is referenced by no version and never read
    if row.get("subject_key") and row["kind"] == DURABLE:
        return _supersede(mt, row, check_id)
    ds = mt.held()  # the data file's place and schema: no version is read
    staged = write_fragments(rows_table([row]), ds, schema=ds.schema)
    if mt.spool is None:
        with mt.writing():
            if check_id and (old := _stored(mt, row["memory_id"])) is not None:
                return old
            _append(mt, staged)
        return public(row)
    return _grouped(mt, row, staged, check_id)


def _grouped(mt: MemoryTable, row: dict[str, Any], staged, check_id: bool) -> dict[str, Any]:
    """Publish the staged fragments, then wait for the turn: a writer that held it meanwhile may
    have committed them with its own (group commit, :mod:`memory.spool`)."""
    spool, mid = mt.spool, row["memory_id"]
    token = spool.publish(staged, mid, check_id)
    try:
        with mt.turn():
            state = spool.state(token)
            if state in ("claimed", None):  # its committer died (or failed) before marking it
                if _stored(mt, mid) is not None:
                    state = "dup" if check_id else "done"
                else:
                    spool.remove(token)
                    spool.publish(staged, mid, check_id, token=token)
                    state = "pending"
            if state == "pending":
                commit_group(mt)
                state = spool.state(token)
            if state == "dup":
                return _stored(mt, mid) or public(row)
            if state != "done":
                raise RuntimeError(f"memories group commit left {mid!r} {state}")
    finally:
        spool.remove(token)
    return public(row)


def commit_group(mt: MemoryTable) -> int:
    """In the writers' turn: claim every pending spool entry, leave out caller-chosen ids already
    stored (and a second entry of one id), commit the rest in one ``Append``, then mark each
    entry. Returns how many memories were committed."""
    entries = mt.spool.claim()
    if not entries:
        return 0
    ds = mt.dataset(fresh=True)
    checked = [e.memory_id for e in entries if e.check_id]
    stored = set()
    if checked:
        found = ds.to_table(columns=["memory_id"], filter=vis.ids(checked))
        stored = set(found.column("memory_id").to_pylist())
    take, dup = [], []
    for e in entries:
        (dup if e.memory_id in stored else take).append(e)
        stored.add(e.memory_id)
    if take:
        _append(mt, [f for e in take for f in e.fragments], ds)
    for e in take:
        mt.spool.mark(e.token, "done")
    for e in dup:
        mt.spool.mark(e.token, "dup")
    return len(take)


def _append(mt: MemoryTable, fragments, ds=None) -> None:
    ds = ds or mt.dataset(fresh=True)
    lance.LanceDataset.commit(ds.uri, lance.LanceOperation.Append(fragments), read_version=ds.version)


def _supersede(mt: MemoryTable, row: dict[str, Any], check_id: bool) -> dict[str, Any]:
    """A durable memory with a key: one commit of the new row and the flags of the fact it
    supersedes, alone in the writers' turn (the lookup and the commit must see the same version)."""
    new = rows_table([row])
    with mt.writing():
        if check_id and (old := _stored(mt, row["memory_id"])) is not None:
            return old
        ds = mt.dataset(fresh=True)
        # Lance finds the owner's rows on the key by their two indexes; the terms true of nearly
        # every row (current, durable) filter those few here: given to Lance, their index lookups
        # select most of the table and then intersect, which doubles the lookup's cost
        keyed = ds.to_table(columns=MEMORIES.columns, with_row_address=True,
                            filter=vis.owned(row["owner"]) & (pc.field("subject_key") == row["subject_key"]))
        old = keyed.filter(vis.current() & (pc.field("kind") == DURABLE))
        if len(old):
            flagged = old.drop_columns(["_rowaddr"]).to_pylist()
            for r in flagged:
                r["superseded_by"] = row["memory_id"]
            replace_rows(ds, old, rows_table([row, *flagged]))
        else:
            _append(mt, write_fragments(new, ds, schema=ds.schema), ds)
    return public(row)


def replace(mt: MemoryTable, owner: str, memory_id: str, edit) -> dict[str, Any]:
    """Read one memory in the writers' turn, let ``edit(row)`` change it, write it back."""
    with mt.writing():
        ds = mt.dataset(fresh=True)
        old = ds.to_table(columns=MEMORIES.columns, filter=vis.owned(owner) & vis.ids([memory_id]),
                          with_row_address=True)
        if not len(old):
            raise KeyError(f"owner {owner!r} has no memory {memory_id!r}")
        row = edit(old.drop_columns(["_rowaddr"]).to_pylist()[0])
        replace_rows(ds, old, rows_table([row]))
    return public(row)


def replace_rows(ds, old: pa.Table, new: pa.Table) -> int:
    """One commit that deletes the ``old`` rows (found with ``_rowaddr``) and adds ``new``: what a
    merge on ``memory_id`` does, without joining the whole table to find rows already found.
    Returns the version committed."""
    new_fragments = write_fragments(new, ds, schema=ds.schema)
    frags: dict[int, list[str]] = {}
    for addr, mid in zip(
        old.column("_rowaddr").to_pylist(), old.column("memory_id").to_pylist(), strict=True
    ):
        frags.setdefault(addr >> 32, []).append(mid)
    updated, removed = [], []
    for fid, ids in frags.items():
        md = ds.get_fragment(fid).delete(sql_in("memory_id", ids))
        updated.append(md) if md is not None else removed.append(fid)
    op = lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated,
                                     new_fragments=new_fragments)
    return lance.LanceDataset.commit(ds.uri, op, read_version=ds.version).version


def insert_new(mt: MemoryTable, rows: pa.Table) -> int:
    """Bulk insert (seeding): rows whose ``memory_id`` exists are left alone. At most
    ``FRAGMENT_ROWS`` rows a commit, so no fragment grows past that."""
    inserted = 0
    for start in range(0, len(rows), FRAGMENT_ROWS):
        with mt.writing() as tbl:
            res = (tbl.merge_insert("memory_id").when_not_matched_insert_all()
                   .execute(rows.slice(start, FRAGMENT_ROWS)))
        inserted += res.num_inserted_rows
    return inserted


class AccessStats:
    """Accesses counted by recalls and written in one commit per ``touch_flush_memories`` memories
    or ``touch_flush_seconds``: a write per recall would leave a fragment per recall for every
    search to visit. Recalls of this store see pending accesses at once, and written ones until
    the version recall reads holds them (so a flush never makes recall refresh on its path); other
    processes see them once written. The write reads the rows in the writers' turn and changes
    only their stats, so it cannot undo another process's supersede, edit or forget."""

    def __init__(self, flush_memories: int, flush_seconds: float) -> None:
        self.pending: dict[str, tuple[int, datetime]] = {}
        # flushed accesses by the version that holds them (None: being written)
        self._written: list[tuple[int | None, dict[str, tuple[int, datetime]]]] = []
        self._lock = threading.Lock()  # guards _written (recalls prune it, flushes add to it)
        self._writing = threading.Lock()  # one flush at a time: a caller's waits for the background's
        self._since = 0.0
        self._memories, self._seconds = flush_memories, flush_seconds

    def touch(self, memory_ids: list[str], now: datetime) -> bool:
        """Count an access of each; returns whether a flush is due."""
        if not self.pending:
            self._since = time.monotonic()
        for m in memory_ids:
            count, _ = self.pending.get(m, (0, now))
            self.pending[m] = (count + 1, now)
        return len(self.pending) >= self._memories or time.monotonic() - self._since >= self._seconds

    def unseen(self, version: int | None, memory_ids=None) -> dict[str, tuple[int, datetime]]:
        """Accesses that a read of ``version`` does not hold: pending ones, and written ones of later
        versions (count, last access); of ``memory_ids`` only, when given (what a recall looks up)."""
        with self._lock:
            written = self._written = [(v, p) for v, p in self._written
                                       if v is None or version is None or v > version]
        wanted = None if memory_ids is None else set(memory_ids)
        out: dict[str, tuple[int, datetime]] = {}
        for part in (self.pending, *(p for _, p in written)):
            for m in list(part) if wanted is None else part.keys() & wanted:  # a snapshot of its keys
                n, t = part[m]
                had, last = out.get(m, (0, t))
                out[m] = (had + n, max(last, t))
        return out

    def adjust(self, cands: pa.Table, version: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates' last access (datetime64[us]) and access count, as of now: read at
        ``version``, plus :meth:`unseen`."""
        last = cands.column("last_accessed_at").to_numpy().astype("datetime64[us]")
        count = cands.column("access_count").to_numpy().astype(np.int64)
        ids = cands.column("memory_id").to_pylist()
        extra = self.unseen(version, ids)
        if extra:
            for i, m in enumerate(ids):
                if m in extra:
                    n, t = extra[m]
                    count[i] += n
                    last[i] = np.datetime64(t.astimezone(UTC).replace(tzinfo=None), "us")
        return last, count

    def flush(self, mt: MemoryTable) -> int:
        """Write the pending accesses in one commit; returns how many memories were updated."""
        with self._writing:
            if not self.pending:
                return 0
            pending, self.pending = self.pending, {}
            entry = (None, pending)
            with self._lock:
                self._written = [*self._written, entry]  # counted by recalls while it is written
            version = None
            try:
                n, version = write_stats(mt, pending)
            finally:
                with self._lock:
                    self._written = [(version, pending) if e is entry else e for e in self._written
                                     if e is not entry or version is not None]
            return n


def write_stats(mt: MemoryTable, pending: dict[str, tuple[int, datetime]]) -> tuple[int, int]:
    """Read the rows in the writers' turn, add the counts, write them back in the same turn: no
    other writer can come between (a merge of the two stat columns alone would not need the read,
    but Lance joins the whole table for it); one commit (:func:`replace_rows`). Returns how many
    memories were updated and the version that holds them."""
    with mt.writing(rows=False):
        ds = mt.dataset(fresh=True)
        old = ds.to_table(columns=MEMORIES.columns, filter=vis.ids(pending), with_row_address=True)
        if len(old) == 0:  # all forgotten meanwhile
            return 0, ds.version
        rows = dedupe(old.drop_columns(["_rowaddr"]), ("memory_id",))
        got = rows.column("memory_id").to_pylist()
        count = pc.add(rows.column("access_count"), pa.array([pending[m][0] for m in got], pa.int64()))
        last = pa.array([pending[m][1] for m in got], pa.timestamp("us", tz="UTC"))
        rows = rows.set_column(rows.column_names.index("access_count"), "access_count", count)
        rows = rows.set_column(rows.column_names.index("last_accessed_at"), "last_accessed_at", last)
        version = replace_rows(ds, old, conform(rows, MEMORIES))
    return len(got), version
