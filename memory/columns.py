"""What recall filters and re-ranks on, held in memory per Lance fragment (:class:`RecallColumns`).

After the vector search Lance reads each further column of the candidates by random access, a
cost paid per column and per query, and recall's filter and score need nine columns (the figures
are in benchmarks/memory_bench.py's printout). These columns are small (~40 bytes a row as numpy
arrays and codes), and a fragment's data files never change (an update deletes the row and
writes it into a new fragment; an in-place column rewrite changes the fragment's file list,
which is part of the cache key), so each fragment's columns are read once per process and,
when the table moves on, only new or rewritten fragments are read. Deleted rows are never
returned by the search, so deletion files need no tracking here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from schemas.memory import MEMORIES

# the row's identity, the visibility filter's columns, and the re-rank's
COLUMNS = ["memory_id", "owner", "model", "kind", "superseded_by", "session_id", "created_at",
           "last_accessed_at", "access_count", "saliency"]
CODED = ("owner", "model", "kind", "session_id")  # few distinct values: int32 codes into one vocabulary
NUMERIC = {"created_at": "datetime64[us]", "last_accessed_at": "datetime64[us]", "access_count": np.int64,
           "saliency": np.float32}
_TYPES = {f.name: f.type for f in MEMORIES.schema}


@dataclass
class _Fragment:
    key: tuple  # its data files: a new key means it was rewritten
    at: np.ndarray  # row position by physical offset (-1: deleted when read)
    memory_id: pa.Array
    superseded: pa.Array  # superseded_by (kept as is: mostly null)
    codes: dict[str, np.ndarray]
    numbers: dict[str, np.ndarray]


class RecallColumns:
    """The :data:`COLUMNS` of every live row of one dataset version, found by row address."""

    def __init__(self) -> None:
        self.version: int | None = None
        self._fragments: dict[int, _Fragment] = {}
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []
        self.rows_read = 0  # rows read from disk so far (tests check that a sync reads only what changed)

    def sync(self, ds) -> None:
        """Follow ``ds`` (a ``lance.LanceDataset``): read the fragments this process has not seen,
        in one scan (writers leave many one-row fragments: a read each would cost more than the rows)."""
        if ds.version == self.version:
            return
        live, todo = {}, {}
        for frag in ds.get_fragments():
            md = frag.metadata
            key = (tuple(f.path for f in md.files), repr(getattr(md, "overlays", None)))
            held = self._fragments.get(frag.fragment_id)
            if held is not None and held.key == key:
                live[frag.fragment_id] = held
            else:
                todo[frag.fragment_id] = (frag, key)
        if todo:
            t = ds.scanner(columns=COLUMNS, with_row_address=True,
                           fragments=[f for f, _ in todo.values()]).to_table().combine_chunks()
            self.rows_read += len(t)
            fids = t.column("_rowaddr").to_numpy() >> np.uint64(32)
            order = np.argsort(fids, kind="stable")
            t, fids = t.take(pa.array(order)), fids[order]
            bounds = np.searchsorted(fids, np.array(sorted(todo), np.uint64), side="left")
            ends = np.searchsorted(fids, np.array(sorted(todo), np.uint64), side="right")
            for fid, lo, hi in zip(sorted(todo), bounds, ends, strict=True):
                frag, key = todo[fid]
                live[fid] = self._read(
                    t.slice(lo, hi - lo).combine_chunks(), frag.metadata.physical_rows, key
                )
        self._fragments, self.version = live, ds.version

    def _read(self, t: pa.Table, physical_rows: int, key: tuple) -> _Fragment:
        at = np.full(physical_rows, -1, np.int64)
        at[(t.column("_rowaddr").to_numpy() & 0xFFFFFFFF).astype(np.int64)] = np.arange(len(t))
        codes = {c: self._encode(t.column(c)) for c in CODED}
        numbers = {c: t.column(c).to_numpy().astype(dtype) for c, dtype in NUMERIC.items()}
        return _Fragment(
            key,
            at,
            t.column("memory_id").chunk(0) if len(t) else pa.array([], pa.string()),
            t.column("superseded_by").chunk(0) if len(t) else pa.array([], pa.string()),
            codes,
            numbers,
        )

    def _encode(self, col: pa.ChunkedArray) -> np.ndarray:
        enc = col.dictionary_encode().combine_chunks() if len(col) else pa.DictionaryArray.from_arrays(
            pa.array([], pa.int32()), pa.array([], pa.string()))
        words = enc.dictionary.to_pylist()
        for w in words:
            if w not in self._vocab:
                self._vocab[w] = len(self._words)
                self._words.append(w)
        remap = np.array([self._vocab[w] for w in words] + [-1], np.int32)
        idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return remap[idx]  # -1 (null) picks the trailing -1

    def take(self, row_addresses: np.ndarray) -> pa.Table:
        """The rows at ``row_addresses`` (``_rowaddr`` of a search of the synced version), in order."""
        addr = np.asarray(row_addresses, np.uint64)
        n = len(addr)
        frag_ids = (addr >> np.uint64(32)).astype(np.int64)
        offsets = (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
        codes = {c: np.empty(n, np.int32) for c in CODED}
        numbers = {c: np.empty(n, dtype) for c, dtype in NUMERIC.items()}
        ids: list = [None] * n
        superseded: list = [None] * n
        for fid in np.unique(frag_ids):
            frag = self._fragments.get(int(fid))
            pick = np.flatnonzero(frag_ids == fid)
            pos = frag.at[offsets[pick]] if frag is not None else np.array([-1])
            if frag is None or (pos < 0).any():
                raise LookupError(f"fragment {fid} of version {self.version} is not what the search saw")
            for c in CODED:
                codes[c][pick] = frag.codes[c][pos]
            for c in NUMERIC:
                numbers[c][pick] = frag.numbers[c][pos]
            taken = pa.array(pos)
            for i, m, s in zip(
                pick,
                frag.memory_id.take(taken).to_pylist(),
                frag.superseded.take(taken).to_pylist(),
                strict=True,
            ):
                ids[i], superseded[i] = m, s
        words = np.array([*self._words, None], dtype=object)  # code -1 -> None
        cols = {"memory_id": ids, "superseded_by": superseded}
        cols.update({c: words[v] for c, v in codes.items()})
        cols.update(numbers)
        return pa.table({c: pa.array(cols[c], _TYPES[c]) for c in COLUMNS})
