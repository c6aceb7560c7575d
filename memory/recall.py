"""Recall's search: the nearest visible memories, full-text hits to blend in, and the public
columns of the final ``k``.

The search returns row addresses and distances only; the filter and score columns come from
:class:`memory.columns.RecallColumns` (in memory, per fragment). With a vector index the visibility
rule is first applied *after* the search, to more than the wanted candidates: when the owner's
visible memories are most of the table (one agent's memory) that is the same top ``n`` without
evaluating the filter over every row. How many more follows the share of the owner's last search
that was visible (each row searched is one more vector the refine re-reads), up to ``OVERFETCH``
times. When too few survive it searches once more with ``OVERFETCH``, then (an owner with a small
share of the table) with the filter first, and does so directly for that owner from then on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memory import visibility as vis
from memory.columns import COLUMNS
from memory.table import MemoryTable
from memory.writes import PUBLIC_COLUMNS
from schemas.embed import normalise_text
from schemas.memory import MemoryConfig
from storage.lance import sql_in

OVERFETCH = 1.5  # the most nearest rows searched per wanted candidate when the filter comes after the search
SLACK = 1.1  # the least: per visible row expected from the owner's last search, this many searched
# what the re-rank needs of a full-text hit (vector hits get theirs from memory.columns)
SCORE_COLUMNS = ["memory_id", "last_accessed_at", "access_count", "saliency"]


class Searcher:
    """Vector and full-text candidates over one :class:`MemoryTable`."""

    def __init__(self, mt: MemoryTable, config: MemoryConfig) -> None:
        self.mt, self.config = mt, config
        self.prefilter_owners: set[str] = set()  # owners too sparse in the table to post-filter
        self._share: dict[str, float] = {}  # owner -> visible share of its last post-filtered search
        self._indexed: tuple[int, bool] | None = None  # (version, has a vector index)
        self._seen = None  # the dataset the last search saw (its row ids are the ones returned)

    @property
    def seen_version(self) -> int | None:
        """The version the last search read."""
        return None if self._seen is None else self._seen.version

    def has_vector_index(self, ds) -> bool:
        if self._indexed is None or self._indexed[0] != ds.version:
            self._indexed = (ds.version, any(i.field_names == ["vector"] for i in ds.describe_indices()))
        return self._indexed[1]

    def vector(self, q: np.ndarray, owner: str, rule: Callable, n: int) -> pa.Table:
        """The ``n`` nearest memories ``rule`` keeps (``rule(on)``: a rule of :mod:`memory.visibility`
        with its arguments bound): :data:`memory.columns.COLUMNS`, ``_distance``, ``_rowid``."""
        return self.mt.read(lambda _: self._vector(q, owner, rule, n))

    def _vector(self, q, owner, rule, n) -> pa.Table:
        snap = self.mt.synced()
        ds, view = snap.ds, snap.view
        self._seen = ds
        c = self.config
        indexed = view.indexed is not None
        in_memory = view.delta is not None  # the rows outside the index are searched here, not by Lance
        stable = ds.has_stable_row_ids  # without (memories never enables them) a row's id is its address

        def search(filtered: bool, limit: int):
            nearest: dict[str, Any] = {"column": "vector", "q": q, "k": limit, "metric": "cosine"}
            if indexed:
                nearest.update(nprobes=c.nprobes, ef=c.ef)
                if c.refine_factor:
                    nearest["refine_factor"] = c.refine_factor
            hits = ds.to_table(
                columns=["_distance"],
                nearest=nearest,
                filter=rule() if filtered else None,
                prefilter=filtered,
                fast_search=in_memory,
                with_row_id=stable,
                with_row_address=True,
                disable_scoring_autoprojection=True,
            )
            addr = hits.column("_rowaddr").to_numpy()
            dist = hits.column("_distance").to_numpy()
            ids = hits.column("_rowid").to_numpy() if stable else addr
            if in_memory:  # merged with the exact distances of the visible rows held in memory
                more_addr, more_dist = view.nearest(q, limit, rule)
                addr, dist = np.concatenate([addr, more_addr]), np.concatenate([dist, more_dist])
                top = np.argsort(dist, kind="stable")[:limit]
                addr, dist = addr[top], dist[top]
                ids = addr
            return addr, dist, ids

        def table(addr, dist, ids) -> pa.Table:
            return view.take(addr).append_column("_distance", pa.array(dist, pa.float32())).append_column(
                "_rowid", pa.array(ids, pa.uint64())
            )

        if indexed and owner not in self.prefilter_owners:
            most = math.ceil(n * OVERFETCH)
            fit = math.ceil(n * SLACK / self._share.get(owner, 1 / OVERFETCH))
            for limit in dict.fromkeys((min(fit, most), most)):  # a second try when fewer survived
                addr, dist, ids = search(False, limit)
                keep = view.select(addr, rule)
                self._share[owner] = max(float(keep.mean()), 1 / OVERFETCH) if len(keep) else 1 / OVERFETCH
                kept = np.flatnonzero(keep)[:n]
                if len(kept) >= n:
                    return table(addr[kept], dist[kept], ids[kept])
            self.prefilter_owners.add(owner)
        return table(*search(True, n))

    def text(self, cands: pa.Table, cos: np.ndarray, q: np.ndarray, text: str, where: pc.Expression, n: int):
        """Union with full-text hits; BM25 scaled by the best hit becomes the keyword term."""
        def fts(ds) -> pa.Table:
            return ds.to_table(columns=[*SCORE_COLUMNS, "vector", "_score"], filter=where, prefilter=True,
                               full_text_query={"query": normalise_text(text), "columns": ["text"]},
                               limit=n, with_row_id=True, disable_scoring_autoprojection=True)

        hits = self.mt.read(fts)
        bm25 = dict(zip(hits.column("memory_id").to_pylist(), hits.column("_score").to_numpy(), strict=True))
        best = max(bm25.values(), default=0.0)
        if best <= 0:  # no word in common with any memory: nothing to blend
            return cands, cos, None
        have = set(cands.column("memory_id").to_pylist())
        extra = hits.filter(
            pc.invert(pc.is_in(hits.column("memory_id"), pa.array(sorted(have), pa.string())))
        )
        if len(extra):
            vecs = np.stack(extra.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
            cos = np.concatenate([cos, vecs @ q])
            keep = [*SCORE_COLUMNS, "_rowid"]
            cands = pa.concat_tables([cands.select(keep), extra.select(keep)])
        keyword = np.array(
            [bm25.get(m, 0.0) / best for m in cands.column("memory_id").to_pylist()], np.float64
        )
        return cands, cos, keyword

    def public_rows(self, picked: pa.Table) -> list[dict[str, Any]]:
        """The public columns of the chosen candidates, in their order: by row id from the version
        the search saw, or by ``memory_id`` at the latest version if the row ids moved."""
        ids = picked.column("memory_id").to_pylist()
        rows = self._take(picked)
        if rows is None:
            found = self.mt.read(lambda ds: ds.to_table(columns=PUBLIC_COLUMNS, filter=vis.ids(ids)))
            at = {m: i for i, m in enumerate(found.column("memory_id").to_pylist())}
            rows = found.take(pa.array([at[m] for m in ids if m in at], pa.int64()))
        return rows.select(PUBLIC_COLUMNS).to_pylist()

    def _take(self, picked: pa.Table) -> pa.Table | None:
        """``picked``'s public columns by row id, in order; None when a row id no longer holds the
        memory it held (compaction, concurrent writes) or its files were cleaned up. Columns the
        vector search took from the same version's view are not read again."""
        ids = picked.column("memory_id").to_pylist()
        if not ids:
            return picked.select([])
        ds = self._seen if self._seen is not None else self.mt.synced().ds
        viewed = set(COLUMNS) <= set(picked.column_names)  # not so for full-text hits (another read)
        held = [c for c in PUBLIC_COLUMNS if c in COLUMNS] if viewed else []
        read = ["memory_id", *(c for c in PUBLIC_COLUMNS if c not in held and c != "memory_id")]
        rowids = picked.column("_rowid").to_pylist()
        # pylance's take by row id: one read per row, no scan plan (the filter is the fallback)
        take = getattr(ds, "_take_rows", None)
        try:
            rows = take(rowids, read) if take else ds.to_table(columns=read, filter=sql_in("_rowid", rowids))
        except (OSError, ValueError, RuntimeError, TypeError):  # TypeError: a changed private take
            return None
        at = {m: i for i, m in enumerate(rows.column("memory_id").to_pylist())}
        if len(rows) != len(ids) or any(m not in at for m in ids):
            return None
        rows = rows.take(pa.array([at[m] for m in ids], pa.int64()))
        return pa.table({c: picked.column(c) if c in held else rows.column(c) for c in PUBLIC_COLUMNS})
