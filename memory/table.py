"""The ``memories`` table as one process holds it: a cached dataset, the writers' lock, retries.

Readers never wait: each store keeps one ``lance.LanceDataset`` (so the vector index stays in its
cache) and moves it to the table's latest version at most every ``refresh_seconds``, which bounds
how stale a read can be without a fresh checkout per call. A read whose version another process's
forget has cleaned up meanwhile ("Not found") moves to the latest version and tries again.

Writers take turns: every write of ``memories`` (adds, supersedes, edits, access stats, forget,
upkeep's compaction) holds the table's file lock (``storage.lance.table_lock``) and starts from the
latest version. So a forget's cleanup never meets a writer's uncommitted files, a flush reads the
rows it updates inside the same turn as its commit, and commits never conflict with each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

from memory.columns import RecallColumns
from memory.spool import Spool
from schemas.memory import MEMORIES, MemoryConfig
from storage.lance import connect, open_table, table_lock

TABLE = MEMORIES.name
log = logging.getLogger("mmem." + __name__)
T = TypeVar("T")


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
        self._checked = 0.0
        self._stale = True
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
        if self._ds is None:
            self._ds = self.table.to_lance()
            self._checked, self._stale = now, False
        elif fresh or self._stale or now - self._checked >= self.config.refresh_seconds:
            latest = self._ds.latest_version
            if latest != self._ds.version:
                self._ds = self._ds.checkout_version(latest)
            self._checked, self._stale = now, False
        return self._ds

    def held(self):
        """The dataset this process holds, at whatever version (for what no version changes: the
        schema, where data files go); :meth:`dataset` when none is held yet."""
        return self._ds if self._ds is not None else self.dataset()

    def own(self):
        """A dataset object of its own at the latest version, for operations that move the object
        they are called on (delete, compaction, index builds): the cached one may be in the middle
        of another thread's read."""
        ds = self.dataset(fresh=True)
        return ds.checkout_version(ds.version)

    def synced(self):
        """:meth:`dataset` with :attr:`columns` following it (what recall reads)."""
        ds = self.dataset()
        self.columns.sync(ds)
        return ds

    def read(self, fn: Callable[[object], T], attempts: int = 3) -> T:
        """``fn(dataset)``, moved to the latest version and retried if its files were cleaned up."""
        for attempt in range(attempts):
            try:
                return fn(self.dataset(fresh=attempt > 0))
            except (OSError, ValueError, RuntimeError) as exc:
                if not vanished(exc) or attempt == attempts - 1:
                    raise
                self._ds = None  # reopen: the cached version's files may be gone
        raise AssertionError("unreachable")

    def changed(self) -> None:
        """This process wrote: the next read checks the version (read-your-writes)."""
        self._stale = True

    @contextmanager
    def writing(self) -> Iterator[object]:
        """The writers' turn (re-entrant in this process); yields the LanceDB table at its latest
        version."""
        tbl = self._handle()  # created (under the same flock) before the turn is taken
        with self._writers.hold():
            try:
                tbl.checkout_latest()
                yield tbl
            finally:
                self.changed()

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
