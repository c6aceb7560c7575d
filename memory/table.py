"""The ``memories`` table as one process holds it: a cached dataset, the writers' lock, retries.

Readers never wait: each store keeps one ``lance.LanceDataset`` (so the vector index stays in its
cache) and moves it to the table's latest version at most every ``refresh_seconds``, which bounds
how stale a read can be without a fresh checkout per call. A store that recalls keeps a
:class:`Snapshot` (a version and its recall columns, :mod:`memory.columns`) that a background
thread moves on every half ``refresh_seconds`` while recalls keep coming, so a recall reads the last
snapshot and pays no refresh; it refreshes itself only when that snapshot is older than the bound
(the thread fell behind) or misses one of this process's own writes. A read whose version another
process's forget has cleaned up meanwhile ("Not found") moves to the latest version and tries again.

Writers take turns: every write of ``memories`` (adds, supersedes, edits, access stats, forget,
upkeep's compaction) holds the table's file lock (``storage.lance.table_lock``) and starts from the
latest version. So a forget's cleanup never meets a writer's uncommitted files, a flush reads the
rows it updates inside the same turn as its commit, and commits never conflict with each other.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from memory.columns import RecallColumns, View
from memory.spool import Spool
from schemas.memory import MEMORIES, MemoryConfig
from storage.lance import connect, open_table, table_lock

TABLE = MEMORIES.name
log = logging.getLogger("mmem." + __name__)
T = TypeVar("T")
FOLLOW_IDLE_SECONDS = 30.0  # the background refresh stops this long after the last recall


@dataclass(frozen=True)
class Snapshot:
    """A version recall reads: the dataset, its recall columns, when its refresh began, and the
    last of this process's writes it includes."""

    ds: object
    view: View
    at: float
    writes: int


def vanished(exc: BaseException) -> bool:
    """A file of the version being read was cleaned up (another process forgot something)."""
    text = str(exc)
    return "Not found" in text or "not found" in text or "No such file" in text


class MemoryTable:
    """One process's handle on ``memories``: reads at a bounded staleness, writes in turns."""

    def __init__(self, config: MemoryConfig) -> None:
        self.config = config
        self.db = connect(config.lance_uri)
        self.columns = RecallColumns()
        self._tbl = None
        self._ds = None
        self._checked = 0.0  # when the refresh that found self._ds began
        self._tick = itertools.count(1)
        self._writes = 0  # this process's last write (a tick); reads after it must see it
        self._row_writes = 0  # ... of the writes recall must see (not access stats: see AccessStats)
        self._fresh_for = 0  # the last write self._ds includes
        self._snapshot: Snapshot | None = None
        self._refreshing = threading.Lock()  # one refresh at a time
        self._follower: threading.Thread | None = None
        self._recalled = 0.0  # when recall last asked for a snapshot
        self._writers = _Turn(self.db, TABLE)
        self._upkeep = _Turn(self.db, f"{TABLE}.upkeep")
        local = "://" not in self.db.uri or self.db.uri.startswith("file://")
        # the group commit's spool (:mod:`memory.spool`); object stores have no turn to share
        self.spool = Spool(Path(self.db.uri.removeprefix("file://")) / ".spool" / TABLE) if local else None

    @property
    def table(self):
        """The LanceDB table at its latest version (created empty with its schema on first use)."""
        tbl = self._handle()
        tbl.checkout_latest()  # its version may be one another process's forget has cleaned up
        return tbl

    def _handle(self):
        if self._tbl is None:
            self._tbl = open_table(self.db, TABLE)
        return self._tbl

    def dataset(self, fresh: bool = False):
        """The table as a dataset at its latest version, checked at most every ``refresh_seconds``
        (always when ``fresh``, and after this process wrote)."""
        now = time.monotonic()
        ds = self._ds
        if self._due(now, fresh):
            with self._refreshing:
                ds = self._ds
                if self._due(now, fresh):
                    ds = self._refresh()
        return ds

    def _due(self, now: float, fresh: bool) -> bool:
        if self._ds is None or self._fresh_for < self._writes:
            return True
        return self._checked < now if fresh else now - self._checked >= self.config.refresh_seconds

    def _refresh(self):
        """Move to the latest version (holding ``_refreshing``); returns the dataset."""
        writes, now, ds = self._writes, time.monotonic(), self._ds
        if ds is None:
            ds = self.table.to_lance()
        else:
            latest = ds.latest_version
            ds = ds if latest == ds.version else ds.checkout_version(latest)
        self._ds, self._checked, self._fresh_for = ds, now, writes
        return ds

    def held(self):
        """The dataset this process holds, at whatever version (for what no version changes: the
        schema, where data files go); :meth:`dataset` when none is held yet."""
        ds = self._ds
        return ds if ds is not None else self.dataset()

    def own(self):
        """A dataset object of its own at the latest version, for operations that move the object
        they are called on (delete, compaction, index builds): the cached one may be in the middle
        of another thread's read."""
        ds = self.dataset(fresh=True)
        return ds.checkout_version(ds.version)

    def synced(self) -> Snapshot:
        """What recall reads: the last :class:`Snapshot`, kept at most ``refresh_seconds`` old by a
        background thread; refreshed here only when it is older or misses this process's writes."""
        now = self._recalled = time.monotonic()
        snap = self._snapshot
        if self._stale(snap, now):
            with self._refreshing:
                snap = self._snapshot
                if self._stale(snap, now):
                    snap = self._snap()
        self._follow()
        return snap

    def _stale(self, snap: Snapshot | None, now: float) -> bool:
        return snap is None or snap.writes < self._row_writes or now - snap.at >= self.config.refresh_seconds

    def _snap(self) -> Snapshot:
        """A snapshot of the latest version (holding ``_refreshing``)."""
        writes, now = self._writes, time.monotonic()
        ds = self._refresh()
        snap = self._snapshot = Snapshot(ds, self.columns.sync(ds), now, writes)
        return snap

    def _follow(self) -> None:
        """Start the background refresh (while recalls keep coming)."""
        if self.config.refresh_seconds <= 0 or (self._follower is not None and self._follower.is_alive()):
            return
        self._follower = threading.Thread(target=self._following, name="mmem-memory-refresh", daemon=True)
        self._follower.start()

    def _following(self) -> None:
        period = self.config.refresh_seconds / 2  # a refresh may take up to the other half
        while time.monotonic() - self._recalled < max(FOLLOW_IDLE_SECONDS, 10 * self.config.refresh_seconds):
            snap = self._snapshot
            wait = period - (time.monotonic() - snap.at) if snap is not None else 0.0
            if wait > 0:
                time.sleep(wait)
                continue
            try:
                with self._refreshing:
                    self._snap()
            except Exception as exc:  # noqa: BLE001 -- a recall refreshes itself if this falls behind
                if vanished(exc):
                    self._ds = None  # reopen: the cached version's files may be gone
                log.debug("memories snapshot not refreshed: %s", exc)
                time.sleep(period)

    def read(self, fn: Callable[[object], T], attempts: int = 3) -> T:
        """``fn(dataset)``, moved to the latest version and retried if its files were cleaned up."""
        for attempt in range(attempts):
            try:
                return fn(self.dataset(fresh=attempt > 0))
            except (OSError, ValueError, RuntimeError) as exc:
                if not vanished(exc) or attempt == attempts - 1:
                    raise
                self._ds = self._snapshot = None  # reopen: the cached version's files may be gone
        raise AssertionError("unreachable")

    def changed(self, rows: bool = True) -> None:
        """This process wrote: the next read checks the version (read-your-writes). ``rows=False``:
        a write after which recall may go on reading its snapshot (access stats, which it adds from
        memory until its snapshot holds them; compaction and index updates, which change no row)."""
        self._writes = next(self._tick)
        if rows:
            self._row_writes = self._writes

    @contextmanager
    def writing(self, rows: bool = True) -> Iterator[object]:
        """The writers' turn (re-entrant in this process); yields the LanceDB table at its latest
        version. ``rows``: see :meth:`changed`."""
        tbl = self._handle()  # created (under the same flock) before the turn is taken
        with self._writers.hold():
            try:
                tbl.checkout_latest()
                yield tbl
            finally:
                self.changed(rows)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """The writers' turn without moving the LanceDB table (the group commit reads the dataset
        itself, and a waiter whose memory another committed only looks at the spool)."""
        self._handle()
        with self._writers.hold():
            try:
                yield
            finally:
                self.changed()

    @contextmanager
    def upkeep_turn(self, blocking: bool = True) -> Iterator[bool]:
        """One process at a time runs upkeep (compaction, index updates, purges); yields whether
        this one got the turn (always, when ``blocking``). Taken before the writers' turn. The
        spool entries of writers that died are removed first."""
        with self._upkeep.hold(blocking) as got:
            if got and self.spool is not None:
                try:
                    self.spool.sweep()
                except OSError as exc:  # a sweep is tidying: it never fails upkeep
                    log.warning("memories spool not swept: %s", exc)
            yield got


class _Turn:
    """A table lock shared by the threads of this process and re-entrant for the thread holding
    it (two flocks of one process on one file would wait for each other)."""

    def __init__(self, db, name: str) -> None:
        self.db, self.name = db, name
        self._lock = threading.RLock()
        self._depth = 0
        self._stack = ExitStack()

    @contextmanager
    def hold(self, blocking: bool = True) -> Iterator[bool]:
        if not self._lock.acquire(blocking=blocking):
            yield False
            return
        try:
            if self._depth == 0:
                got = self._stack.enter_context(table_lock(self.db, self.name, blocking=blocking))
                if not got:
                    self._stack.close()
                    yield False
                    return
            self._depth += 1
            try:
                yield True
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._stack.close()
        finally:
            self._lock.release()
