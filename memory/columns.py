"""What recall filters and re-ranks on, held in memory per Lance fragment (:class:`RecallColumns`),
and the vectors of the rows the vector index does not cover yet.

After the vector search Lance reads each further column of the candidates by random access, a
cost paid per column and per query, and recall's filter and score need nine columns (the figures
are in benchmarks/memory_bench.py's printout). These columns are small (~40 bytes a row as numpy
arrays and codes), and a fragment's data files never change (an update deletes the row and
writes it into a new fragment; an in-place column rewrite changes the fragment's file list,
which is part of the cache key), so each fragment's columns are read once per process and,
when the table moves on, only new or rewritten fragments are read. Deleted rows are never
returned by the index search, so deletion files need no tracking for indexed fragments.

Rows outside the vector index (new memories, rows rewritten by access stats or supersedes, until
upkeep indexes them) would be scanned by Lance on every search: one read and decode per fragment
and per query, the largest part of a recall while others write. Their vectors are held here too
(at most :data:`DELTA_MAX_ROWS`; past that, Lance scans them) and searched exactly in memory
(:meth:`View.nearest`); for these fragments the deletion file is part of the key, so a deleted row
is never returned.

Each sync makes a new :class:`View` (fragments shared with the previous one): a search and the
lookups of its results use one view, whatever a background sync publishes meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.embed import EMBED_DIM
from schemas.memory import MEMORIES

# the row's identity, the visibility filter's columns, and the re-rank's
COLUMNS = ["memory_id", "owner", "model", "kind", "superseded_by", "session_id", "created_at",
           "last_accessed_at", "access_count", "saliency"]
CODED = ("owner", "model", "kind", "session_id")  # few distinct values: int32 codes into one vocabulary
NUMERIC = {"created_at": "datetime64[us]", "last_accessed_at": "datetime64[us]", "access_count": np.int64,
           "saliency": np.float32}
_TYPES = {f.name: f.type for f in MEMORIES.schema}
# unindexed rows whose vectors one process holds (4 KiB each: 128 MiB); upkeep indexes new rows
# long before (``upkeep_unindexed_rows``), so this is a bound for tables nobody keeps indexed
DELTA_MAX_ROWS = 32_768
_NO_ADDR = np.empty(0, np.uint64)
_NO_DIST = np.empty(0, np.float32)


@dataclass
class _Fragment:
    key: tuple  # its data files (and deletion file, where its vectors are held): a new key is a re-read
    at: np.ndarray  # row position by physical offset (-1: deleted when read)
    memory_id: pa.Array
    superseded: pa.Array  # superseded_by (kept as is: mostly null)
    codes: dict[str, np.ndarray]
    numbers: dict[str, np.ndarray]
    addr: np.ndarray  # row address of each row read
    vectors: np.ndarray | None = None  # (rows, EMBED_DIM) float32, for a fragment outside the vector index
    inv_norm: np.ndarray | None = None


@dataclass(frozen=True)
class View:
    """The columns of one dataset version: a search of that version is looked up here."""

    version: int | None
    fragments: dict[int, _Fragment]
    words: np.ndarray  # the vocabulary (object array; the last entry, None, is code -1)
    indexed: frozenset[int] | None = None  # fragments the vector index covers; None: no vector index
    delta: tuple[int, ...] | None = None  # fragments searched in memory; None: Lance scans them

    def take(self, row_addresses: np.ndarray) -> pa.Table:
        """The rows at ``row_addresses`` (``_rowaddr`` of a search of this version), in order."""
        addr = np.asarray(row_addresses, np.uint64)
        frag_ids = (addr >> np.uint64(32)).astype(np.int64)
        offsets = (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
        order = np.argsort(frag_ids, kind="stable")
        ids, sup, pos_of, frags = [], [], [], []
        for fid, lo, hi in _runs(frag_ids[order]):
            frag = self.fragments.get(fid)
            pos = frag.at[offsets[order[lo:hi]]] if frag is not None else np.array([-1])
            if frag is None or (pos < 0).any():
                raise LookupError(f"fragment {fid} of version {self.version} is not what the search saw")
            taken = pa.array(pos)
            ids.append(frag.memory_id.take(taken))
            sup.append(frag.superseded.take(taken))
            pos_of.append(pos)
            frags.append(frag)
        back = np.argsort(order, kind="stable")  # sorted by fragment -> the caller's order
        cols = {"memory_id": _joined(ids, pa.string()).take(pa.array(back)),
                "superseded_by": _joined(sup, pa.string()).take(pa.array(back))}
        for c in CODED:
            codes = _stacked([f.codes[c][p] for f, p in zip(frags, pos_of, strict=True)], np.int32)
            cols[c] = pa.array(self.words[codes[back]], _TYPES[c])
        for c, dtype in NUMERIC.items():
            values = _stacked([f.numbers[c][p] for f, p in zip(frags, pos_of, strict=True)], dtype)
            cols[c] = pa.array(values[back], _TYPES[c])
        return pa.table({c: cols[c] for c in COLUMNS})

    def nearest(self, q: np.ndarray, n: int, where: pc.Expression | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine distances of the ``n`` nearest rows held in memory (``where``: only rows it
        selects): their row addresses and distances, nearest first."""
        blocks = [self.fragments[f] for f in self.delta or ()]
        if not blocks:
            return _NO_ADDR, _NO_DIST
        addr = np.concatenate([b.addr for b in blocks])
        # einsum, not BLAS: OpenBLAS's threads spin after a product, taking the CPU Lance's search needs
        dist = 1.0 - np.concatenate([np.einsum("ij,j->i", b.vectors, q) * b.inv_norm for b in blocks])
        if where is None:
            top = np.argpartition(dist, n)[:n] if len(dist) > n else np.arange(len(dist))
            top = top[np.argsort(dist[top], kind="stable")]
            return addr[top], dist[top]
        order = np.argsort(dist, kind="stable")
        found, step = [], max(4 * n, 256)
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            rows = self.take(addr[chunk]).append_column("_i", pa.array(chunk))
            found.extend(rows.filter(where).column("_i").to_numpy())
            if len(found) >= n:
                break
        pick = np.asarray(found[:n], np.int64)
        return addr[pick], dist[pick]


class RecallColumns:
    """Follows a dataset's versions: :meth:`sync` makes the :class:`View` of a version, reading only
    the fragments earlier views did not hold."""

    def __init__(self) -> None:
        self.view = View(None, {}, np.array([None], dtype=object))
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []
        self.rows_read = 0  # rows read from disk so far (tests check that a sync reads only what changed)

    @property
    def version(self) -> int | None:
        return self.view.version

    def take(self, row_addresses: np.ndarray) -> pa.Table:
        """:meth:`View.take` of the latest view."""
        return self.view.take(row_addresses)

    def sync(self, ds) -> View:
        """The view of ``ds`` (a ``lance.LanceDataset``), reading the fragments not held yet in one
        scan (writers leave many one-row fragments: a read each would cost more than the rows)."""
        prev = self.view
        if ds.version == prev.version:
            return prev
        indexed = _vector_indexed(ds)
        frags = ds.get_fragments()
        outside = [f for f in frags if indexed is not None and f.fragment_id not in indexed]
        hold = (indexed is not None and not ds.has_stable_row_ids
                and sum(f.physical_rows for f in outside) <= DELTA_MAX_ROWS)
        vectored = {f.fragment_id for f in outside} if hold else set()
        live, todo = {}, {}
        for frag in frags:
            fid, md = frag.fragment_id, frag.metadata
            with_vectors = fid in vectored
            key = (repr(md.files),  # a repr: DataFile.path builds a class on every call
                   repr(getattr(md, "overlays", None)), _deletion_path(md) if with_vectors else None)
            held = prev.fragments.get(fid)
            if held is not None and held.key == key and (held.vectors is not None) == with_vectors:
                live[fid] = held
            elif held is not None and held.key[:2] == key[:2] and not with_vectors:
                live[fid] = replace(held, key=key, vectors=None, inv_norm=None)  # indexed now: vectors freed
            else:
                todo[fid] = (frag, key, with_vectors)
        for want in (False, True):
            part = {fid: t for fid, t in todo.items() if t[2] == want}
            if part:
                live.update(self._read(ds, part, want))
        words = prev.words
        if len(words) != len(self._words) + 1:  # the vocabulary grew
            words = np.array([*self._words, None], object)
        self.view = View(ds.version, live, words, indexed, tuple(sorted(vectored)) if hold else None)
        return self.view

    def _read(self, ds, todo: dict, with_vectors: bool) -> dict[int, _Fragment]:
        """Scan the ``todo`` fragments once, decode the columns once, and cut them per fragment."""
        columns = [*COLUMNS, "vector"] if with_vectors else COLUMNS
        ids = sorted(todo)
        t = ds.scanner(columns=columns, with_row_address=True,
                       fragments=[todo[f][0] for f in ids]).to_table().combine_chunks()
        self.rows_read += len(t)
        addr = t.column("_rowaddr").to_numpy().astype(np.uint64)
        fids = addr >> np.uint64(32)
        if (np.diff(fids.astype(np.int64)) < 0).any():  # a scan in fragment order needs no sort
            order = np.argsort(fids, kind="stable")
            t, addr, fids = t.take(pa.array(order)), addr[order], fids[order]
        codes = {c: self._encode(t.column(c)) for c in CODED}
        numbers = {c: t.column(c).to_numpy().astype(dtype) for c, dtype in NUMERIC.items()}
        memory_id, superseded = _single(t.column("memory_id")), _single(t.column("superseded_by"))
        vecs = inv_norm = None
        if with_vectors:
            vecs = np.empty((0, EMBED_DIM), np.float32)
            if len(t):
                col = t.column("vector").combine_chunks()
                vecs = np.asarray(col.values.to_numpy(), np.float32).reshape(-1, EMBED_DIM)
            norm = np.linalg.norm(vecs, axis=1)
            inv_norm = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0).astype(np.float32)
        wanted = np.array(ids, np.uint64)
        out = {}
        for fid, lo, hi in zip(ids, np.searchsorted(fids, wanted, side="left"),
                               np.searchsorted(fids, wanted, side="right"), strict=True):
            frag, key, _ = todo[fid]
            part = addr[lo:hi]
            at = np.full(frag.physical_rows, -1, np.int64)
            at[(part & np.uint64(0xFFFFFFFF)).astype(np.int64)] = np.arange(hi - lo)
            out[fid] = _Fragment(
                key, at, memory_id.slice(lo, hi - lo), superseded.slice(lo, hi - lo),
                {c: v[lo:hi].copy() for c, v in codes.items()},
                {c: v[lo:hi].copy() for c, v in numbers.items()},
                part.copy(), None if vecs is None else vecs[lo:hi].copy(),
                None if inv_norm is None else inv_norm[lo:hi].copy(),
            )
        return out

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


def _vector_indexed(ds) -> frozenset[int] | None:
    """The fragments the vector index covers (None: the table has no vector index)."""
    vector = [i for i in ds.describe_indices() if i.field_names == ["vector"]]
    if not vector:
        return None
    return frozenset(f for seg in vector[0].segments for f in (seg.fragment_ids or ()))


def _deletion_path(md) -> str | None:
    d = md.deletion_file
    return None if d is None else f"{d.file_type}-{d.read_version}-{d.id}"


def _runs(sorted_ids: np.ndarray):
    """(value, start, end) of each run of equal values in a sorted array."""
    if not len(sorted_ids):
        return
    cuts = np.flatnonzero(np.diff(sorted_ids)) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(sorted_ids)]
    for lo, hi in zip(starts, ends, strict=True):
        yield int(sorted_ids[lo]), int(lo), int(hi)


def _single(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks else pa.array([], col.type)


def _joined(parts: list[pa.Array], typ) -> pa.Array:
    return pa.concat_arrays(parts) if parts else pa.array([], typ)


def _stacked(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype)
