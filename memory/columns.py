"""What recall filters and re-ranks on, held in memory per Lance fragment (:class:`RecallColumns`).

After the vector search Lance reads each further column of the ~100 candidates by random
access: ~1.3 ms per column per query at 827,830 memories on 2 cores, and recall's filter and
score need nine. These columns are small (tens of bytes a row), and a fragment's data files
never change (an update deletes the row and writes it into a new fragment; an in-place column
rewrite changes the fragment's file list, which is part of the cache key), so each fragment's
columns are read once per process and, when the table moves on, only new or rewritten
fragments are read. Deleted rows are never returned by the search, so deletion files need no
tracking here.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.memory import DURABLE, MEMORIES

# the row's identity, the visibility filter's columns, and the re-rank's
COLUMNS = ["memory_id", "owner", "model", "kind", "superseded_by", "session_id", "created_at",
           "last_accessed_at", "access_count", "saliency"]
# few distinct values: dictionary-encoded in memory (the model fingerprint would repeat on every row)
DICTIONARY = ("owner", "model", "kind", "session_id")
_TS = pa.timestamp("us", tz="UTC")


def visible(owner: str, model: str, session: str | None, cutoff: datetime) -> pc.Expression:
    """``MemoryStore.visible_filter`` as an Arrow expression, for rows already in memory (the two
    are checked against each other in tests/test_memory.py)."""
    mine = (pc.field("owner") == owner) & pc.field("superseded_by").is_null() & (pc.field("model") == model)
    durable = pc.field("kind") == DURABLE
    if not session:
        return mine & durable
    this_session = (pc.field("session_id") == session) & (pc.field("created_at") >= pa.scalar(cutoff, _TS))
    return mine & (durable | this_session)


class RecallColumns:
    """The :data:`COLUMNS` of every live row of one dataset version, found by row address."""

    def __init__(self) -> None:
        self.version: int | None = None
        # fragment id -> (its files, its rows, row position by physical offset (-1: deleted at load))
        self._fragments: dict[int, tuple[tuple, pa.Table, np.ndarray]] = {}
        self.rows_read = 0  # rows read from disk so far (tests check that a sync reads only what changed)

    def sync(self, ds) -> None:
        """Follow ``ds`` (a ``lance.LanceDataset``): read the fragments this process has not seen."""
        if ds.version == self.version:
            return
        live = {}
        for frag in ds.get_fragments():
            md = frag.metadata
            key = (tuple(f.path for f in md.files), repr(getattr(md, "overlays", None)))
            held = self._fragments.get(frag.fragment_id)
            live[frag.fragment_id] = held if held is not None and held[0] == key else (key, *self._read(frag))
        self._fragments, self.version = live, ds.version

    def _read(self, frag) -> tuple[pa.Table, np.ndarray]:
        t = frag.to_table(columns=COLUMNS, with_row_address=True)
        self.rows_read += len(t)
        offsets = (t.column("_rowaddr").to_numpy() & 0xFFFFFFFF).astype(np.int64)
        at = np.full(frag.metadata.physical_rows, -1, np.int64)
        at[offsets] = np.arange(len(t))
        cols = {c: (t.column(c).dictionary_encode() if c in DICTIONARY else t.column(c)) for c in COLUMNS}
        return pa.table(cols), at

    def take(self, row_addresses: np.ndarray) -> pa.Table:
        """The rows at ``row_addresses`` (``_rowaddr`` of a search of the synced version), in order."""
        addr = np.asarray(row_addresses, np.uint64)
        frag_ids = (addr >> np.uint64(32)).astype(np.int64)
        offsets = (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
        parts, order = [], []
        for fid in np.unique(frag_ids):
            held = self._fragments.get(int(fid))
            pick = np.flatnonzero(frag_ids == fid)
            pos = held[2][offsets[pick]] if held is not None else np.array([-1])
            if held is None or (pos < 0).any():
                raise LookupError(f"fragment {fid} of version {self.version} is not what the search saw")
            parts.append(held[1].take(pa.array(pos)))
            order.append(pick)
        if not parts:
            return _empty()
        rows = pa.concat_tables([_decoded(p) for p in parts])
        return rows.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


def _decoded(t: pa.Table) -> pa.Table:
    return pa.table({c: (t.column(c).cast(pa.string()) if c in DICTIONARY else t.column(c)) for c in COLUMNS})


def _empty() -> pa.Table:
    return MEMORIES.schema.empty_table().select(COLUMNS)


