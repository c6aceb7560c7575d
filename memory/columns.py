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
(at most :data:`DELTA_MAX_ROWS`; past that, Lance scans them, in one block per view) and searched
exactly in memory (:meth:`View.nearest`: only the rows the recall's rule keeps); for these fragments
the deletion file is part of the key, so a deleted row is never returned. Recall's visibility rule
is evaluated here on the numpy columns (:meth:`View.select`), the same rule Lance filters with.

Each sync makes a new :class:`View` (fragments shared with the previous one): a search and the
lookups of its results use one view, whatever a background sync publishes meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

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
    current: np.ndarray  # superseded_by is null (what visibility asks of it)
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
    vocab: dict[str, int]  # word -> code (shared, only ever grows: a later word is in no row here)
    indexed: frozenset[int] | None = None  # fragments the vector index covers; None: no vector index
    delta: tuple[int, ...] | None = None  # fragments searched in memory; None: Lance scans them
    stacked: _Stack | None = None  # their rows in one block

    def take(self, row_addresses: np.ndarray) -> pa.Table:
        """The rows at ``row_addresses`` (``_rowaddr`` of a search of this version), in order."""
        at = self._locate(row_addresses)
        cols = {c: at.strings(c) for c in ("memory_id", "superseded_by")}
        for c in CODED:
            cols[c] = pa.array(self.words[at.gather(c)], _TYPES[c])
        for c in NUMERIC:
            cols[c] = pa.array(at.gather(c), _TYPES[c])
        return pa.table({c: cols[c] for c in COLUMNS})

    def select(self, row_addresses: np.ndarray, rule: Callable) -> np.ndarray:
        """Which of the rows at ``row_addresses`` ``rule`` keeps (a rule of :mod:`memory.visibility`,
        evaluated on the columns held here): a boolean mask."""
        return np.asarray(rule(self._locate(row_addresses)), bool)

    def _locate(self, row_addresses: np.ndarray) -> _Rows:
        addr = np.asarray(row_addresses, np.uint64)
        frag_ids = (addr >> np.uint64(32)).astype(np.int64)
        offsets = (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
        order = np.argsort(frag_ids, kind="stable")
        runs = []
        for fid, lo, hi in _runs(frag_ids[order]):
            frag = self.fragments.get(fid)
            pos = frag.at[offsets[order[lo:hi]]] if frag is not None else np.array([-1])
            if frag is None or (pos < 0).any():
                raise LookupError(f"fragment {fid} of version {self.version} is not what the search saw")
            runs.append((frag, pos))
        return _Rows(self.vocab, runs, np.argsort(order, kind="stable"), len(addr))

    def nearest(self, q: np.ndarray, n: int, rule: Callable | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine distances of the ``n`` nearest rows held in memory (``rule``: only rows it
        keeps, see :meth:`select`): their row addresses and distances, nearest first."""
        s = self.stacked
        if s is None or not len(s.addr):
            return _NO_ADDR, _NO_DIST
        addr, vectors, inv_norm = s.addr, s.vectors, s.inv_norm
        if rule is not None:  # the rows it drops are not compared (often all: other owners' new rows)
            kept = np.flatnonzero(np.asarray(rule(s.rows), bool))
            addr, inv_norm = addr[kept], inv_norm[kept]
            vectors = vectors[kept] if len(kept) < len(s.addr) // 2 else vectors
        # einsum, not BLAS: OpenBLAS's threads spin after a product, taking the CPU Lance's search needs
        dots = np.einsum("ij,j->i", vectors, q)
        dist = 1.0 - (dots if len(dots) == len(addr) else dots[kept]) * inv_norm
        top = np.argpartition(dist, n)[:n] if len(dist) > n else np.arange(len(dist))
        top = top[np.argsort(dist[top], kind="stable")]
        return addr[top], dist[top]


class _Rows:
    """Some rows of a view, in the caller's order: their columns gathered on demand (and kept, with
    ``memo``: the rows held with vectors are filtered by every recall), and the terms of a
    visibility rule over them (``field``, ``time``: the builder :mod:`memory.visibility` takes)."""

    def __init__(self, vocab: dict[str, int], runs: list, back: np.ndarray | None, n: int,
                 memo: bool = False) -> None:
        self.vocab, self.runs, self.back, self.n = vocab, runs, back, n  # runs: (fragment, positions)
        self.memo: dict[str, np.ndarray] | None = {} if memo else None

    def gather(self, c: str) -> np.ndarray:
        """A coded or numeric column (codes for the coded ones; ``current``: superseded_by is null)."""
        got = None if self.memo is None else self.memo.get(c)
        if got is None:
            parts = [f.current[p] if c == "current" else (f.codes if c in CODED else f.numbers)[c][p]
                     for f, p in self.runs]
            got = np.concatenate(parts) if parts else np.empty(0, NUMERIC.get(c, np.int32))
            got = got if self.back is None else got[self.back]
            if self.memo is not None:
                self.memo[c] = got
        return got

    def strings(self, c: str) -> pa.Array:
        if c == "superseded_by" and self.gather("current").all():  # the usual case: no row superseded
            return pa.nulls(self.n, pa.string())
        parts = [getattr(f, "memory_id" if c == "memory_id" else "superseded").take(pa.array(p))
                 for f, p in self.runs]
        got = _joined(parts, pa.string())
        return got if self.back is None else got.take(pa.array(self.back))

    def field(self, c: str) -> _Term:
        return _Term(self, c)

    @staticmethod
    def time(t: datetime) -> np.datetime64:
        return np.datetime64(t.astimezone(UTC).replace(tzinfo=None), "us")


class _Term:
    """One column of :class:`_Rows` in a rule: compared, it gives a boolean mask."""

    __hash__ = None

    def __init__(self, rows: _Rows, c: str) -> None:
        self.rows, self.c = rows, c

    def __eq__(self, value) -> np.ndarray:  # type: ignore[override]
        if self.c in CODED:
            return self.rows.gather(self.c) == self.rows.vocab.get(value, -2)  # -2: no row has it
        if self.c in NUMERIC:
            return self.rows.gather(self.c) == value
        return pc.fill_null(pc.equal(self.rows.strings(self.c), value), False).to_numpy(zero_copy_only=False)

    def __ge__(self, value) -> np.ndarray:
        return self.rows.gather(self.c) >= value

    def is_null(self) -> np.ndarray:
        if self.c in CODED:
            return self.rows.gather(self.c) == -1
        if self.c in NUMERIC:
            return np.zeros(self.rows.n, bool)
        if self.c == "superseded_by":
            return self.rows.gather("current")
        return self.rows.strings(self.c).is_null().to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class _Stack:
    """The rows held with their vectors in one block: writers leave many small fragments, and one
    product over a block costs less than one per fragment. A sync that only adds fragments after
    the previous stack's appends their rows to its block (each sync under writes would otherwise
    copy every held vector again); an earlier view keeps seeing its own first rows."""

    addr: np.ndarray
    vectors: np.ndarray  # (rows, EMBED_DIM)
    inv_norm: np.ndarray
    rows: _Rows  # their filter columns, for a rule
    frags: tuple[_Fragment, ...] = ()
    block: _Block | None = None
    starts: np.ndarray | None = None  # each fragment's first row in the block

    @classmethod
    def of(cls, frags: list[_Fragment], vocab: dict[str, int], prev: _Stack | None = None) -> _Stack:
        sizes = [len(f.addr) for f in frags]
        n = sum(sizes)
        held = 0  # the leading fragments the previous stack holds too
        if prev is not None and prev.block is not None:
            for a, b in zip(prev.frags, frags, strict=False):
                if a is not b:
                    break
                held += 1
        lo = sum(sizes[:held])
        if held and held == len(prev.frags) and prev.block.used == lo and n <= prev.block.capacity:
            block = prev.block  # only appended to: the rows of earlier views stay as they are
            runs = [*prev.rows.runs, *((f, np.arange(len(f.addr))) for f in frags[held:])]
            for f in frags[held:]:
                lo = block.put(f, lo)
        else:  # a new block: the rows the previous one holds are copied in runs, the others put
            block, runs, lo = _Block(n), [], 0
            was = {} if prev is None or prev.block is None else {id(f): i for i, f in enumerate(prev.frags)}
            for f, size in zip(frags, sizes, strict=True):
                i = was.get(id(f))
                runs.append((f, np.arange(size)) if i is None else prev.rows.runs[i])
                lo = block.put(f, lo) if i is None else block.copy(prev, i, f, lo)
            block.flush(prev)
        rows = _Rows(vocab, runs, None, n, memo=True)
        rows.memo.update({c: v[:n] for c, v in block.columns.items()})  # the rule reads the block
        starts = np.cumsum([0, *sizes[:-1]]) if sizes else np.empty(0, np.int64)
        return cls(block.addr[:n], block.vectors[:n], block.inv_norm[:n], rows, tuple(frags), block, starts)


class _Block:
    """Storage that successive stacks share: a stack reads its first rows, the next appends after."""

    def __init__(self, rows: int) -> None:
        self.capacity = max(rows, min(2 * rows, DELTA_MAX_ROWS), 256)
        self.vectors = np.empty((self.capacity, EMBED_DIM), np.float32)
        self.inv_norm = np.empty(self.capacity, np.float32)
        self.addr = np.empty(self.capacity, np.uint64)
        self.columns = {c: np.empty(self.capacity, np.int32) for c in CODED}
        self.columns["current"] = np.empty(self.capacity, bool)
        self.columns.update({c: np.empty(self.capacity, dtype) for c, dtype in NUMERIC.items()})
        self.used = 0
        self._run: list[int] | None = None  # rows of a previous block to copy: [from, to, count]

    def put(self, f: _Fragment, lo: int) -> int:
        """Write ``f``'s rows at ``lo`` (the end of the used rows); its vectors point here from now."""
        hi = lo + len(f.addr)
        self.vectors[lo:hi], self.inv_norm[lo:hi], self.addr[lo:hi] = f.vectors, f.inv_norm, f.addr
        for c, v in self.columns.items():
            v[lo:hi] = f.current if c == "current" else (f.codes if c in CODED else f.numbers)[c]
        f.vectors, f.inv_norm = self.vectors[lo:hi], self.inv_norm[lo:hi]
        self.used = hi
        return hi

    def copy(self, prev: _Stack, i: int, f: _Fragment, lo: int) -> int:
        """Take ``f`` (``prev``'s ``i``-th fragment) from ``prev``'s block at ``lo``: neighbours in
        both blocks are copied in one piece (:meth:`flush`)."""
        src, size = int(prev.starts[i]), len(f.addr)
        run = self._run
        if run is not None and run[0] + run[2] == src and run[1] + run[2] == lo:
            run[2] += size
        else:
            self.flush(prev)
            self._run = [src, lo, size]
        f.vectors, f.inv_norm = self.vectors[lo:lo + size], self.inv_norm[lo:lo + size]
        self.used = lo + size
        return lo + size

    def flush(self, prev: _Stack | None) -> None:
        if self._run is None:
            return
        (src, lo, size), self._run = self._run, None
        a, b = slice(src, src + size), slice(lo, lo + size)
        self.vectors[b], self.inv_norm[b], self.addr[b] = prev.vectors[a], prev.inv_norm[a], prev.addr[a]
        for c, v in self.columns.items():
            v[b] = prev.rows.memo[c][a]


class RecallColumns:
    """Follows a dataset's versions: :meth:`sync` makes the :class:`View` of a version, reading only
    the fragments earlier views did not hold."""

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self.view = View(None, {}, np.array([None], dtype=object), self._vocab)
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
        delta = stacked = None
        if hold:
            delta = tuple(sorted(vectored))
            stacked = _Stack.of([live[f] for f in delta], self._vocab, prev.stacked)
        self.view = View(ds.version, live, words, self._vocab, indexed, delta, stacked)
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
        current = superseded.is_null().to_numpy(zero_copy_only=False)
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
                key, at, memory_id.slice(lo, hi - lo), superseded.slice(lo, hi - lo), current[lo:hi].copy(),
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


def _joined_np(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype)
